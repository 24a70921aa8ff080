"""Policy-gradient losses over sampled tokens (PPO, GRPO, DAPO, Dr. GRPO): the clipped
surrogate (and the GRPO family's variants: ``loss_type``, ``importance_sampling_level``) with an
optional KL penalty toward a reference policy, the KL estimators themselves, and PPO's clipped
value loss.

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
_KL_ESTIMATORS = ("k1", "k2", "k3")
_IS_LEVELS = ("token", "sequence")
# the GRPO family (TRL's loss_type names) → the normalization each one uses
LOSS_TYPES = {"grpo": "sequence", "bnpo": "token", "dapo": "token", "dr_grpo": "constant", "cispo": "token",
              "sapo": "sequence"}


class PolicyLossOutput(NamedTuple):
    """Summed statistics of :func:`policy_loss` (all float32); ``m`` is the mask."""
    sum: jax.Array                # []: numerator of the loss (see the module docstring)
    count: jax.Array              # []: its denominator for the chosen normalization
    clip_fraction_sum: jax.Array  # []: Σ m·[clipped term active] (no gradient)
    kl_sum: jax.Array             # []: Σ m·k3_t, unbiased estimate of KL(π‖π_ref) (0 without ref)
    ratio_sum: jax.Array          # []: Σ m·ratio_t (no gradient)
    token_count: jax.Array        # []: Σ m
    per_token_loss: jax.Array     # [B, T]: m·ℓ_t, exactly 0 where m = 0
    kl_penalty_sum: jax.Array     # []: Σ m·KL_t with the estimator in the loss (0 without ref)

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


def kl_penalty(logprobs, ref_logprobs, estimator="k2"):
    """Per-token KL penalty ``[B, T]`` on tokens sampled from π_θ, as a loss term.

    With ``d = log π_θ(y) − log π_ref(y)`` and ``r = π_ref(y)/π_θ(y) = exp(−d)``:

      ``"k1"``  ``d``                Its value is unbiased for KL(π_θ‖π_ref), but with the samples
                                     held fixed its gradient is ∇log π_θ(y), whose expectation
                                     under π_θ is 0: as a loss term it penalizes nothing.
      ``"k2"``  ``½·d²``             Biased as a value, but its gradient ``d·∇log π_θ(y)`` has
                                     expectation ``Σ_y π_θ(y)·d(y)·∇log π_θ(y) = ∇KL(π_θ‖π_ref)``
                                     exactly: the reverse KL the objective names (the default).
      ``"k3"``  ``r − 1 − log r``    Unbiased and ≥ 0 as a value (Schulman; TRL's GRPO term), but
                                     its expected gradient is ``Σ_y (π_θ − π_ref)∇log π_θ =
                                     ∇KL(π_ref‖π_θ)``, the forward KL.

    To put the reverse KL in the reward instead, use :func:`kl_rewards` (−β·k1 per token as a
    reward: expected policy gradient β∇KL(π_θ‖π_ref)). All float32; the gradient flows to
    ``logprobs`` only.
    """
    if estimator not in _KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {_KL_ESTIMATORS}, got {estimator!r}")
    d = jnp.asarray(logprobs).astype(F32) - jax.lax.stop_gradient(jnp.asarray(ref_logprobs).astype(F32))
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    return jnp.exp(-d) + d - 1.0


def kl_rewards(logprobs, ref_logprobs, loss_mask, kl_coef):
    """The KL penalty placed in the reward: ``−β·(log π(y_t) − log π_ref(y_t))`` per scored token,
    ``[B, T]`` float32 with no gradient (0 where the mask is 0).

    Used as (part of) the advantage of a policy-gradient loss, ``−A_t·∇log π(y_t)`` with
    ``A_t = −β·k1_t`` has expectation ``β·∇KL(π‖π_ref)`` on tokens sampled from π: the gradient of
    ``J = E[r] − β·KL(π‖π_ref)`` (summed over a sequence's tokens it is the sequence's sampled KL,
    what lm's GRPO subtracts from its reward with ``rl.kl_penalty='reward'``; PPO adds it per
    token before GAE).
    """
    mask = jax.lax.stop_gradient(jnp.asarray(loss_mask).astype(F32))
    keep = mask != 0
    d = jnp.where(keep, jnp.asarray(logprobs).astype(F32) - jnp.asarray(ref_logprobs).astype(F32), 0.0)
    return jax.lax.stop_gradient(-jnp.asarray(kl_coef, F32) * d * keep)


def _loss_type_normalize(loss_type, normalize):
    if loss_type is None:
        return "token" if normalize is None else normalize
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES} (or None), got {loss_type!r}")
    return LOSS_TYPES[loss_type] if normalize is None else normalize


def policy_loss(logprobs, old_logprobs, advantages, loss_mask, *, clip_eps=0.2, clip_eps_high=None,
                ref_logprobs=None, kl_coef=0.0, kl_estimator="k2", normalize=None, max_len=None,
                loss_type=None, importance_sampling_level="token", sapo_temperature_pos=1.0,
                sapo_temperature_neg=1.05) -> PolicyLossOutput:
    """The policy-gradient loss over sampled tokens (PPO, GRPO and its family), plus a KL penalty.

    Args:
      logprobs: ``[B, T]`` log π_θ(y_t) of the sampled tokens under the policy being trained
        (any float dtype; the only input that gets a gradient). These, the old and the reference
        log-probs must all be of the distribution the tokens were sampled from (temperature and
        filters applied: :func:`lm.sampling.behaviour_logprobs`).
      old_logprobs: ``[B, T]`` log π_old(y_t) under the policy that sampled them.
      advantages: ``[B]`` one per sequence (GRPO; broadcast over its tokens) or ``[B, T]``
        one per token (GAE).
      loss_mask: ``[B, T]`` float weights m_t, 0 where no loss is taken. Masked positions may
        hold any value (even NaN or inf) in every other input.
      clip_eps: ε_low, the ratio is clipped to ``[1 - ε_low, 1 + ε_high]``.
      clip_eps_high: ε_high (DAPO's "clip-higher", e.g. 0.28); default ``clip_eps``. For
        ``loss_type='cispo'`` the importance weight is capped at ``1 + ε_high`` (TRL's
        ``epsilon_high`` for CISPO is that cap itself, e.g. 5.0 = lm's ε_high 4.0).
      ref_logprobs: ``[B, T]`` log π_ref(y_t); required when ``kl_coef`` is not 0.
      kl_coef: β, the weight of the per-token KL penalty.
      kl_estimator: ``"k2"`` (default), ``"k1"`` or ``"k3"``: the per-token penalty term of
        :func:`kl_penalty`, whose docstring gives each one's expected gradient on on-policy
        samples: k2 gives β∇KL(π‖π_ref), k1 gives 0, k3 gives β∇KL(π_ref‖π).
      normalize: ``"token"``, ``"sequence"`` or ``"constant"`` (module docstring); default: the
        one of ``loss_type``, or ``"token"`` without one.
      max_len: L_max of ``"constant"`` (default T).
      loss_type: None (the clipped surrogate, normalized per ``normalize``) or one of the GRPO
        family (TRL's names), each with its normalization:
          ``"grpo"``     clipped surrogate, per-sequence mean then mean over sequences
          ``"bnpo"``     clipped surrogate, token mean (TRL: of each micro-batch; here of the
                         whole batch, the only split-invariant choice)
          ``"dapo"``     clipped surrogate, global token mean
          ``"dr_grpo"``  clipped surrogate, ``Σ m·ℓ / (B·L_max)`` (use with unscaled advantages)
          ``"cispo"``    ``ℓ_t = −sg(min(w_t, 1+ε_high))·A_t·log π_θ(y_t)``: the clipped importance
                         weight, stop-gradient, times the log-prob, so every token keeps its
                         gradient (MiniMax-M1); token mean
          ``"sapo"``     ``ℓ_t = −(4/τ)·σ(τ·(w_t − 1))·A_t``, τ = ``sapo_temperature_pos`` where
                         A > 0 else ``sapo_temperature_neg``: a soft gate in place of the hard
                         clip (its gradient at w = 1 is the unclipped one); per-sequence mean
      importance_sampling_level: ``"token"``: ``w_t = π_θ(y_t)/π_old(y_t)``; ``"sequence"``
        (GSPO): one length-normalized ratio per sequence,
        ``w = exp(Σ_t m_t·(log π_θ − log π_old) / Σ_t m_t)``, used at every token of the row (its
        gradient reaches every token).
      sapo_temperature_pos, sapo_temperature_neg: SAPO's τ for positive / other advantages.

    Per token, with the importance weight ``w_t`` above and the advantage A_t, the clipped
    surrogate is::

        ℓ_t = -min(w_t·A_t, clip(w_t, 1-ε_low, 1+ε_high)·A_t) + β·KL_t

    The clipped term is the smaller one (and then the token gets no surrogate gradient)
    exactly when ``A_t > 0 and w_t > 1+ε_high`` or ``A_t < 0 and w_t < 1-ε_low``;
    ``clip_fraction_sum`` counts those tokens (for CISPO: ``A_t > 0 and w_t > 1+ε_high``, the
    weight capped; for SAPO: 0). ``kl_sum = Σ m·k3_t`` (an unbiased, non-negative estimate of
    KL(π_θ‖π_ref) on on-policy tokens, whatever the penalty's estimator) and ``kl_penalty_sum =
    Σ m·KL_t`` (the estimator in the loss) are reported whenever ``ref_logprobs`` is given,
    even with β = 0.
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
    normalize = _loss_type_normalize(loss_type, normalize)
    _check_normalize(normalize, max_len)
    if importance_sampling_level not in _IS_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {_IS_LEVELS}, got "
                         f"{importance_sampling_level!r}")

    keep = mask != 0
    logprobs = jnp.where(keep, logprobs, 0.0)  # before any exp: masked garbage stays out
    log_ratio = logprobs - jnp.where(keep, old_logprobs, 0.0)
    if importance_sampling_level == "sequence":  # GSPO: the length-normalized sequence log-ratio
        row_weight = jnp.sum(mask, axis=1, keepdims=True)
        log_ratio = jnp.sum(mask * log_ratio, axis=1, keepdims=True) / jnp.where(row_weight > 0, row_weight, 1.0)
        log_ratio = jnp.where(keep, jnp.broadcast_to(log_ratio, shape), 0.0)
    ratio = jnp.exp(log_ratio)
    adv = jnp.where(keep, advantages, 0.0)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    if loss_type == "cispo":
        clip_active = (adv > 0) & (ratio > 1.0 + high)
        weight = jax.lax.stop_gradient(jnp.minimum(ratio, 1.0 + high))
        loss = -weight * adv * logprobs
    elif loss_type == "sapo":
        clip_active = jnp.zeros(shape, bool)
        tau = jnp.where(adv > 0, jnp.asarray(sapo_temperature_pos, F32), jnp.asarray(sapo_temperature_neg, F32))
        loss = -(4.0 / tau) * jax.nn.sigmoid(tau * (ratio - 1.0)) * adv
    else:
        clip_active = ((adv > 0) & (ratio > 1.0 + high)) | ((adv < 0) & (ratio < 1.0 - clip_eps))
        # = min(w·A, clip(w)·A), picking the branch explicitly: no gradient when clipped.
        loss = -jnp.where(clip_active, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + high), ratio) * adv
    kl_sum = kl_penalty_sum = jnp.zeros((), F32)
    if ref_logprobs is not None:
        ref = jnp.where(keep, _constant(ref_logprobs, "ref_logprobs", shape), 0.0)
        kl = kl_penalty(logprobs, ref, kl_estimator)
        kl_penalty_sum = jax.lax.stop_gradient(jnp.sum(mask * kl))
        kl_sum = jax.lax.stop_gradient(jnp.sum(mask * kl_penalty(logprobs, ref, "k3")))
        loss = loss + kl_coef * kl
    per_token = mask * loss
    total, count = _normalized(per_token, mask, normalize, max_len)
    weigh = lambda v: jax.lax.stop_gradient(jnp.sum(mask * v))  # noqa: E731
    return PolicyLossOutput(total, count, weigh(clip_active.astype(F32)), kl_sum, weigh(ratio),
                            jnp.sum(mask), per_token, kl_penalty_sum)


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

    Per token, with ``V_clip = clip(V, V_old - ε, V_old + ε)`` (TRL's ``clip_by_value``)::

        ℓ_t = 0.5 · max((V_t - R_t)², (V_clip,t - R_t)²)

    The clipped term is active (and the token gets no gradient) where it is strictly the
    larger one, which needs ``V_clip ≠ V``: a token whose value clipping did not change is never
    counted (V_clip is then V itself, bit for bit); ``clip_fraction_sum`` counts the active ones.
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
        clipped = (jnp.clip(values, old_values - clip_eps, old_values + clip_eps) - returns) ** 2
        clip_active = clipped > unclipped
        squared = jnp.where(clip_active, clipped, unclipped)
    per_token = mask * 0.5 * squared
    total, count = _normalized(per_token, mask, normalize, max_len)
    clip_sum = jax.lax.stop_gradient(jnp.sum(mask * clip_active.astype(F32)))
    return ValueLossOutput(total, count, clip_sum, jnp.sum(mask), per_token)
