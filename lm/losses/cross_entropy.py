"""Token-level cross-entropy against integer targets: explicit logits, or fused with the output
projection so the ``[..., V]`` logits are never built.

Notation: logits ``x`` of shape ``[..., V]`` give the model distribution
``q = softmax(x)``, ``log q_v = x_v - lse(x)``, ``lse(x) = log Σ_v exp x_v``.
For an integer target ``y`` the per-token loss is the cross-entropy against the
one-hot distribution, which collapses to the negative log-likelihood::

    H(onehot(y), q) = -Σ_v [v = y] log q_v = -log q_y = lse(x) - x_y

Minimizing its sum over a corpus is maximum likelihood (seed 000): the
cross-entropy H(p, q) = H(p) + KL(p‖q), and H(p) does not depend on the model.

Every loss returns a **sum** and a **count** (the total of the float weights
``mask``), never only a mean: sum the pairs over micro-batches and devices,
then divide once with :func:`mean_of`.  Splitting a batch then cannot change
the loss or its gradient, and an all-masked batch gives 0, not NaN.
All math is in float32 whatever the input dtype.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lm.losses.sums import F32, mean_of
from lm.losses.sums import prepare_mask as _prepare_mask

_CHUNK_BYTES = 64 * 2**20  # auto chunk: about this many bytes of f32 logits per chunk
_DK_BLOCK_ELEMS = 8 * 2**20  # kernel-gradient update block: [D, 8Mi/D] f32 = 32 MiB


class LossOutput(NamedTuple):
    """Summed statistics of a token-level cross-entropy (all float32).

    ``[...]`` is the token shape of ``targets`` (e.g. ``[B, T]``); ``m_t`` the mask.
    """
    sum: jax.Array             # []: Σ m_t·loss_t, loss_t = smoothed CE + z-loss (the objective)
    count: jax.Array           # []: Σ m_t
    nll_sum: jax.Array         # []: Σ m_t·(-log q(y_t)), no smoothing, no z-loss (perplexity)
    z_loss_sum: jax.Array      # []: Σ m_t·coef·lse_t²
    correct_sum: jax.Array     # []: Σ m_t·[argmax x_t = y_t]  (no gradient)
    per_token_loss: jax.Array  # [...]: m_t·loss_t, exactly 0 where m_t = 0
    target_logprobs: jax.Array  # [...]: log q(y_t), not masked (NaN for an out-of-range y_t)

    @property
    def mean(self):
        """sum / count, 0 when count is 0."""
        return mean_of(self.sum, self.count)

    @property
    def accuracy(self):
        """correct_sum / count, 0 when count is 0."""
        return mean_of(self.correct_sum, self.count)



def _token_stats(logits, targets, z_loss, label_smoothing):
    """Per-token terms from f32 logits ``[..., V]`` and int targets ``[...]``.

    With α = label_smoothing the target distribution is (1-α)·onehot(y) + α/V, so
    ``loss = (1-α)(lse - x_y) + α(lse - mean_v x_v) + z·lse²``.
    An out-of-range target yields NaN (loud), unless its position is masked.
    """
    vocab = logits.shape[-1]
    lse = jax.nn.logsumexp(logits, axis=-1)
    valid = (targets >= 0) & (targets < vocab)
    safe = jnp.where(valid, targets, 0)
    target_logit = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    logprob = jnp.where(valid, target_logit - lse, jnp.nan)
    nll = -logprob
    zl = z_loss * lse**2
    loss = (1.0 - label_smoothing) * nll + label_smoothing * (lse - jnp.mean(logits, axis=-1)) + zl
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(F32)
    return loss, nll, zl, logprob, correct, lse


def _masked_sums(mask, loss, nll, zl, correct):
    keep = mask != 0
    per_token = jnp.where(keep, loss, 0.0) * mask
    weigh = lambda v: jnp.sum(jnp.where(keep, v, 0.0) * mask)
    return jnp.sum(per_token), weigh(nll), weigh(zl), weigh(correct), per_token


def cross_entropy(logits, targets, mask=None, *, z_loss=0.0, label_smoothing=0.0) -> LossOutput:
    """Next-token cross-entropy against integer targets.

    Args:
      logits: ``[..., V]`` any float dtype (upcast to float32 inside).
      targets: ``[...]`` int, already shifted (``targets[t]`` follows ``inputs[t]``).
      mask: ``[...]`` float weights (default all ones). Masked targets may hold
        any value: they change neither the loss nor the gradient.
      z_loss: coefficient z of the auxiliary ``z·lse(x)²`` term.
      label_smoothing: α, the target becomes ``(1-α)·onehot(y) + α·uniform``.

    Per token: ``loss_t = (1-α)(lse_t - x_{t,y}) + α(lse_t - mean_v x_{t,v}) + z·lse_t²``.
    Returns a :class:`LossOutput` of sums; ``.mean`` divides once.
    """
    logits = jnp.asarray(logits).astype(F32)
    targets = jnp.asarray(targets)
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {logits.shape} must be targets {targets.shape} + [V]")
    mask = _prepare_mask(mask, targets.shape)
    loss, nll, zl, logprob, correct, _ = _token_stats(logits, targets, z_loss, label_smoothing)
    total, nll_sum, z_sum, correct_sum, per_token = _masked_sums(mask, loss, nll, zl, correct)
    return LossOutput(total, jnp.sum(mask), nll_sum, z_sum, jax.lax.stop_gradient(correct_sum),
                      per_token, logprob)


# ----------------------------------------------------------------------------
# Fused output projection + cross-entropy: logits computed chunk by chunk.
# ----------------------------------------------------------------------------
#
# For one token with logits x = W^T h, target y, softmax q, lse ℓ:
#   d nll/dx = q - e_y        d(lse - mean x)/dx = q - 1/V
#   d(z ℓ²)/dx = 2 z ℓ q      d log q_y/dx = e_y - q
# so any cotangent on the outputs gives dx = a·q + b·e_y + c/V with per-token
# scalars (a, b, c); then dh = W dx and dW = Σ_t h_t dx_t^T.
#
# The forward pass of value_and_grad computes, chunk by chunk, the gradient of
# `sum` for a unit cotangent (3 matmuls per chunk, like the materialized
# version).  The backward pass scales it by the incoming cotangent; cotangents on
# the other outputs (per_token_loss, target_logprobs, nll_sum, z_loss_sum),
# known to be nonzero only at trace time (symbolic zeros), are handled by a second
# pass that recomputes each chunk's logits.  No [N, V] array is ever built.

def _logits(h, kernel, layout):
    dims = ((1,), (0,)) if layout == "dv" else ((1,), (1,))
    return jax.lax.dot_general(h, kernel, (dims, ((), ())), preferred_element_type=F32)


def _dx(x, lse, targets, a, b, c):
    """``a·softmax(x) + b·onehot(y) + c/V`` for a chunk: x ``[C, V]``, the rest ``[C]``."""
    vocab = x.shape[-1]
    onehot = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1) == targets[:, None]
    return (a[:, None] * jnp.exp(x - lse[:, None]) + jnp.where(onehot, b[:, None], 0.0)
            + (c / vocab)[:, None])


def _dh_of_chunk(dx, kernel, layout):
    """dh ``[C, D]`` = dx Wᵀ for dx ``[C, V]``."""
    dims = ((1,), (1,)) if layout == "dv" else ((1,), (0,))
    return jax.lax.dot_general(dx, kernel, (dims, ((), ())), preferred_element_type=F32)


def _add_dk_of_chunk(dk, dx, h, layout):
    """``dk += h_cᵀ dx`` (layout 'dv', dk ``[D, V]``) or ``dxᵀ h_c`` ('vd', ``[V, D]``).

    Done one vocabulary block at a time in a loop (a loop, so that XLA cannot
    schedule all the block products at once), updating dk in place: no second
    kernel-sized temporary (the product) exists beside the accumulator.
    """
    vocab, dim = dx.shape[1], h.shape[1]
    block = min(vocab, max(128, _DK_BLOCK_ELEMS // dim))

    def update(dk, start, size):
        dx_b = jax.lax.dynamic_slice_in_dim(dx, start, size, axis=1)
        if layout == "dv":
            prod = jax.lax.dot_general(h, dx_b, (((0,), (0,)), ((), ())), preferred_element_type=F32)
            at = (0, start)
        else:
            prod = jax.lax.dot_general(dx_b, h, (((0,), (0,)), ((), ())), preferred_element_type=F32)
            at = (start, 0)
        return jax.lax.dynamic_update_slice(dk, jax.lax.dynamic_slice(dk, at, prod.shape) + prod, at)

    n_full = vocab // block
    if n_full == 1:
        dk = update(dk, 0, block)
    else:
        dk = jax.lax.fori_loop(0, n_full, lambda i, dk: update(dk, i * block, block), dk)
    if vocab % block:
        dk = update(dk, n_full * block, vocab % block)
    return dk


def _chunked(xs, chunk):
    return jax.tree.map(lambda v: v.reshape((v.shape[0] // chunk, chunk) + v.shape[1:]), xs)


def _forward(chunk, layout, hidden, kernel, targets, mask, z_loss, smoothing, want_h, want_k):
    """Loss statistics; with want_h/want_k also the gradient of `sum` (unit cotangent)."""
    k_shape = kernel.shape

    def step(carry, xs):
        h, t, m = xs
        x = _logits(h, kernel, layout)
        loss, nll, zl, logprob, correct, lse = _token_stats(x, t, z_loss, smoothing)
        total, nll_sum, z_sum, correct_sum, per_token = _masked_sums(m, loss, nll, zl, correct)
        acc, dk_acc = carry
        acc = acc + jnp.stack([total, nll_sum, z_sum, correct_sum])
        dh = None
        if want_h or want_k:
            w = jnp.where(m != 0, m, 0.0)  # weight of each token in `sum`
            dx = _dx(x, lse, t, w * (1.0 + 2.0 * z_loss * lse), -(1.0 - smoothing) * w, -smoothing * w)
            dh = _dh_of_chunk(dx, kernel, layout) if want_h else None
            if want_k:
                dk_acc = _add_dk_of_chunk(dk_acc, dx, h, layout)
        return (acc, dk_acc), (per_token, logprob, lse, dh)

    dk0 = jnp.zeros(k_shape, F32) if want_k else None
    (acc, dk), (per_token, logprob, lse, dh) = jax.lax.scan(
        step, (jnp.zeros(4, F32), dk0), _chunked((hidden, targets, mask), chunk))
    flat = lambda v: None if v is None else v.reshape((-1,) + v.shape[2:])
    stats = (acc[0], acc[1], acc[2], acc[3], flat(per_token), flat(logprob))
    return stats, flat(lse), flat(dh), dk


def _backward_recompute(chunk, layout, hidden, kernel, targets, lse, coefs, want_h, want_k):
    """dh, dW for per-token coefficients (a, b, c) ``[N]`` each, recomputing logits."""

    def step(dk_acc, xs):
        h, t, l, a, b, c = xs
        dx = _dx(_logits(h, kernel, layout), l, t, a, b, c)
        dh = _dh_of_chunk(dx, kernel, layout) if want_h else None
        return (_add_dk_of_chunk(dk_acc, dx, h, layout) if want_k else None), dh

    dk0 = jnp.zeros(kernel.shape, F32) if want_k else None
    dk, dh = jax.lax.scan(step, dk0, _chunked((hidden, targets, lse) + coefs, chunk))
    return (None if dh is None else dh.reshape(hidden.shape)), dk


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused_core(chunk, layout, hidden, kernel, targets, mask, z_loss, smoothing):
    stats, _, _, _ = _forward(chunk, layout, hidden, kernel, targets, mask, z_loss, smoothing,
                              False, False)
    return stats


def _fused_fwd(chunk, layout, hidden, kernel, targets, mask, z_loss, smoothing):
    want_h, want_k = hidden.perturbed, kernel.perturbed
    args = [v.value for v in (hidden, kernel, targets, mask, z_loss, smoothing)]
    stats, lse, dh, dk = _forward(chunk, layout, *args, want_h, want_k)
    return stats, (*args, lse, dh, dk, want_h, want_k)


def _fused_bwd(chunk, layout, res, cts):
    hidden, kernel, targets, mask, z_loss, smoothing, lse, dh_sum, dk_sum, want_h, want_k = res
    g_sum, g_nll, g_z, _, g_tok, g_logprob = cts
    zero = lambda g: isinstance(g, jax.custom_derivatives.SymbolicZero)
    dh = jnp.zeros(hidden.shape, F32) if want_h else None
    dk = jnp.zeros(kernel.shape, F32) if want_k else None
    if not zero(g_sum):
        dh = dh + g_sum * dh_sum if want_h else None
        dk = dk + g_sum * dk_sum if want_k else None
    if not all(zero(g) for g in (g_nll, g_z, g_tok, g_logprob)):
        keep = mask != 0
        vocab = kernel.shape[1] if layout == "dv" else kernel.shape[0]
        valid = (targets >= 0) & (targets < vocab)
        as_vec = lambda g: jnp.zeros_like(lse) + (0.0 if zero(g) else g)
        c_loss = jnp.where(keep, mask * as_vec(g_tok), 0.0)
        c_nll = jnp.where(keep, mask * as_vec(g_nll), 0.0)
        c_z = jnp.where(keep, mask * as_vec(g_z), 0.0)
        c_lp = jnp.where(valid, as_vec(g_logprob), 0.0)
        two_z_lse = 2.0 * z_loss * lse
        a = c_loss * (1.0 + two_z_lse) + c_nll + c_z * two_z_lse - c_lp
        b = -(1.0 - smoothing) * c_loss - c_nll + c_lp
        c = -smoothing * c_loss
        dh2, dk2 = _backward_recompute(chunk, layout, hidden, kernel, targets, lse, (a, b, c),
                                       want_h, want_k)
        dh = dh + dh2 if want_h else None
        dk = dk + dk2 if want_k else None
    cast = lambda g, like: None if g is None else g.astype(like.dtype)
    return (cast(dh, hidden), cast(dk, kernel), None, None, None, None)


_fused_core.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def fused_cross_entropy(hidden, kernel, targets, mask=None, *, chunk_size=None, z_loss=0.0,
                        label_smoothing=0.0, kernel_layout="dv") -> LossOutput:
    """:func:`cross_entropy` of ``logits = hidden @ kernel`` without building the logits.

    Args:
      hidden: ``[..., D]`` final hidden states (e.g. ``[B, T, D]`` or ``[N, D]``).
      kernel: output projection, ``[D, V]`` (``kernel_layout='dv'``) or ``[V, D]``
        (``'vd'``, a tied embedding table used as is: logits = hidden @ kernelᵀ).
      targets, mask, z_loss, label_smoothing: as in :func:`cross_entropy`, ``[...]``.
      chunk_size: tokens per chunk (static). Default: about 64 MiB of f32 logits,
        ``[chunk, V]``, at a time. Any N works; the last chunk is padded and masked.

    Only ``[chunk, V]`` logits exist at any time, forward or backward.  Gradients
    flow to ``hidden`` and ``kernel`` (in their dtypes; the mask and coefficients
    get none) and from every output, ``target_logprobs`` included.  Reverse mode
    only (custom VJP). Under differentiation the gradient of ``sum`` is computed
    in the forward pass (3 matmuls per chunk, as with materialized logits) and
    kept until the backward pass (one f32 buffer of the kernel's shape, which
    becomes the kernel's gradient); cotangents on the other outputs add a pass
    that recomputes each chunk's logits.
    """
    if kernel_layout not in ("dv", "vd"):
        raise ValueError(f"kernel_layout must be 'dv' ([D, V]) or 'vd' ([V, D]), got {kernel_layout!r}")
    hidden, kernel, targets = jnp.asarray(hidden), jnp.asarray(kernel), jnp.asarray(targets)
    dim = hidden.shape[-1]
    k_dim, vocab = (-1, 0) if kernel.ndim != 2 else (
        kernel.shape if kernel_layout == "dv" else kernel.shape[::-1])
    if k_dim != dim:
        raise ValueError(f"kernel {kernel.shape} ({kernel_layout}) does not match hidden {hidden.shape}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {hidden.shape} must be targets {targets.shape} + [D]")
    token_shape = targets.shape
    mask = _prepare_mask(mask, token_shape).reshape(-1)
    hidden, targets = hidden.reshape(-1, dim), targets.reshape(-1).astype(jnp.int32)
    n = hidden.shape[0]
    if chunk_size is None:
        chunk_size = max(8, min(4096, _CHUNK_BYTES // (4 * vocab)) // 8 * 8)
    chunk = int(max(1, min(chunk_size, n)))
    pad = -n % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
        targets, mask = jnp.pad(targets, (0, pad)), jnp.pad(mask, (0, pad))
    total, nll_sum, z_sum, correct_sum, per_token, logprob = _fused_core(
        chunk, kernel_layout, hidden, kernel, targets, mask,
        jnp.asarray(z_loss, F32), jnp.asarray(label_smoothing, F32))
    unpad = lambda v: v[:n].reshape(token_shape)
    return LossOutput(total, jnp.sum(mask), nll_sum, z_sum, jax.lax.stop_gradient(correct_sum),
                      unpad(per_token), unpad(logprob))

