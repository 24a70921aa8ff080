"""Distribution-level quantities (seed 000): entropy H(p), cross-entropy H(p, q) against a soft
target, KL(p‖q), and the summed log-probability of a sequence (DPO, RL)."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lm.losses.sums import F32, mean_of, prepare_mask


class TokenStats(NamedTuple):
    """A per-position quantity with its masked sum and count (float32)."""
    per_token: jax.Array  # [...]: value · mask (0 where masked)
    sum: jax.Array        # []: Σ mask·value
    count: jax.Array      # []: Σ mask

    @property
    def mean(self):
        return mean_of(self.sum, self.count)


def _stats(values, mask):
    mask = prepare_mask(mask, values.shape)
    per_token = jnp.where(mask != 0, values, 0.0) * mask
    return TokenStats(per_token, jnp.sum(per_token), jnp.sum(mask))


def _plogp_terms(logits):
    """(p, log p) from logits ``[..., V]`` with log p set to 0 where p = 0 (so 0·log 0 = 0)."""
    logp = jax.nn.log_softmax(jnp.asarray(logits).astype(F32), axis=-1)
    p = jnp.exp(logp)
    return p, jnp.where(p > 0, logp, 0.0)


def entropy(logits, mask=None) -> TokenStats:
    """Entropy ``H(p) = -Σ_v p_v log p_v`` of ``p = softmax(logits)``, logits ``[..., V]``.

    Logits of ``-inf`` (excluded tokens) are allowed. Mask ``[...]`` as elsewhere.
    """
    p, logp = _plogp_terms(logits)
    return _stats(-jnp.sum(p * logp, axis=-1), mask)


def soft_cross_entropy(logits, target_probs, mask=None) -> TokenStats:
    """Cross-entropy ``H(p, q) = -Σ_v p_v log q_v`` against a soft target ``p``.

    Args:
      logits: ``[..., V]`` model logits, ``q = softmax(logits)``.
      target_probs: ``[..., V]`` target distribution p (rows sum to 1; one-hot
        rows reduce this to :func:`cross_entropy`). Use ``jax.nn.softmax`` of a
        teacher's logits for distillation. It gets no gradient through here
        only if you stop it yourself.
    """
    logq = jax.nn.log_softmax(jnp.asarray(logits).astype(F32), axis=-1)
    p = jnp.asarray(target_probs).astype(F32)
    if p.shape != logq.shape:
        raise ValueError(f"target_probs {p.shape} must match logits {logq.shape}")
    return _stats(-jnp.sum(jnp.where(p > 0, p * logq, 0.0), axis=-1), mask)


def kl_divergence(p_logits, q_logits, mask=None) -> TokenStats:
    """``KL(p‖q) = Σ_v p_v (log p_v - log q_v)`` with p, q = softmax of the logits.

    Both ``[..., V]``. KL is not symmetric: ``kl_divergence(p, q)`` is the
    forward ("mean-seeking", e.g. data‖model) divergence, and the reverse
    ("mode-seeking", e.g. policy‖reference in RLHF) is ``kl_divergence(q, p)``.
    ``H(p, q) = H(p) + KL(p‖q)`` (tested).
    """
    p, logp = _plogp_terms(p_logits)
    logq = jax.nn.log_softmax(jnp.asarray(q_logits).astype(F32), axis=-1)
    if logq.shape != p.shape:
        raise ValueError(f"q_logits {logq.shape} must match p_logits {p.shape}")
    return _stats(jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1), mask)


def sequence_logprobs(target_logprobs, mask):
    """``Σ_t mask_t · log q(y_t)`` over the last axis: ``[B, T] -> [B]`` (for DPO / RL).

    Masked positions contribute exactly 0 even if their log-prob is NaN.
    """
    mask = jnp.asarray(mask).astype(F32)
    return jnp.sum(jnp.where(mask != 0, target_logprobs, 0.0) * mask, axis=-1)
