"""Advantage estimates for policy-gradient training (GRPO, PPO): group-relative advantages,
generalized advantage estimation (GAE), and masked whitening.

These are targets, not losses: :func:`group_advantages` and :func:`gae` stop the gradient, and
all three work in float32. Unlike the losses they are statistics of a whole batch (a group, a
row, or the batch), so compute them once on the whole rollout batch, before it is split into
micro-batches or over devices.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lm.losses.sums import F32, mean_of

_SCALES = ("group", "batch", "none")


def group_advantages(rewards, group_size, *, scale="group", eps=1e-6, ddof=0):
    """Group-relative advantages (GRPO): each reward minus the mean of its group, scaled.

    Args:
      rewards: ``[B]`` one scalar reward per sampled completion, ``B = n_groups · G``, laid
        out group-major: rows ``g·G … g·G+G-1`` are the G samples of prompt g.
      group_size: G, a positive int dividing B.
      scale: what the centred reward is divided by:
        ``"group"``  the std of its group (GRPO): ``A_i = (r_i - mean_g) / (std_g + eps)``;
        ``"batch"``  the std of all B rewards: ``A_i = (r_i - mean_g) / (std_B + eps)``;
        ``"none"``   nothing (Dr. GRPO): ``A_i = r_i - mean_g``.
      eps: added to the std; a group whose rewards are all equal gets advantages 0.
      ddof: 0 (default): the population std ``sqrt(mean((r - mean r)²))``; 1: the sample std
        (``sqrt(Σ(r - mean r)² / (n - 1))``, torch's default: TRL's GRPOTrainer, with eps=1e-4).
    Returns ``[B]`` float32 advantages, with no gradient (``stop_gradient``).
    """
    rewards = jax.lax.stop_gradient(jnp.asarray(rewards).astype(F32))
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be [B], got shape {rewards.shape}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"rewards has B={rewards.shape[0]} rows, not a multiple of "
                         f"group_size={group_size}")
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {_SCALES}, got {scale!r}")
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 or 1, got {ddof!r}")
    grouped = rewards.reshape(-1, group_size)                       # [n_groups, G]
    centred = grouped - jnp.mean(grouped, axis=1, keepdims=True)
    if scale == "group":
        dof = max(group_size - ddof, 1)
        centred = centred / (jnp.sqrt(jnp.sum(centred**2, axis=1, keepdims=True) / dof) + eps)
    elif scale == "batch":
        centred = centred / (jnp.std(rewards, ddof=ddof if rewards.shape[0] > 1 else 0) + eps)
    return jax.lax.stop_gradient(centred.reshape(-1))


def gae(rewards, values, loss_mask, gamma, lam):
    """Generalized advantage estimation over the scored tokens of each row.

    Args:
      rewards: ``[B, T]`` reward r_t received after token t (usually 0 except at the last
        scored token, where a sequence-level reward goes; a per-token KL penalty may add to
        every scored token).
      values: ``[B, T]`` the critic's V(s_t) at each token.
      loss_mask: ``[B, T]``; a position is a step of the episode where ``loss_mask != 0``
        (the weight's size does not matter here).
      gamma: discount γ; lam: the GAE λ (floats or scalar arrays).

    Each row is one whole episode made of its scored positions only, in order. Positions
    with mask 0 (prompt, padding, or holes such as tool output in the middle) are not
    steps: they contribute no TD term and do not break the chain, and their rewards and
    values are ignored. With ``s`` the next scored position after ``t`` in the same row,
    ``V_next = V_s``, or 0 after the row's last scored token (terminal, no bootstrap)::

        δ_t = r_t + γ·V_next - V_t
        A_t = δ_t + γ·λ·A_s        (A_s = 0 after the last scored token)

    so ``A_t = Σ_k (γλ)^k δ_{t_k}`` over the scored positions t = t_0 < t_1 < … of the row.
    With γ = λ = 1, ``A_t = (Σ_{k≥0} r_{t_k}) - V_t``: reward-to-go minus value.
    Computed by a reverse ``lax.scan`` over T. A truncated episode that should bootstrap
    from a last value can add ``γ·V_last`` to its last scored reward.

    Returns ``(advantages, returns)``, both ``[B, T]`` float32 with ``returns = advantages
    + values``, exactly 0 at masked positions, and no gradient.
    """
    rewards, values, mask = (jax.lax.stop_gradient(jnp.asarray(v).astype(F32))
                             for v in (rewards, values, loss_mask))
    if rewards.ndim != 2 or values.shape != rewards.shape or mask.shape != rewards.shape:
        raise ValueError(f"rewards {rewards.shape}, values {values.shape} and loss_mask "
                         f"{mask.shape} must all be the same [B, T]")
    gamma = jax.lax.stop_gradient(jnp.asarray(gamma, F32))
    lam = jax.lax.stop_gradient(jnp.asarray(lam, F32))
    scored = mask != 0
    rewards = jnp.where(scored, rewards, 0.0)
    values = jnp.where(scored, values, 0.0)

    def step(carry, xs):
        next_value, next_adv = carry           # [B]: of the next scored position (0 past the end)
        r, v, s = xs
        adv = r + gamma * next_value - v + gamma * lam * next_adv
        adv = jnp.where(s, adv, 0.0)
        carry = (jnp.where(s, v, next_value), jnp.where(s, adv, next_adv))
        return carry, adv

    zeros = jnp.zeros(rewards.shape[:1], F32)
    _, adv_t = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, scored.T), reverse=True)
    advantages = adv_t.T
    returns = jnp.where(scored, advantages + values, 0.0)
    return jax.lax.stop_gradient(advantages), jax.lax.stop_gradient(returns)


def whiten(x, mask, shift_mean=True, *, eps=1e-8):
    """Masked whitening (PPO's advantage normalization) over all scored positions.

    With weights ``m = mask`` (``[B, T]``, or any shape matching ``x``)::

        μ = Σ m·x / Σ m        σ² = Σ m·(x - μ)² / Σ m     (population variance)
        whiten(x) = (x - μ) / sqrt(σ² + eps)      (+ μ again if not shift_mean)

    ``shift_mean=False`` rescales only, keeping the mean. Output is 0 where ``mask == 0``;
    with no scored position it is all 0. Float32; it keeps the gradient of ``x`` (stop it
    yourself if ``x`` should not get one); the mask never carries one.
    """
    x = jnp.asarray(x).astype(F32)
    mask = jax.lax.stop_gradient(jnp.asarray(mask).astype(F32))
    if mask.shape != x.shape:
        raise ValueError(f"mask {mask.shape} must match x {x.shape}")
    scored = mask != 0
    x = jnp.where(scored, x, 0.0)
    count = jnp.sum(mask)
    mean = mean_of(jnp.sum(mask * x), count)
    var = mean_of(jnp.sum(mask * jnp.where(scored, x - mean, 0.0) ** 2), count)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(scored, out, 0.0)


def equal_reward_groups(rewards, group_size):
    """``[B]`` rewards (group-major, as :func:`group_advantages`) → ``[B / G]`` bool: the groups
    whose G rewards are all equal. Their group advantages are 0, so they carry no policy
    gradient: DAPO's dynamic sampling drops them (and samples more) rather than train on them."""
    grouped = jnp.asarray(rewards).reshape(-1, group_size)
    return jnp.all(grouped == grouped[:, :1], axis=1)


def overlong_penalty(lengths, max_len, cache_len):
    """DAPO's soft overlong punishment, added to the reward of each completion ``[B]`` float32::

        0                              |y| ≤ L_max − L_cache
        (L_max − L_cache − |y|)/L_cache  L_max − L_cache < |y| ≤ L_max   (linear, 0 → −1)
        −1                             |y| > L_max

    ``lengths``: ``[B]`` completion lengths |y| in tokens; ``max_len`` L_max; ``cache_len``
    L_cache (> 0, ≤ L_max). Also TRL's ``get_soft_overlong_punishment`` reward function."""
    if not 0 < cache_len <= max_len:
        raise ValueError(f"overlong_penalty needs 0 < cache_len <= max_len, got cache_len={cache_len}, "
                         f"max_len={max_len}")
    n = jnp.asarray(lengths).astype(F32)
    soft = (max_len - cache_len - n) / cache_len
    return jnp.where(n <= max_len - cache_len, 0.0, jnp.where(n <= max_len, soft, -1.0)).astype(F32)
