"""The (sum, count) convention every loss here follows, and mask handling.

Sum a loss and its weight total over micro-batches and devices, then divide once with
:func:`mean_of`: a split batch then gives the whole batch's loss and gradient, and a
count of 0 gives 0 (never NaN).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def mean_of(total_sum, total_count):
    """``total_sum / total_count``, or 0 where ``total_count == 0``.

    Elementwise (``total_sum`` may be a gradient array); a floating
    ``total_sum`` keeps its dtype, anything else becomes float32.  The gradient
    is ``1/total_count`` times the gradient of ``total_sum``, and exactly zero
    (never NaN) when the count is 0.
    """
    total_sum = jnp.asarray(total_sum)
    if not jnp.issubdtype(total_sum.dtype, jnp.floating):
        total_sum = total_sum.astype(F32)
    total_count = jnp.asarray(total_count, F32)
    nonzero = total_count != 0
    ratio = total_sum / jnp.where(nonzero, total_count, 1.0)
    return jnp.where(nonzero, ratio, 0.0).astype(total_sum.dtype)


def prepare_mask(mask, shape):
    """Float32 weights broadcast to ``shape``; they never carry a gradient."""
    if mask is None:
        return jnp.ones(shape, F32)
    mask = jnp.asarray(mask)
    try:
        mask = jnp.broadcast_to(mask.astype(F32), shape)
    except ValueError:
        raise ValueError(f"mask of shape {mask.shape} does not broadcast to targets {shape}") from None
    return jax.lax.stop_gradient(mask)
