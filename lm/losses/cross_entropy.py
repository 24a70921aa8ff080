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

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lm.losses.sums import F32, mean_of
from lm.losses.sums import prepare_mask as _prepare_mask
from lm.losses.sharded_logprobs import _check_shapes, _run
from lm.losses.token_logprobs import check_targets


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


def cross_entropy(logits, targets, mask=None, *, z_loss=0.0, label_smoothing=0.0, checked=False) -> LossOutput:
    """Next-token cross-entropy against integer targets.

    Args:
      logits: ``[..., V]`` any float dtype (upcast to float32 inside).
      targets: ``[...]`` int, already shifted (``targets[t]`` follows ``inputs[t]``).
      mask: ``[...]`` float weights (default all ones). Masked targets may hold
        any value: they change neither the loss nor the gradient.
      z_loss: coefficient z of the auxiliary ``z·lse(x)²`` term.
      label_smoothing: α, the target becomes ``(1-α)·onehot(y) + α·uniform``.
      checked: add a ``jax.experimental.checkify`` check that every unmasked target is in
        [0, V) (raise with :func:`lm.losses.checked`). Unchecked, an out-of-range target at an
        unmasked position gives a NaN loss (and NaN ``target_logprobs``), never a wrong number.

    Per token: ``loss_t = (1-α)(lse_t - x_{t,y}) + α(lse_t - mean_v x_{t,v}) + z·lse_t²``.
    Returns a :class:`LossOutput` of sums; ``.mean`` divides once.
    """
    logits = jnp.asarray(logits).astype(F32)
    targets = jnp.asarray(targets)
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {logits.shape} must be targets {targets.shape} + [V]")
    mask = _prepare_mask(mask, targets.shape)
    if checked:
        check_targets(targets, logits.shape[-1], mask, where="lm.losses.cross_entropy")
    loss, nll, zl, logprob, correct, _ = _token_stats(logits, targets, z_loss, label_smoothing)
    total, nll_sum, z_sum, correct_sum, per_token = _masked_sums(mask, loss, nll, zl, correct)
    return LossOutput(total, jnp.sum(mask), nll_sum, z_sum, jax.lax.stop_gradient(correct_sum),
                      per_token, logprob)


# ----------------------------------------------------------------------------
# Fused output projection + cross-entropy: a reduction of lm.losses.token_logprobs's chunked
# statistics (log q_y, lse, mean logit, argmax), so the [..., V] logits are never built.
# ----------------------------------------------------------------------------


def fused_cross_entropy(hidden, kernel, targets, mask=None, *, chunk_size=None, z_loss=0.0,
                        label_smoothing=0.0, kernel_layout="dv", vocab_chunk_size=None, mesh=None,
                        batch_axes=None, vocab_axis=None, checked=False) -> LossOutput:
    """:func:`cross_entropy` of ``logits = hidden @ kernel`` without building the logits.

    Args:
      hidden: ``[..., D]`` final hidden states (e.g. ``[B, T, D]`` or ``[N, D]``).
      kernel: output projection, ``[D, V]`` (``kernel_layout='dv'``) or ``[V, D]``
        (``'vd'``, a tied embedding table used as is: logits = hidden @ kernelᵀ).
      targets, mask, z_loss, label_smoothing: as in :func:`cross_entropy`, ``[...]``.
      chunk_size: tokens per chunk (static). Default: about 64 MiB of f32 logits,
        ``[chunk, V]``, at a time. Any N works; the last chunk is padded and masked.
      vocab_chunk_size, mesh, batch_axes, vocab_axis: blocks of the vocabulary, and sharding
        over a mesh (rows over ``batch_axes``, the vocabulary over ``vocab_axis``), as in
        :func:`lm.losses.token_logprobs`.
      checked: add a ``checkify`` check that every unmasked target is in [0, V).

    Only ``[chunk, vocab_chunk]`` logits exist at any time, forward or backward.  Gradients
    flow to ``hidden`` and ``kernel`` (in their dtypes; the mask and coefficients get none)
    and from every output, ``target_logprobs`` included.  Reverse mode only (custom VJP).
    Under differentiation the gradient of ``sum`` is computed in the forward pass (3 matmuls
    per chunk when the vocabulary is one block, as with materialized logits) and kept until
    the backward pass (one f32 buffer of the kernel's shape, which becomes the kernel's
    gradient); cotangents on the other outputs add a pass that recomputes each chunk's logits.
    The products run in the narrower dtype of hidden and kernel with float32 accumulation.
    """
    hidden, kernel, targets = jnp.asarray(hidden), jnp.asarray(kernel), jnp.asarray(targets)
    vocab = _check_shapes(hidden, kernel, targets, kernel_layout)
    mask = _prepare_mask(mask, targets.shape)
    if checked:
        check_targets(targets, vocab, mask, where="lm.losses.fused_cross_entropy")
    per_token, total = _run(hidden, kernel, targets, mask, layout=kernel_layout, temperature=1.0,
                            z_loss=z_loss, smoothing=label_smoothing, chunk_size=chunk_size,
                            vocab_chunk_size=vocab_chunk_size, mesh=mesh, batch_axes=batch_axes,
                            vocab_axis=vocab_axis, entropy=False, objective=True)
    logprob, lse, _, mean_logit, correct = per_token
    nll, zl = -logprob, z_loss * lse**2
    loss = (1.0 - label_smoothing) * nll + label_smoothing * (lse - mean_logit) + zl
    _, nll_sum, z_sum, correct_sum, per_token_loss = _masked_sums(mask, loss, nll, zl, correct)
    return LossOutput(total, jnp.sum(mask), nll_sum, z_sum, jax.lax.stop_gradient(correct_sum),
                      per_token_loss, logprob)


def checked(fn):
    """``fn`` (a loss call, jitted or not) run under ``jax.experimental.checkify``: a failed check
    (e.g. ``cross_entropy(..., checked=True)`` with a target outside [0, V)) raises
    ``checkify.JaxRuntimeError`` naming the target and where, instead of returning NaN.

        out = lm.losses.checked(lambda: fused_cross_entropy(h, w, t, m, checked=True))()
        jitted = jax.jit(checkify.checkify(loss_fn)); err, out = jitted(...); err.throw()
    """
    from jax.experimental import checkify

    def run(*args, **kwargs):
        err, out = checkify.checkify(fn)(*args, **kwargs)
        err.throw()
        return out

    return run
