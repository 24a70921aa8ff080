"""The decoder: token embedding → N pre-norm blocks (RMSNorm → grouped-query attention with rotary
positions → residual; RMSNorm → SwiGLU MLP → residual) → final RMSNorm → output projection (tied to
the embedding or separate).

The model follows the batch contract of DESIGN.md: it is given `inputs`, `positions` and
`segment_ids` explicitly and never derives a mask or a position from token values. Attention is
causal within a segment; segment 0 is padding and attends to nothing real.

One forward pass, `Transformer.forward`, serves training (no cache), prefill and decoding (a
key/value cache, lm/model/cache.py). The blocks are stacked along a leading `layers` axis and
applied with `lax.scan` (compile time flat in depth) or unrolled; a decode layout may hold them as
separate per-layer modules instead (lm/model/cpu.py), which the same forward pass runs in turn.

Every parameter carries `logical_axes` metadata; `lm.parallel.sharding` maps these names onto mesh axes,
so the model knows nothing about meshes. After `graphdef, params = nnx.split(model)`,
`nnx.merge(graphdef, params)` inside a jitted function gives a pure forward pass over a plain
dict of arrays.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lm.model import cache as kv_cache
from lm.model import remat
from lm.model.attention import Attention, write_cache
from lm.model.config import ModelConfig
from lm.model.hints import constrain
from lm.model.layers import MLP, RMSNorm, param

Array = jax.Array


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(·))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, segment_ids, q_index, kv_cache=None, kv_segment_ids=None,
                 cache_index=None):
        """→ (x [B, T, D], the T new cache slots (k, v) or None: Attention.__call__)."""
        attn_out, new_slots = self.attn(self.attn_norm(x), positions, segment_ids, q_index,
                                        kv_cache, kv_segment_ids, cache_index)
        x = constrain(x + attn_out, ("batch", "length", "embed"))
        return constrain(x + self.mlp(self.mlp_norm(x)), ("batch", "length", "embed")), new_slots


class Transformer(nnx.Module):
    """The whole decoder. Parameters are float32; compute runs in `cfg.dtype`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), cfg.init_scale / math.sqrt(cfg.d_model),
                           ("vocab", "embed"))

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return Block(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)
        for _, var in nnx.iter_graph(self.blocks):  # the vmap added a leading layer axis
            if isinstance(var, nnx.Param):
                var.set_metadata(logical_axes=("layers",) + var.get_metadata()["logical_axes"])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), cfg.init_scale / math.sqrt(cfg.d_model),
                                 ("embed", "vocab"))

    @property
    def per_layer(self) -> bool:
        """Whether the blocks are separate per-layer modules (a decode layout) rather than stacked."""
        return isinstance(self.blocks, nnx.List)

    # -- the forward pass ---------------------------------------------------------------------------

    def _run_blocks(self, x, positions, segment_ids, q_index, layer_caches=None, kv_segment_ids=None,
                    cache_index=None):
        """x [B, T, D] through every block → (x, the layers' updated (k, v) caches or None)."""
        n = self.cfg.num_layers
        if self.per_layer:  # separate modules and caches (a decode layout): each read and updated in place
            caches = [None] * n if layer_caches is None else list(zip(*layer_caches))
            outs = []
            for block, layer_cache in zip(self.blocks, caches):
                x, slots = block(x, positions, segment_ids, q_index, layer_cache, kv_segment_ids, cache_index)
                outs.append(None if layer_cache is None else write_cache(layer_cache, slots, cache_index))
            return x, None if layer_caches is None else tuple(zip(*outs))
        graphdef, stacked = nnx.split(self.blocks)

        def step(h, layer):
            params, layer_cache = layer
            block = nnx.merge(graphdef, params)
            return block(h, positions, segment_ids, q_index, layer_cache, kv_segment_ids, cache_index)

        policy = remat.policy(self.cfg.remat)
        if policy is not None:
            step = jax.checkpoint(step, policy=policy)
        if layer_caches is not None:  # cached (prefill, decoding): the stacked cache updated in place
            return self._scan_cached(step, x, stacked, layer_caches, cache_index, self.cfg.scan_layers)
        if self.cfg.scan_layers:
            return jax.lax.scan(step, x, (stacked, layer_caches))
        # unrolled: one copy of the block per layer. The stacked arrays are cut with one
        # lax.split each, whose gradient is a concatenate (indexing layer i would pad each
        # layer's gradient to the full stack and add L of them).
        layers = jax.tree.map(lambda a: [p[0] for p in jax.lax.split(a, [1] * n)], (stacked, layer_caches))
        outs = []
        for i in range(n):
            x, out = step(x, jax.tree.map(lambda parts: parts[i], layers, is_leaf=lambda v: isinstance(v, list)))
            outs.append(out)
        return x, jax.tree.map(lambda *a: jnp.stack(a), *outs)

    @staticmethod
    def _scan_cached(step, x, stacked, layer_caches, cache_index, scan):
        """The layer scan of a cached pass with the stacked (k, v) caches in the carry: each layer
        reads its slice, and its attention returns only its T new slots, written straight into
        the stack (one dynamic_update_slice at [layer, …, cache_index] each for k and v), so the
        stacked cache, donated by the decode loop, is updated in place and no layer-sized buffer
        is built. (As scan inputs and outputs, every decode step wrote a fresh copy of the whole
        cache; with the attention returning an updated layer cache, the TPU compiler built a
        layer-sized copy per layer per step.)"""
        def body(carry, xs):
            h, caches = carry
            params, i = xs
            layer = tuple(jax.lax.dynamic_index_in_dim(c, i, axis=0, keepdims=False) for c in caches)
            h, (new_k, new_v) = step(h, (params, layer))  # k [B, K, hd, T], v [B, K, T, hd]
            zero, slot = jnp.zeros((), jnp.int32), jnp.asarray(cache_index, jnp.int32)
            caches = (jax.lax.dynamic_update_slice(caches[0], new_k[None], (i, zero, zero, zero, slot)),
                      jax.lax.dynamic_update_slice(caches[1], new_v[None], (i, zero, zero, slot, zero)))
            return (h, caches), None

        n = layer_caches[0].shape[0]
        if scan:
            (x, caches), _ = jax.lax.scan(body, (x, tuple(layer_caches)), (stacked, jnp.arange(n, dtype=jnp.int32)))
            return x, caches
        carry = (x, tuple(layer_caches))  # unrolled: the same body once per layer, static layer index
        for i in range(n):
            carry, _ = body(carry, (jax.tree.map(lambda a: a[i], stacked), jnp.int32(i)))
        return carry

    def forward(self, inputs: Array, positions: Array, segment_ids: Array, *, cache: dict | None = None,
                cache_index: Array | None = None) -> tuple[Array, dict | None]:
        """The one forward pass: inputs, positions, segment_ids [B, T] int32 → (final-normed hidden
        states [B, T, D], the updated cache or None).

        Without a cache the T tokens attend causally to each other within their segments. With
        one (`init_cache`), they are written at slots cache_index .. cache_index+T−1 (a scalar,
        the same slot for every row) and attend to the filled slots before them as well
        (segment_ids 0 marks a padding token that no later token may attend to).
        """
        x = jnp.take(self.embed[...], inputs, axis=0).astype(self.cfg.compute_dtype)
        x = constrain(x, ("batch", "length", "embed"))
        q_index = jnp.arange(inputs.shape[1], dtype=jnp.int32)[None, :]
        if cache is None:
            x, _ = self._run_blocks(x, positions, segment_ids, q_index)
            return self.final_norm(x), None
        cache = kv_cache.write_segments(cache, segment_ids, cache_index)
        x, (k, v) = self._run_blocks(x, positions, segment_ids, q_index + cache_index, (cache["k"], cache["v"]),
                                     cache["segment_ids"], cache_index)
        return self.final_norm(x), dict(cache, k=k, v=v)

    def hidden_states(self, inputs: Array, positions: Array, segment_ids: Array) -> Array:
        """inputs, positions, segment_ids [B, T] int32 → final-normed hidden states [B, T, D]."""
        return self.forward(inputs, positions, segment_ids)[0]

    def output_kernel(self) -> tuple[Array, str]:
        """The output projection and its layout: ([V, D], 'vd') when tied, ([D, V], 'dv') otherwise."""
        if self.cfg.tie_embeddings:
            return self.embed[...], "vd"
        return self.lm_head[...], "dv"

    def logits_from_hidden(self, hidden: Array) -> Array:
        """hidden [..., D] → logits [..., V] in the compute dtype."""
        kernel, layout = self.output_kernel()
        kernel = kernel.astype(hidden.dtype)
        if layout == "vd":  # contract with the table as stored: `hidden @ kernel.T` would have XLA
            # transpose the whole [V, D] table at every call (a decode step's slowest small op)
            return jnp.einsum("...d,vd->...v", hidden, kernel)
        return hidden @ kernel

    def __call__(self, inputs: Array, positions: Array, segment_ids: Array) -> Array:
        """inputs, positions, segment_ids [B, T] → logits [B, T, V]."""
        return self.logits_from_hidden(self.hidden_states(inputs, positions, segment_ids))

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        """An empty cache for this model's layout (lm/model/cache.py)."""
        return kv_cache.init_cache(self.cfg, batch_size, max_len, per_layer=self.per_layer)

    def decode(self, inputs: Array, positions: Array, segment_ids: Array, cache: dict,
               cache_index: Array) -> tuple[Array, dict]:
        """`forward` with a cache, then the output projection: (logits [B, T, V], updated cache)."""
        hidden, cache = self.forward(inputs, positions, segment_ids, cache=cache, cache_index=cache_index)
        return self.logits_from_hidden(hidden), cache
