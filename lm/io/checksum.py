"""Exact checksums ("fingerprints") of array contents, for verifying restored checkpoints.

For each array: two 32-bit sums over the raw bits u_i of its elements, Σ u_i and
Σ mix(u_i)·(2i+1) (mod 2³², i the row-major index). Integer sums are exact in any order, so the
value is the same however the array is sharded or reduced; any single flipped bit changes the
second sum, and so does swapping two elements. Computed by XLA where the arrays live.

    pending = start_fingerprints(state)   # dispatched; returns at once
    fingerprints_json(pending)            # {'params/embed': [s1, s2], ...}: waits for the values
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _as_uint32(x: jax.Array) -> jax.Array:
    bits = x.dtype.itemsize * 8
    if bits < 32:
        return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 64-bit: a trailing axis of 2 words


def _fingerprint(x: jax.Array) -> jax.Array:
    """[2] uint32: Σ u and Σ mix(u)·(2i+1) over the raw bits u of element i (mod 2³²). Integer
    sums are exact in any order, so the result does not depend on sharding; any single flipped
    bit changes the second sum."""
    u = _as_uint32(x)
    index = jnp.zeros(u.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(u.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, u.shape, d) * jnp.uint32(stride % 2**32)
        stride *= u.shape[d]
    mixed = (u ^ (u >> 16)) * jnp.uint32(0x45D9F3B)
    mixed = mixed ^ (mixed >> 16)
    return jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(mixed * (2 * index + 1), dtype=jnp.uint32)])


@functools.lru_cache(maxsize=None)
def _fingerprint_fn(out_sharding):
    return jax.jit(lambda leaves: {k: _fingerprint(v) for k, v in leaves.items()}, out_shardings=out_sharding)


def leaves_by_path(tree: Any, is_leaf=None) -> dict[str, Any]:
    """{'params/blocks/mlp/w_up': leaf, …}: the same path strings for a TrainState, a dict and
    orbax's stored metadata tree."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return {jax.tree_util.keystr(p, simple=True, separator="/"): leaf for p, leaf in flat}


def start_fingerprints(tree: Any) -> dict[str, jax.Array]:
    """Dispatch the checksum pass over every array of `tree` (where the arrays live) and return
    at once: {path: [2] uint32 device array}. `fingerprints_json` waits for the values."""
    leaves = leaves_by_path(tree)
    if not leaves:
        return {}
    sharding = next(iter(leaves.values())).sharding
    out = (jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
           if isinstance(sharding, jax.sharding.NamedSharding) else None)
    return _fingerprint_fn(out)(leaves)


def fingerprints_json(pending: dict[str, jax.Array]) -> dict[str, list[int]]:
    """The values of `start_fingerprints` as JSON lists (replicated: every process holds them)."""
    local = lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x  # noqa: E731
    return {k: [int(a) for a in np.asarray(local(v))] for k, v in pending.items()}


def fingerprints(tree: Any) -> dict[str, list[int]]:
    """{path: [sum, weighted sum]} of every array in `tree`; see `_fingerprint`."""
    return fingerprints_json(start_fingerprints(tree))
