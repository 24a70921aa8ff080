"""Heads on the Transformer's final hidden states besides the language-model head: a scalar
reward per sequence (a reward model) and a value per token (PPO's critic).

Both models are Transformers with one more small module, so their backbone parameters have the
same paths as a language model's: a pretrained or fine-tuned LM checkpoint initializes them
(lm/train/init.py takes every parameter whose path and shape match, the head starts fresh).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lm.model.config import ModelConfig
from lm.model.transformer import Transformer

Array = jax.Array


class ScalarHead(nnx.Module):
    """hidden [..., D] → [...] float32: w·h + b, w and b starting at 0 (every score 0 at first)."""

    def __init__(self, d_model: int):
        self.w = nnx.Param(jnp.zeros((d_model,), jnp.float32), logical_axes=("embed",))
        self.b = nnx.Param(jnp.zeros((), jnp.float32), logical_axes=())

    def __call__(self, hidden: Array) -> Array:
        return jnp.einsum("...d,d->...", hidden.astype(jnp.float32), self.w[...]) + self.b[...]


def last_scored_index(loss_mask: Array) -> Array:
    """loss_mask [B, T] → [B] int32: the last position with a positive weight (0 for a row with none)."""
    t = loss_mask.shape[-1]
    scored = loss_mask > 0
    return jnp.where(scored.any(axis=-1), t - 1 - jnp.argmax(scored[..., ::-1], axis=-1), 0).astype(jnp.int32)


def last_real_index(segment_ids: Array) -> Array:
    """segment_ids [B, T] → [B] int32: the last position holding a real token (segment ≠ 0; 0 for a
    row with none)."""
    t = segment_ids.shape[-1]
    real = segment_ids != 0
    return jnp.where(real.any(axis=-1), t - 1 - jnp.argmax(real[..., ::-1], axis=-1), 0).astype(jnp.int32)


def with_final_token(inputs: Array, positions: Array, segment_ids: Array, loss_mask: Array,
                     targets: Array) -> tuple[Array, Array, Array]:
    """A row of the token contract holds its last token only as a target (inputs stop one short).
    → (inputs, positions, segment_ids) [B, T+1] with that token, targets[b, last], written as an
    input at last+1 (last: the row's last scored target), position and segment continued. Where
    inputs already hold it (a rollout's prompt + completion) the write changes nothing."""
    batch = inputs.shape[0]
    rows = jnp.arange(batch)
    last = last_scored_index(loss_mask)
    pad = lambda x: jnp.concatenate([x, jnp.zeros((batch, 1), x.dtype)], axis=1)  # noqa: E731
    inputs = pad(inputs).at[rows, last + 1].set(targets[rows, last].astype(inputs.dtype))
    positions = pad(positions).at[rows, last + 1].set(positions[rows, last] + 1)
    segment_ids = pad(segment_ids).at[rows, last + 1].set(segment_ids[rows, last])
    return inputs, positions, segment_ids


class RewardModel(Transformer):
    """r(x, y): the Transformer's hidden state at the last real token of prompt + response (the one
    that has read every token of both, the final one included), through a scalar head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.reward_head = ScalarHead(cfg.d_model)

    def rewards(self, inputs: Array, positions: Array, segment_ids: Array, loss_mask: Array,
                targets: Array | None = None) -> Array:
        """A batch of the contract [B, T] (one sequence per row) → rewards [B] float32.

        With ``targets`` (training and evaluation batches, whose final token is only a target):
        the final token, ``targets`` at the last scored position, is fed as one more input
        (`with_final_token`: a [B, T+1] forward) and read there. Without: ``inputs`` already hold
        the whole sequence (a rollout), read at the last real token (`last_real_index`). Padding,
        on either side, changes no reward."""
        if targets is not None:
            inputs, positions, segment_ids = with_final_token(inputs, positions, segment_ids, loss_mask, targets)
        hidden = self.hidden_states(inputs, positions, segment_ids)
        last = jnp.take_along_axis(hidden, last_real_index(segment_ids)[:, None, None], axis=1)[:, 0]
        return self.reward_head(last)


class ValueModel(Transformer):
    """A policy with a value head (PPO): logits and V(s_t) per position from one forward pass.
    V at position t estimates the return of the tokens from targets[t] on, given inputs ≤ t."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.value_head = ScalarHead(cfg.d_model)

    def logits_and_values(self, inputs: Array, positions: Array, segment_ids: Array) -> tuple[Array, Array]:
        """[B, T] → (logits [B, T, V], values [B, T] float32)."""
        hidden = self.hidden_states(inputs, positions, segment_ids)
        return self.logits_from_hidden(hidden), self.value_head(hidden)
