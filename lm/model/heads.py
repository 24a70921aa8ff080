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


class RewardModel(Transformer):
    """r(x, y): the Transformer's hidden state at the last scored token of the response, through a
    scalar head. With teacher forcing, the hidden state at position t has read inputs ≤ t, and
    the last scored target is the response's final token (the end-of-turn closing it, with chat
    data): the score reads the whole prompt and response but that final token."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.reward_head = ScalarHead(cfg.d_model)

    def rewards(self, inputs: Array, positions: Array, segment_ids: Array, loss_mask: Array) -> Array:
        """A batch of the contract [B, T] (one sequence per row) → rewards [B] float32."""
        hidden = self.hidden_states(inputs, positions, segment_ids)
        last = jnp.take_along_axis(hidden, last_scored_index(loss_mask)[:, None, None], axis=1)[:, 0]
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
