"""Causal attention within packed segments: one dispatch over its implementations.

Every implementation takes the same inputs and gives the same numbers (to float rounding):

    q [B, T, H, hd]   queries, RoPE applied and pre-scaled by 1/sqrt(hd)
    k, v [B, T, K, hd] keys (RoPE applied) and values; K divides H (grouped-query attention:
                      query head h reads kv head h // (H/K))
    segment_ids [B, T] int32, one id per packed document, 0 = padding
    → out [B, T, H, hd]

Query t attends to key s iff s <= t and segment_ids[t] == segment_ids[s] != 0. A padding query
(segment 0) attends to nothing real; its output is finite but differs between implementations
(dense: the mean of the values; blockwise: 0; splash, cudnn, pallas_gpu: padding attends to
earlier padding), and nothing downstream reads it (its loss weight is 0).

Implementations (`ModelConfig.attention_impl`):
- `dense`: the [T, T] scores in float32, in causal query blocks of `attention_block` skipping the
  key blocks after each (lm/model/attention.py's original path, kept for short T on CPU).
- `blockwise`: plain XLA flash attention (lm/model/blockwise.py): online softmax over key blocks,
  its own backward; memory O(T·block). Any platform.
- `splash`: jax's Pallas TPU splash kernel (segment ids, GQA), under shard_map over the mesh's
  batch axes and heads over the hint's head axis. Interpret mode off TPU (tests).
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, causal, the segments as a
  boolean [B, 1, T, T] mask (cuDNN turns it into a bias: O(T²) bytes, its flash kernel otherwise).
- `pallas_gpu`: jax's Pallas GPU (Triton) flash kernel with segment ids; the kv heads repeated
  to H; head dim a power of two. Interpret mode off GPU (tests).
- `auto`: by the platform compiled for (lm/model/platform.py): TPU → splash; GPU → cudnn for
  bfloat16 with head dim a multiple of 8 up to 128, else pallas_gpu for a power-of-two head dim,
  else blockwise; CPU → dense below `CPU_BLOCKWISE_MIN_T` tokens, blockwise from there
  (benchmarks/bench_attention.py).

Decoding with a KV cache is served by the layer's cached dense path for every implementation
(a few queries against the cache: no kernel needed); a prefill into an empty cache uses the
resolved implementation like training.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lm import masking
from lm.model import hints
from lm.model.blockwise import blockwise_attention
from lm.model.config import ATTENTION_IMPLS
from lm.model.platform import compile_platform, context_mesh

Array = jax.Array
IMPLS = ATTENTION_IMPLS
CPU_BLOCKWISE_MIN_T = 8192  # auto on CPU: dense below this many tokens per row, blockwise from here
BLOCKWISE_BLOCK = 512  # blockwise's block when model.attention_block is 0


def resolve_attention_impl(cfg, mesh=None, seq_len: int | None = None) -> str:
    """The implementation `cfg.attention_impl` means for a step compiled for `mesh`'s platform
    (None: the mesh in context, lm/model/platform.py) with rows of `seq_len` tokens (None: long)."""
    impl = cfg.attention_impl
    if impl != "auto":
        return impl
    platform = compile_platform(mesh)
    hd = cfg.head_dim_
    if platform == "tpu":
        return "splash"
    if platform == "gpu":
        if cfg.dtype == "bfloat16" and hd % 8 == 0 and hd <= 128:
            return "cudnn"
        return "pallas_gpu" if hd >= 16 and hd & (hd - 1) == 0 else "blockwise"
    return "dense" if seq_len is not None and seq_len < CPU_BLOCKWISE_MIN_T else "blockwise"


def causal_attention(q: Array, k: Array, v: Array, segment_ids: Array, impl: str, *, block: int = 0,
                     interpret: bool | None = None, mesh=None) -> Array:
    """Causal attention within segments by `impl` (not 'auto': see `resolve_attention_impl`).
    Shapes in the module docstring. `block`: dense's causal query blocks (0: one T×T block) and
    blockwise's block (0: BLOCKWISE_BLOCK). `interpret`: run a Pallas kernel in interpret mode
    (None: when not compiling for its platform)."""
    if impl == "dense":
        return dense_attention(q, k, v, segment_ids, block)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, segment_ids, block or BLOCKWISE_BLOCK)
    if impl == "splash":
        interpret = compile_platform(mesh) != "tpu" if interpret is None else interpret
        return splash_attention(q, k, v, segment_ids, interpret=interpret, mesh=mesh)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, segment_ids)
    if impl == "pallas_gpu":
        interpret = compile_platform(mesh) != "gpu" if interpret is None else interpret
        return pallas_gpu_attention(q, k, v, segment_ids, interpret=interpret)
    raise ValueError(f"model.attention_impl: unknown implementation {impl!r}; one of {IMPLS}")


# -- dense ------------------------------------------------------------------------------------------

def group_heads(q: Array, kv_heads: int) -> Array:
    """[B, T, H, hd] → [B, K, T, G, hd]: for each (row, kv head) its T·G query rows contiguous, so
    the score and value products take q, and any causal block of it, without a copy."""
    b, t, h, hd = q.shape
    return q.reshape(b, t, kv_heads, h // kv_heads, hd).transpose(0, 2, 1, 3, 4)


def ungroup_heads(out: Array) -> Array:
    """[B, K, T, G, hd] → [B, T, H, hd]."""
    b, kv, t, g, hd = out.shape
    return out.transpose(0, 2, 1, 3, 4).reshape(b, t, kv * g, hd)


def dense_attention(q, k, v, segment_ids, block: int = 0):
    """Every query against the T keys, scores in float32; with `block` (dividing T), queries in
    blocks of `block` skipping the key blocks after each (masked anyway: the same numbers)."""
    kv = k.shape[2]
    qg, kt, vt = group_heads(q, kv), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    t = q.shape[1]
    q_index = jnp.arange(t, dtype=jnp.int32)[None, :]
    if not block or t <= block or t % block:
        mask = masking.attention_mask(segment_ids, segment_ids, q_index, q_index)  # [B, T, T]
        return ungroup_heads(attend(qg, [(kt, vt, mask, False)]))
    outs = []
    for start in range(0, t, block):
        stop = start + block
        mask = masking.attention_mask(segment_ids[:, start:stop], segment_ids[:, :stop],
                                      q_index[:, start:stop], q_index[:, :stop])
        outs.append(attend(qg[:, :, start:stop], [(kt[:, :, :stop], vt[:, :, :stop], mask, False)]))
    return ungroup_heads(jnp.concatenate(outs, axis=2))


def attend(q: Array, blocks: list[tuple[Array, Array, Array, bool]]) -> Array:
    """Softmax attention of (pre-scaled) queries `q [B, K, T, G, hd]` over the keys and values of
    all `blocks` together, each `(k, v [B, K, S_i, hd], mask [B, T, S_i], keys_transposed)` (mask
    True = may attend; keys_transposed: k is `[B, K, hd, S_i]`, as the decode cache keeps it): one
    softmax over the concatenated key axis. Scores and softmax in float32. → [B, K, T, G, hd].

    Every product is a dot, also for one query per row (decoding): on a CPU, products summed by
    hand wrote the whole [hd, S] product out before reducing it (8 layers over 528 slots: 0.48
    against 0.35 ms as dots; benchmarks/README.md)."""
    f32 = jnp.float32
    masked = [jnp.where(mask[:, None, :, None, :],
                        jnp.einsum("bktgd,bkds->bktgs" if transposed else "bktgd,bksd->bktgs", q, k,
                                   preferred_element_type=f32),
                        jnp.finfo(f32).min)
              for k, _, mask, transposed in blocks]
    probs = jax.nn.softmax(jnp.concatenate(masked, axis=-1) if len(masked) > 1 else masked[0], axis=-1)
    out, start = 0, 0
    for _, v, _, _ in blocks:
        stop = start + v.shape[2]
        out = out + jnp.einsum("bktgs,bksd->bktgd", probs[..., start:stop].astype(v.dtype), v)
        start = stop
    return out


# -- kernels: padding to a block multiple, sharding ------------------------------------------------

def _pad_time(arrays: list[Array], segment_ids: Array, multiple: int) -> tuple[list[Array], Array, int]:
    """Pad axis 1 (T) of every array with zeros, and segment_ids with 0 (padding: no real query
    attends to it), to a multiple of `multiple`. → (arrays, segment_ids, the original T)."""
    t = segment_ids.shape[1]
    extra = -t % multiple
    if not extra:
        return arrays, segment_ids, t
    pad = lambda x: jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    return [pad(x) for x in arrays], pad(segment_ids), t


def _shard_specs(mesh, b: int, h: int, kv: int):
    """PartitionSpecs (q/out [B, H, T, hd], k/v [B, K, T, hd], segment_ids [B, T]) for running a
    kernel per shard: rows over the batch axes, heads over the head axis when it splits both H and
    K, time and head dim whole. From the activation hints when active, else the mesh's axes."""
    P = jax.sharding.PartitionSpec
    names = dict(zip(mesh.axis_names, mesh.axis_sizes)) if hasattr(mesh, "axis_sizes") else dict(mesh.shape)
    batch_hint = hints.sharding_for(("batch",), (b,))
    if batch_hint is not None:
        batch = batch_hint.spec[0]
        heads_q = hints.sharding_for(("heads",), (h,)).spec[0]
        heads_kv = hints.sharding_for(("kv_heads",), (kv,)).spec[0]
        heads = heads_q if heads_q == heads_kv else None
    else:
        axes = tuple(a for a in ("data", "fsdp") if names.get(a, 1) > 1)
        size = 1
        for a in axes:
            size *= names[a]
        batch = axes if axes and b % size == 0 else None
        t = names.get("tensor", 1)
        heads = "tensor" if t > 1 and h % t == 0 and kv % t == 0 else None
    return P(batch, heads, None, None), P(batch, heads, None, None), P(batch, None)


def _per_shard(fn, mesh, q, k, v, segment_ids):
    """fn(q [B, H, T, hd], k, v [B, K, T, hd], segment_ids) run per shard of the mesh (shard_map),
    or directly without a mesh of more than one device."""
    if mesh is None or mesh.size == 1:
        return fn(q, k, v, segment_ids)
    q_spec, kv_spec, seg_spec = _shard_specs(mesh, q.shape[0], q.shape[1], k.shape[1])
    return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v, segment_ids)


# -- splash (TPU) ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _splash_kernel(heads: int, t: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    mask = sa.MultiHeadMask([sa.CausalMask((t, t)) for _ in range(heads)])
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    with jax.ensure_compile_time_eval():  # concrete mask tables, not tracers of the first trace that asks
        return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q, k, v, segment_ids, *, interpret: bool = False, mesh=None):
    """The splash kernel per row (vmap) and per shard (shard_map over `mesh`, None: the mesh in
    context). T is padded to a multiple of 128 (the kernel's lane width); blocks of 512, 256 or
    128 query and key positions, whichever divides the padded T."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    (q, k, v), seg, t = _pad_time([q, k, v], segment_ids.astype(jnp.int32), 128)
    tp = seg.shape[1]
    block = next(c for c in (512, 256, 128) if tp % c == 0)

    def local(q, k, v, seg):  # q [b, h, T, hd], k, v [b, K, T, hd], seg [b, T]
        kernel = _splash_kernel(q.shape[1], tp, block, interpret)
        return jax.vmap(kernel)(q, k, v, sa.SegmentIds(seg, seg))

    mesh = context_mesh() if mesh is None else mesh
    out = _per_shard(local, mesh, q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), seg)
    return out.swapaxes(1, 2)[:, :t]


# -- GPU -----------------------------------------------------------------------------------------

def cudnn_attention(q, k, v, segment_ids, *, implementation: str = "cudnn"):
    """cuDNN flash attention, causal, with the same-segment mask [B, 1, T, T] (exact for any
    packing). `implementation='xla'` runs the same call through XLA (tests on CPU)."""
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=same, scale=1.0, is_causal=True,
                                        implementation=implementation)


def pallas_gpu_attention(q, k, v, segment_ids, *, interpret: bool = False):
    """jax's Pallas GPU flash kernel (causal, segment ids) with its default blocks (128 forward,
    32 backward). It wants as many kv heads as query heads (repeated here; their gradients summed
    back by autodiff) and T a multiple of its blocks (padded: to 128 above 128 tokens, else 32)."""
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    hd, groups = q.shape[-1], q.shape[2] // k.shape[2]
    if hd & (hd - 1):
        raise ValueError(f"model.attention_impl='pallas_gpu' needs a power-of-two head dim, got {hd}; "
                         "use 'cudnn' or 'blockwise'")
    if groups > 1:
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    (q, k, v), seg, t = _pad_time([q, k, v], segment_ids.astype(jnp.int32), 128 if q.shape[1] > 128 else 32)
    out = gpu_attention.mha(q, k, v, seg, sm_scale=1.0, causal=True, interpret=interpret)
    return out[:, :t]
