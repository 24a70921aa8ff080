"""Pretraining: next-token cross-entropy over the batch contract.

    objective = Σ_t loss_mask_t · (−log p_θ(targets_t | inputs_≤t))   (+ z-loss, label smoothing)

summed, with `count = Σ_t loss_mask_t`; the trainer divides once. With
`config.loss.kind = 'fused'` the [B, T, V] logits are never materialized: lm.losses.fused_cross_entropy,
a reduction of the chunked token log-probabilities (lm/objectives/_logprobs.py), each device
computing its own rows (and vocabulary shard) under the mesh.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from lm import losses
from lm.objectives import _logprobs


def sums_of(out: losses.LossOutput) -> dict:
    """The sums the trainer adds over micro-batches and devices."""
    return {"count": out.count, "nll_sum": out.nll_sum, "correct_sum": out.correct_sum,
            "z_loss_sum": out.z_loss_sum}


def token_loss(model, batch: dict, loss_cfg: Any) -> losses.LossOutput:
    """Cross-entropy of `model` on `batch` (inputs, targets, loss_mask, segment_ids, positions)."""
    opts = dict(z_loss=loss_cfg.z_loss, label_smoothing=loss_cfg.label_smoothing)
    if loss_cfg.kind == "fused":  # chunked, sharded by rows (and vocabulary) under the mesh
        return _logprobs.fused_cross_entropy(model, batch, loss_cfg)
    if loss_cfg.kind != "explicit":
        raise ValueError(f"config.loss.kind must be 'explicit' or 'fused', got {loss_cfg.kind!r}")
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    return losses.cross_entropy(logits, batch["targets"], batch["loss_mask"], **opts)


def make_loss_fn(config: Any, graphdef: Any):
    """loss_fn(params, batch, rng, frozen) -> (objective_sum, sums) for the trainer."""
    loss_cfg = config.loss

    def loss_fn(params, batch, rng, frozen=None):
        del rng, frozen  # no dropout in this model; no frozen model
        out = token_loss(nnx.merge(graphdef, params), batch, loss_cfg)
        return out.sum, sums_of(out)

    return loss_fn
