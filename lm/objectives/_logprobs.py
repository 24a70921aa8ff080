"""A model's per-token log-probabilities of a batch's targets: the one "forward, then target
log-probs" that every objective and evaluator calls (pretraining's fused loss, SFT, DPO and its
reference, the RL score of the policy and its reference, the evaluators). Not an objective itself
(the leading underscore keeps it out of lm.objectives.names()).

    hidden = model.hidden_states(inputs, positions, segment_ids)        [B, T, D], compute dtype
    lm.losses.token_logprobs(hidden, unembedding, targets, ...)         [B, T], never [B, T, V]

Sharding: traced inside `Setup.with_activation_hints` (every train, eval and score jit of the
trainer), the computation runs under shard_map with this mesh: rows split over the batch axes
(data, fsdp) and, when config.mesh.rules maps `vocab` to `tensor`, the vocabulary split over it
(lm/losses/token_logprobs.py). Outside a hint (one device, tests) it is the plain chunked loss.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from lm import losses
from lm.model.hints import activation_hint


def loss_sharding(rows: int, vocab: int) -> dict:
    """{mesh, batch_axes, vocab_axis} for lm.losses.token_logprobs / fused_cross_entropy from the
    active activation hint (rows split over the batch axes when they divide them; `vocab` through
    the mesh rules), or {} outside a hint or on one device."""
    hint = activation_hint()
    sharding = None if hint is None else hint(("batch", "vocab"), (rows, vocab))
    if sharding is None:
        return {}
    batch, vocab_axis = (tuple(sharding.spec) + (None, None))[:2]
    batch_axes = () if batch is None else (tuple(batch) if isinstance(batch, (tuple, list)) else (batch,))
    return {"mesh": sharding.mesh, "batch_axes": batch_axes, "vocab_axis": vocab_axis}


def _vocab(kernel, layout) -> int:
    return kernel.shape[1] if layout == "dv" else kernel.shape[0]


def hidden_logprobs(model: Any, hidden: jax.Array, targets: jax.Array, *, temperature=1.0, entropy: bool = False,
                    logsumexp: bool = False, chunk_size: int | None = None,
                    vocab_chunk_size: int | None = None) -> losses.TokenLogprobs:
    """lm.losses.token_logprobs of hidden states [B, T, D] already computed (e.g. shared with a
    value head) under `model`'s unembedding."""
    kernel, layout = model.output_kernel()
    return losses.token_logprobs(hidden, kernel, targets, kernel_layout=layout, temperature=temperature,
                                 entropy=entropy, logsumexp=logsumexp, chunk_size=chunk_size,
                                 vocab_chunk_size=vocab_chunk_size,
                                 **loss_sharding(targets.shape[0], _vocab(kernel, layout)))


def token_logprobs(model: Any, batch: dict, *, temperature=1.0, entropy: bool = False, logsumexp: bool = False,
                   chunk_size: int | None = None, vocab_chunk_size: int | None = None) -> losses.TokenLogprobs:
    """Teacher-forced log π(targets) [B, T] of `model` (an nnx Transformer or a module with its
    `hidden_states` and `output_kernel`) on a batch of the token contract, at `temperature`
    (log-probs of softmax(logits / T), the distribution a sampler at T draws from), and on request
    the entropy and logsumexp per position. Not masked: combine with batch['loss_mask']."""
    hidden = model.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"])
    return hidden_logprobs(model, hidden, batch["targets"], temperature=temperature, entropy=entropy,
                           logsumexp=logsumexp, chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size)


def score(graphdef: Any, params: Any, batch: dict, **kwargs) -> losses.TokenLogprobs:
    """`token_logprobs` of the model nnx.merge(graphdef, params) (a policy, a frozen reference or
    old policy: pass its parameters, no gradient is stopped here). kwargs: temperature, entropy,
    logsumexp, chunk_size, vocab_chunk_size."""
    return token_logprobs(nnx.merge(graphdef, params), batch, **kwargs)


def fused_cross_entropy(model: Any, batch: dict, loss_cfg: Any) -> losses.LossOutput:
    """Pretraining's / SFT's fused loss: lm.losses.fused_cross_entropy (a reduction of the same
    chunked statistics) of `model` on `batch`, sharded like `token_logprobs`; z-loss, label
    smoothing and chunk sizes from config.loss."""
    hidden = model.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"])
    kernel, layout = model.output_kernel()
    return losses.fused_cross_entropy(hidden, kernel, batch["targets"], batch["loss_mask"],
                                      chunk_size=loss_cfg.chunk_size, kernel_layout=layout,
                                      vocab_chunk_size=loss_cfg.get("vocab_chunk_size") or None,
                                      z_loss=loss_cfg.z_loss, label_smoothing=loss_cfg.label_smoothing,
                                      **loss_sharding(batch["targets"].shape[0], _vocab(kernel, layout)))
