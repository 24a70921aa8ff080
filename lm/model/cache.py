"""The key/value cache of cached decoding: its layout and an empty one.

    k            [L, B, K, hd, S]  keys, transposed: a decode step's scores read them along S as stored
    v            [L, B, K, S, hd]  values
    segment_ids  [B, S]            the segment of the token in each slot; 0 = empty (never attended to)

k and v are in the compute dtype. A model whose layers are separate modules (a per-layer decode
layout, lm/model/cpu.py) keeps k and v as tuples of L per-layer arrays instead of stacked ones:
each layer's cache is then its own buffer, read and updated in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lm.model.config import ModelConfig


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, *, per_layer: bool = False) -> dict:
    """An empty cache of `max_len` slots for `batch_size` rows (stacked, or per layer)."""
    kv, hd = cfg.num_kv_heads, cfg.head_dim_
    shapes = {"k": (batch_size, kv, hd, max_len), "v": (batch_size, kv, max_len, hd)}
    if per_layer:
        arrays = {name: tuple(jnp.zeros(shape, cfg.compute_dtype) for _ in range(cfg.num_layers))
                  for name, shape in shapes.items()}
    else:
        arrays = {name: jnp.zeros((cfg.num_layers, *shape), cfg.compute_dtype) for name, shape in shapes.items()}
    return {**arrays, "segment_ids": jnp.zeros((batch_size, max_len), jnp.int32)}


def write_segments(cache: dict, segment_ids: jax.Array, cache_index: jax.Array) -> dict:
    """The cache with `segment_ids [B, T]` written at slots cache_index .. cache_index+T−1."""
    updated = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids.astype(jnp.int32), (0, cache_index))
    return dict(cache, segment_ids=updated)
