"""Logit filters for sampling: temperature, top-k, top-p (nucleus), min-p, and one draw.

Pure ``jax.numpy`` functions of logits ``x [..., V]`` (computed in float32). A dropped token gets
logit −∞, so the sampled distribution is the softmax of what is left, i.e. renormalized.
``filter_logits`` composes them in this order:

1. temperature  ``x / T`` for ``T > 0``. ``T = 0`` is greedy: only ``argmax x`` (the first index
   on ties) is kept, a point mass.
2. top-k        keep ``x_v ≥ x_(k)``, the k-th largest logit. ``k = 0`` or ``k ≥ V``: off. Every token
   tied with ``x_(k)`` is kept, so more than k may survive: equal logits are never split by id.
3. top-p        with ``q = softmax(x)`` sorted ``q_(1) ≥ q_(2) ≥ …``, let m be the smallest count with
   ``Σ_{j≤m} q_(j) ≥ p`` (the nucleus); keep every v with ``q_v ≥ q_(m)`` (ties with the last
   member kept, as in top-k). ``p = 1``: off.
4. min-p        keep ``q_v ≥ min_p · max_u q_u`` (q after steps 1–3). ``min_p = 0``: off.

The argmax survives every filter, so no setting empties the distribution. Top-p sees the
distribution left by top-k; min-p is a ratio test, unchanged by renormalization.

The functions take traced knobs, so changing a setting does not recompile; a filter that is off
is skipped at run time (``lax.cond``), so it costs nothing, not even its sort.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
F32 = jnp.float32


def _drop(logits: Array, keep: Array) -> Array:
    return jnp.where(keep, logits, -jnp.inf)


def apply_temperature(logits: Array, temperature) -> Array:
    """[..., V] → [..., V] float32: ``x / T`` for T > 0; for T = 0 only the first argmax stays finite."""
    logits = logits.astype(F32)
    t = jnp.asarray(temperature, F32)
    scaled = logits / jnp.where(t > 0, t, 1.0)
    first_max = jnp.arange(logits.shape[-1]) == jnp.argmax(logits, axis=-1)[..., None]
    return jnp.where(t > 0, scaled, _drop(logits, first_max))


def _unless(off: Array, logits: Array, filtered: Callable[[Array], Array]) -> Array:
    """`logits` if `off`, else `filtered(logits)`; a traced `off` skips the filter's sort at run time
    (a `lax.cond`: decoding with top-k or top-p off sorts nothing; a per-row `off` under vmap
    computes both and selects)."""
    return jax.lax.cond(off, lambda x: x, filtered, logits)


def top_k_filter(logits: Array, k) -> Array:
    """[..., V] → [..., V]: keep ``x_v ≥ x_(k)`` (the k-th largest, ties kept); k = 0 or k ≥ V: no-op."""
    logits = logits.astype(F32)
    vocab = logits.shape[-1]
    k = jnp.asarray(k, jnp.int32)

    def filtered(x):
        descending = -jnp.sort(-x, axis=-1)
        kth = jnp.take(descending, jnp.clip(k, 1, vocab) - 1, axis=-1)[..., None]
        return _drop(x, x >= kth)

    return _unless((k <= 0) | (k >= vocab), logits, filtered)


def top_p_filter(logits: Array, p) -> Array:
    """[..., V] → [..., V]: keep the nucleus, the fewest most-likely tokens with mass ≥ p; p ≥ 1: no-op.

    Sorted ``q_(1) ≥ q_(2) ≥ …``: token j of the sorted order is in the nucleus iff the mass
    before it, ``Σ_{i<j} q_(i)``, is still < p. With m members, keep ``q_v ≥ q_(m)``.
    """
    logits = logits.astype(F32)
    p = jnp.asarray(p, F32)

    def filtered(x):
        probs = jax.nn.softmax(x, axis=-1)
        descending = -jnp.sort(-probs, axis=-1)
        mass_before = jnp.concatenate(  # exact exclusive cumsum: 0, q_(1), q_(1)+q_(2), …
            [jnp.zeros_like(descending[..., :1]), jnp.cumsum(descending[..., :-1], axis=-1)], axis=-1)
        members = jnp.sum(mass_before < p, axis=-1, keepdims=True)  # m ≥ 1 since 0 < p
        last_member = jnp.take_along_axis(descending, jnp.maximum(members, 1) - 1, axis=-1)
        return _drop(x, probs >= last_member)

    return _unless(p >= 1, logits, filtered)


def min_p_filter(logits: Array, min_p) -> Array:
    """[..., V] → [..., V]: keep ``q_v ≥ min_p · max_u q_u`` with q = softmax(x); min_p = 0: no-op."""
    logits = logits.astype(F32)
    min_p = jnp.asarray(min_p, F32)

    def filtered(x):
        probs = jax.nn.softmax(x, axis=-1)
        return _drop(x, probs >= min_p * jnp.max(probs, axis=-1, keepdims=True))

    return _unless(min_p <= 0, logits, filtered)


def filter_logits(logits: Array, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> Array:
    """[..., V] → [..., V] float32: temperature, then top-k, top-p, min-p (module docstring)."""
    logits = apply_temperature(logits, temperature)
    logits = top_k_filter(logits, top_k)
    logits = top_p_filter(logits, top_p)
    return min_p_filter(logits, min_p)


def behaviour_logprobs(logits: Array, tokens: Array, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                       *, with_entropy: bool = False):
    """log q(token) under the distribution the sampler draws from, ``q = softmax(filter_logits(x))``:
    logits [..., V], tokens [...] int → [...] float32 (and q's entropy [...] with ``with_entropy``).

    The one function behind every log-probability that RL compares (lm/objectives/_rl.py): the
    sampler records it for each token it draws, and the scorer computes it from teacher-forced
    logits with the same knobs, so the importance ratio π_θ/π_old is the ratio of the
    distributions actually sampled, and exactly 1 on the first, on-policy step. A token the
    filters dropped gets −inf; T = 0 is the point mass on the argmax (log q = 0 there).
    The gradient reaches ``logits`` through the kept entries only."""
    filtered = filter_logits(logits, temperature, top_k, top_p, min_p)
    logq = jax.nn.log_softmax(filtered, axis=-1)
    safe = jnp.clip(jnp.asarray(tokens, jnp.int32), 0, logits.shape[-1] - 1)[..., None]
    picked = jnp.take_along_axis(logq, safe, axis=-1)[..., 0]
    if not with_entropy:
        return picked
    q = jnp.exp(logq)
    entropy = -jnp.sum(jnp.where(q > 0, q * logq, 0.0), axis=-1)
    return picked, jax.lax.stop_gradient(entropy)


def sample_token(key: Array, logits: Array, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> Array:
    """One draw from softmax(filter_logits(x)) per row: logits [..., V] → int32 [...]; T = 0: argmax x."""
    filtered = filter_logits(logits, temperature, top_k, top_p, min_p)
    drawn = jax.random.categorical(key, filtered, axis=-1)  # Gumbel-max: exact for the softmax
    greedy = jnp.argmax(logits, axis=-1)
    return jnp.where(jnp.asarray(temperature) == 0, greedy, drawn).astype(jnp.int32)
