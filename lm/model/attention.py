"""Grouped-query attention with rotary positions, causal within packed segments, with or without
a key/value cache (the same code for training, prefill and one-token decoding). The attention
itself (dense, blockwise, splash, cuDNN, Pallas GPU) is chosen in lm/model/attention_ops.py; the
cached decode path is here."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lm import masking
from lm.model import lora
from lm.model.attention_ops import attend, causal_attention, group_heads, resolve_attention_impl, ungroup_heads
from lm.model.config import ModelConfig
from lm.model.hints import constrain
from lm.model.layers import param, rope_frequencies, rotary

Array = jax.Array


def cache_sizes(slots: int, block: int) -> list[int]:
    """The cache lengths a decode step may attend over: multiples of `block` (raised until there
    are at most 8) up to `slots`, and `slots` itself. block 0: [slots]."""
    if not block or block >= slots:
        return [slots]
    step = block * -(-slots // (8 * block))  # a multiple of block, ≥ slots / 8
    return [*range(step, slots, step), slots]


class Attention(nnx.Module):
    """Multi-head attention with `num_kv_heads` key/value heads shared by groups of query heads.

    `project_qkv` and `project_out` are its weight products; a decode layout replaces them with
    fused, row-blocked ones (lm/model/cpu.py) and keeps everything else."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim_
        std = cfg.init_scale / math.sqrt(d)
        out_std = cfg.init_scale / math.sqrt(h * hd) / math.sqrt(2 * cfg.num_layers)
        self.wq = param(rngs, (d, h, hd), std, ("embed", "heads", "head_dim"))
        self.wk = param(rngs, (d, kv, hd), std, ("embed", "kv_heads", "head_dim"))
        self.wv = param(rngs, (d, kv, hd), std, ("embed", "kv_heads", "head_dim"))
        self.wo = param(rngs, (h, hd, d), out_std, ("heads", "head_dim", "embed"))
        if cfg.qkv_bias:  # zeros at init; only present when asked (the parameter tree is unchanged otherwise)
            self.bq = nnx.Param(jnp.zeros((h, hd), jnp.float32), logical_axes=("heads", "head_dim"))
            self.bk = nnx.Param(jnp.zeros((kv, hd), jnp.float32), logical_axes=("kv_heads", "head_dim"))
            self.bv = nnx.Param(jnp.zeros((kv, hd), jnp.float32), logical_axes=("kv_heads", "head_dim"))
        self.cfg = cfg

    def project_qkv(self, x2: Array) -> tuple[Array, Array, Array]:
        """x [M, D] → q [M, H·hd], k, v [M, K·hd] (plus the biases, with cfg.qkv_bias)."""
        dt = self.cfg.compute_dtype
        qkv = lora.project(self, x2, ("wq", "wk", "wv"), dt)  # the weights' products (+ adapters, lm/model/lora.py)
        if self.cfg.qkv_bias:
            qkv = tuple(y + b[...].astype(dt).reshape(-1) for y, b in zip(qkv, (self.bq, self.bk, self.bv)))
        return qkv

    def project_out(self, out2: Array) -> Array:
        """attention output [M, H·hd] → [M, D]."""
        return lora.project(self, out2, ("wo",), self.cfg.compute_dtype)[0]

    def __call__(self, x, positions, q_segment_ids, q_index, kv_cache=None, kv_segment_ids=None,
                 cache_index=None):
        """x [B, T, D] → ([B, T, D], the T new cache slots (k, v) or None).

        Without a cache, queries attend to the same T tokens, by the implementation
        `cfg.attention_impl` resolves to (lm/model/attention_ops.py). With `kv_cache = (k, v)`,
        keys stored transposed as `[B, K, hd, S]` and values as `[B, K, S, hd]`
        (lm/model/cache.py), the queries attend to the cached slots before `cache_index` (masked
        by `kv_segment_ids [B, S]`, 0 = empty) and causally to the T new keys, in one softmax. A
        prefill into an empty cache (cache_index the int 0) with an implementation other than
        dense attends by that implementation, as in training.

        The cache itself is only read: what comes back are the new keys `[B, K, hd, T]` and values
        `[B, K, T, hd]` in the cache's layout and dtype, which the caller writes at slots
        `cache_index .. cache_index+T−1` (`write_cache`, or straight into the stacked cache of
        every layer: lm/model/transformer.py). Returning an updated layer cache instead made the
        TPU compiler build a whole layer-sized buffer per layer per decode step (the layer's slice
        of the stacked cache, updated, then its new slots sliced back out).
        """
        cfg = self.cfg
        b, t, d = x.shape
        h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim_
        q, k, v = checkpoint_name(self.project_qkv(x.reshape(b * t, d)), "qkv_proj")  # remat tags: lm/model/remat.py
        q, k, v = q.reshape(b, t, h, hd), k.reshape(b, t, kv, hd), v.reshape(b, t, kv, hd)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))  # [B, T, H, hd]
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        inv_freq = rope_frequencies(cfg)
        q = rotary(q, positions, cfg.rope_theta, inv_freq)
        k = rotary(k, positions, cfg.rope_theta, inv_freq)
        q = q * jnp.asarray(1 / math.sqrt(hd), q.dtype)  # scale the [T, hd] side, not [T, S]
        impl = resolve_attention_impl(cfg, seq_len=t)
        prefill = isinstance(cache_index, int) and cache_index == 0
        new_slots = None
        if kv_cache is None or (prefill and impl != "dense"):
            out = causal_attention(q, k, v, q_segment_ids, impl, block=cfg.attention_block)
        else:
            # [B, K, T, hd] keys and values: the layout the score and value products read (and
            # the cache keeps) without a copy; q as [B, K, T, G, hd] (attention_ops.group_heads)
            out = self._attend_cached(group_heads(q, kv), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                                      q_segment_ids, q_index, kv_cache, kv_segment_ids, cache_index)
            out = ungroup_heads(out)
        if kv_cache is not None:
            new_slots = cache_slots(kv_cache, k, v)
        return checkpoint_name(self.project_out(out.reshape(b * t, h * hd)), "out_proj").reshape(b, t, d), new_slots

    def _attend_cached(self, q, k, v, q_segment_ids, q_index, kv_cache, kv_segment_ids, cache_index):
        """The queries attend to the cache as it was (slots before cache_index) and to the T new
        keys, in one softmax → [B, K, T, G, hd]. Reading the old cache rather than an updated one
        leaves the caller's write of the new slots as the cache's only update, so XLA writes it
        in place instead of copying every layer's cache at every decode step (on a CPU, attending
        over the updated cache made XLA copy each cache buffer twice per step)."""
        dt = self.cfg.compute_dtype
        ck, cv = kv_cache
        new = masking.attention_mask(q_segment_ids, q_segment_ids, q_index, q_index)  # [B, T, T]

        def attend_first(n):  # the queries against cache slots [0, n) (n static) and the new keys
            kv_index = jnp.arange(n, dtype=jnp.int32)[None, :]
            old = masking.attention_mask(q_segment_ids, kv_segment_ids[:, :n], q_index, kv_index)
            old = old & (kv_index < cache_index)[:, None, :]  # [B, T, n]
            return attend(q, [(ck[..., :n].astype(dt), cv[:, :, :n].astype(dt), old, True), (k, v, new, False)])

        sizes = cache_sizes(ck.shape[3], self.cfg.decode_block)
        if isinstance(cache_index, int) and cache_index == 0:  # an empty cache (prefill): only the new keys
            # (its all-masked scores would be constants that XLA folds, for seconds, at compile time)
            out = attend(q, [(k, v, new, False)])
        elif len(sizes) == 1:
            out = attend_first(sizes[0])
        else:  # only the slots before cache_index hold keys: attend to the smallest size that covers them
            # (a slice of the cache is a copy on a CPU: there this reads more than all slots would)
            which = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), cache_index)
            out = jax.lax.switch(jnp.minimum(which, len(sizes) - 1),
                                 [functools.partial(attend_first, n) for n in sizes])
        return out


def cache_slots(kv_cache, k, v):
    """New keys and values `[B, T, K, hd]` → (`[B, K, hd, T]`, `[B, K, T, hd]`): the cache's
    layouts (keys transposed, lm/model/cache.py) and dtype, ready to be written at slots
    cache_index .. cache_index+T−1 (`write_cache`)."""
    ck, cv = kv_cache
    return k.transpose(0, 2, 3, 1).astype(ck.dtype), v.transpose(0, 2, 1, 3).astype(cv.dtype)


def write_cache(kv_cache, slots, cache_index):
    """One layer's cache (keys `[B, K, hd, S]`, values `[B, K, S, hd]`) with its new slots
    (`cache_slots`) written at cache_index .. cache_index+T−1."""
    (ck, cv), (k, v) = kv_cache, slots
    return (jax.lax.dynamic_update_slice(ck, k, (0, 0, 0, cache_index)),
            jax.lax.dynamic_update_slice(cv, v, (0, 0, cache_index, 0)))
