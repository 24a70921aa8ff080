"""Activation sharding hints: the model names its activations' logical axes; a mesh, if any,
turns them into sharding constraints.

Parameters are laid out by their logical axes (lm.parallel.sharding); activations are left to XLA's
sharding propagation, which on FSDP meshes may keep a whole batch on every device after it
gathers a weight. `constrain` names an activation's logical axes ("batch", "length", "embed",
"heads", "kv_heads", "head_dim", "mlp", "vocab"); while tracing inside `activation_sharding(fn)`
it pins `x` to `fn(axes, shape)` (a Sharding, or None for no hint). Outside, it is the identity,
so the model itself stays mesh-agnostic (decoding and tests on one device never see a hint).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import jax

_ACTIVATION_SHARDING: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(fn: Callable[[tuple, tuple], Any] | None) -> Iterator[None]:
    """Trace the model under `fn(logical_axes, shape) -> Sharding | None` (see `constrain`)."""
    token = _ACTIVATION_SHARDING.set(fn)
    try:
        yield
    finally:
        _ACTIVATION_SHARDING.reset(token)


def sharding_for(axes: tuple[str | None, ...], shape: tuple[int, ...]) -> Any:
    """The active hint's sharding for an activation of these logical `axes` and `shape` (None
    when no hint is active). A kernel run under shard_map reads its partition specs from here."""
    fn = _ACTIVATION_SHARDING.get()
    return None if fn is None else fn(axes, shape)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """`x` with a sharding constraint for its logical `axes`, if a hint is active (else `x`)."""
    sharding = sharding_for(axes, x.shape)
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)
