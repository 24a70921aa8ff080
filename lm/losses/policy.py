"""Policy-gradient losses over sampled tokens (PPO, GRPO, DAPO, Dr. GRPO): the clipped
surrogate with an optional KL penalty toward a reference policy, and PPO's clipped value loss.

Inputs are per-token log-probabilities ``[B, T]`` of the sampled tokens (from
:func:`lm.losses.cross_entropy`'s ``target_logprobs`` or the model directly), not logits.
Only ``logprobs`` (and ``values`` for the value loss) receive a gradient: old and reference
log-probabilities, advantages, returns and masks are constants.

As everywhere in :mod:`lm.losses`, each loss returns float32 **sums** and a **count**: sum
them over micro-batches and devices, divide once (``.mean`` / :func:`mean_of`). What
``count`` counts depends on ``normalize`` (``m`` the mask weights, ``ℓ`` the per-token loss):

    "token"     Σ_{b,t} m·ℓ / Σ_{b,t} m                      the global token mean (DAPO)
    "sequence"  Σ_b [(Σ_t m·ℓ) / (Σ_t m)] / #rows scored     mean over sequences of each
                                                             sequence's mean (GRPO)
    "constant"  Σ_{b,t} m·ℓ / (B·L_max)                      a fixed divisor (Dr. GRPO)

so ``sum`` is the numerator and ``count`` the denominator. "sequence" puts each row's own
mean in ``sum`` and counts the rows with at least one scored token (others add 0 to both);
"constant" counts ``B·L_max`` with ``L_max = max_len`` (default T), so the gradient of a
token does not depend on how many tokens its row or batch has. Each split of the batch by
rows adds up to the whole batch's (sum, count), hence the same mean and gradient.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lm.losses.sums import F32, mean_of, prepare_mask

_NORMALIZE = ("token", "sequence", "constant")
_KL_ESTIMATORS = ("k1", "k3")


class PolicyLossOutput(NamedTuple):
    """Summed statistics of :func:`policy_loss` (all float32); ``m`` is the mask."""
    sum: jax.Array                # []: numerator of the loss (see the module docstring)
    count: jax.Array              # []: its denominator for the chosen normalization
    clip_fraction_sum: jax.Array  # []: Σ m·[clipped term active] (no gradient)
    kl_sum: jax.Array             # []: Σ m·KL_t with the chosen estimator (0 without ref)
    ratio_sum: jax.Array          # []: Σ m·ratio_t (no gradient)
    token_count: jax.Array        # []: Σ m
    per_token_loss: jax.Array     # [B, T]: m·ℓ_t, exactly 0 where m = 0

    @property
    def mean(self):
        """sum / count, 0 when count is 0."""
        return mean_of(self.sum, self.count)

    @property
    def clip_fraction(self):
        """Fraction of scored tokens (by weight) whose gradient clipping removed."""
        return mean_of(self.clip_fraction_sum, self.token_count)


class ValueLossOutput(NamedTuple):
    """Summed statistics of :func:`value_loss` (all float32); ``m`` is the mask."""
    sum: jax.Array                # []: numerator of the loss
    count: jax.Array              # []: its denominator for the chosen normalization
    clip_fraction_sum: jax.Array  # []: Σ m·[clipped term active] (no gradient)
    token_count: jax.Array        # []: Σ m
    per_token_loss: jax.Array     # [B, T]: m·ℓ_t, exactly 0 where m = 0

    @property
    def mean(self):
        return mean_of(self.sum, self.count)

    @property
    def clip_fraction(self):
        return mean_of(self.clip_fraction_sum, self.token_count)


def _constant(x, name, shape):
    """float32 ``x`` of ``shape``, with no gradient."""
    x = jnp.asarray(x).astype(F32)
    if x.shape != shape:
        raise ValueError(f"{name} has shape {x.shape}, expected {shape} (the shape of the first "
                         "argument)")
    return jax.lax.stop_gradient(x)


def _is_zero(x):
    return isinstance(x, (int, float)) and x == 0


def _check_eps(name, value):
    if isinstance(value, (int, float)) and not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def _check_normalize(normalize, max_len):
    if normalize not in _NORMALIZE:
        raise ValueError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")
    if max_len is not None:
        if normalize != "constant":
            raise ValueError(f"max_len is used only by normalize='constant', got normalize="
                             f"{normalize!r} with max_len={max_len!r}")
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= 0:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")


def _normalized(per_token, mask, normalize, max_len):
    """(sum, count) of ``per_token = m·ℓ`` ``[B, T]`` for the chosen normalization."""
    if normalize == "token":
        return jnp.sum(per_token), jnp.sum(mask)
    if normalize == "sequence":
        row_weight = jnp.sum(mask, axis=1)
        scored = row_weight != 0
        row_mean = jnp.sum(per_token, axis=1) / jnp.where(scored, row_weight, 1.0)
        return jnp.sum(jnp.where(scored, row_mean, 0.0)), jnp.sum(scored.astype(F32))
    batch, length = per_token.shape
    return jnp.sum(per_token), jnp.asarray(batch * (length if max_len is None else max_len), F32)


def policy_loss(logprobs, old_logprobs, advantages, loss_mask, *, clip_eps=0.2, clip_eps_high=None,
                ref_logprobs=None, kl_coef=0.0, kl_estimator="k1", normalize="token",
                max_len=None) -> PolicyLossOutput:
    """PPO's clipped surrogate over sampled tokens, plus an optional KL penalty.

    Args:
      logprobs: ``[B, T]`` log π_θ(y_t) of the sampled tokens under the policy being trained
        (any float dtype; the only input that gets a gradient).
      old_logprobs: ``[B, T]`` log π_old(y_t) under the policy that sampled them.
      advantages: ``[B]`` one per sequence (GRPO; broadcast over its tokens) or ``[B, T]``
        one per token (GAE).
      loss_mask: ``[B, T]`` float weights m_t, 0 where no loss is taken. Masked positions may
        hold any value (even NaN or inf) in every other input.
      clip_eps: ε_low, the ratio is clipped to ``[1 - ε_low, 1 + ε_high]``.
      clip_eps_high: ε_high (DAPO's "clip-higher", e.g. 0.28); default ``clip_eps``.
      ref_logprobs: ``[B, T]`` log π_ref(y_t); required when ``kl_coef`` is not 0.
      kl_coef: β, the weight of the per-token KL penalty.
      kl_estimator: the per-token estimate of KL(π_θ‖π_ref) on tokens sampled from π_θ, with
        ``log ρ_t = log π_ref(y_t) - log π_θ(y_t)``:
        ``"k1"``: ``-log ρ_t`` (unbiased, can be negative; as a loss term its gradient is
        ∇ log π_θ, zero in expectation);
        ``"k3"``: ``ρ_t - log ρ_t - 1`` (Schulman's estimator: unbiased, always ≥ 0; GRPO's).
      normalize: ``"token"``, ``"sequence"`` or ``"constant"``: see the module docstring.
      max_len: L_max of ``"constant"`` (default T).

    Per token, with ``ratio_t = exp(log π_θ - log π_old)`` and the advantage A_t::

        ℓ_t = -min(ratio_t·A_t, clip(ratio_t, 1-ε_low, 1+ε_high)·A_t) + β·KL_t

    The clipped term is the smaller one (and then the token gets no surrogate gradient)
    exactly when ``A_t > 0 and ratio_t > 1+ε_high`` or ``A_t < 0 and ratio_t < 1-ε_low``;
    ``clip_fraction_sum`` counts those tokens. ``kl_sum = Σ m·KL_t`` whenever
    ``ref_logprobs`` is given, even with β = 0.
    """
    logprobs = jnp.asarray(logprobs).astype(F32)
    if logprobs.ndim != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {logprobs.shape}")
    shape = logprobs.shape
    old_logprobs = _constant(old_logprobs, "old_logprobs", shape)
    advantages = jax.lax.stop_gradient(jnp.asarray(advantages).astype(F32))
    if advantages.shape == shape[:1]:
        advantages = jnp.broadcast_to(advantages[:, None], shape)
    elif advantages.shape != shape:
        raise ValueError(f"advantages must be [B] = {shape[:1]} or [B, T] = {shape}, "
                         f"got {advantages.shape}")
    if jnp.shape(loss_mask) != shape:
        raise ValueError(f"loss_mask has shape {jnp.shape(loss_mask)}, expected {shape}")
    mask = prepare_mask(loss_mask, shape)
    _check_eps("clip_eps", clip_eps)
    _check_eps("clip_eps_high", clip_eps_high)
    if kl_estimator not in _KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {_KL_ESTIMATORS}, got {kl_estimator!r}")
    if ref_logprobs is None and not _is_zero(kl_coef):
        raise ValueError(f"kl_coef={kl_coef!r} needs ref_logprobs")
    _check_normalize(normalize, max_len)

    keep = mask != 0
    logprobs = jnp.where(keep, logprobs, 0.0)  # before any exp: masked garbage stays out
    log_ratio = logprobs - jnp.where(keep, old_logprobs, 0.0)
    ratio = jnp.exp(log_ratio)
    adv = jnp.where(keep, advantages, 0.0)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    clip_active = ((adv > 0) & (ratio > 1.0 + high)) | ((adv < 0) & (ratio < 1.0 - clip_eps))
    # = min(ratio·A, clip(ratio)·A), picking the branch explicitly: no gradient when clipped.
    surrogate = jnp.where(clip_active, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + high), ratio) * adv
    loss = -surrogate
    kl_sum = jnp.zeros((), F32)
    if ref_logprobs is not None:
        ref = jnp.where(keep, _constant(ref_logprobs, "ref_logprobs", shape), 0.0)
        log_rho = ref - logprobs
        kl = -log_rho if kl_estimator == "k1" else jnp.exp(log_rho) - log_rho - 1.0
        kl_sum = jnp.sum(mask * kl)
        loss = loss + kl_coef * kl
    per_token = mask * loss
    total, count = _normalized(per_token, mask, normalize, max_len)
    weigh = lambda v: jax.lax.stop_gradient(jnp.sum(mask * v))  # noqa: E731
    return PolicyLossOutput(total, count, weigh(clip_active.astype(F32)), kl_sum, weigh(ratio),
                            jnp.sum(mask), per_token)


def value_loss(values, old_values, returns, loss_mask, *, clip_eps=0.2, normalize="token",
               max_len=None) -> ValueLossOutput:
    """PPO's clipped value loss.

    Args:
      values: ``[B, T]`` V_θ(s_t) from the critic being trained (the only input that gets a
        gradient).
      old_values: ``[B, T]`` V_old(s_t) from the critic at rollout time.
      returns: ``[B, T]`` targets R_t (e.g. the returns of :func:`lm.losses.gae`).
      loss_mask: ``[B, T]`` float weights, as in :func:`policy_loss`.
      clip_eps: ε; ``None`` turns the clipping off (plain ``0.5·(V - R)²``).
      normalize, max_len: as in :func:`policy_loss`.

    Per token, with ``V_clip = V_old + clip(V - V_old, -ε, ε)``::

        ℓ_t = 0.5 · max((V_t - R_t)², (V_clip,t - R_t)²)

    The clipped term is active (and the token gets no gradient) where it is strictly the
    larger one; ``clip_fraction_sum`` counts those tokens.
    """
    values = jnp.asarray(values).astype(F32)
    if values.ndim != 2:
        raise ValueError(f"values must be [B, T], got shape {values.shape}")
    shape = values.shape
    old_values = _constant(old_values, "old_values", shape)
    returns = _constant(returns, "returns", shape)
    if jnp.shape(loss_mask) != shape:
        raise ValueError(f"loss_mask has shape {jnp.shape(loss_mask)}, expected {shape}")
    mask = prepare_mask(loss_mask, shape)
    if clip_eps is not None:
        _check_eps("clip_eps", clip_eps)
    _check_normalize(normalize, max_len)

    keep = mask != 0
    values = jnp.where(keep, values, 0.0)
    returns = jnp.where(keep, returns, 0.0)
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        clip_active = jnp.zeros(shape, bool)
        squared = unclipped
    else:
        old_values = jnp.where(keep, old_values, 0.0)
        clipped = (old_values + jnp.clip(values - old_values, -clip_eps, clip_eps) - returns) ** 2
        clip_active = clipped > unclipped
        squared = jnp.where(clip_active, clipped, unclipped)
    per_token = mask * 0.5 * squared
    total, count = _normalized(per_token, mask, normalize, max_len)
    clip_sum = jax.lax.stop_gradient(jnp.sum(mask * clip_active.astype(F32)))
    return ValueLossOutput(total, count, clip_sum, jnp.sum(mask), per_token)
