"""The decode layout: the model re-laid out for products with few rows (cached decoding), opt-in.

`for_decoding(model)` returns a copy of a Transformer that computes the same numbers with its
weights arranged for decoding; the forward pass (lm/model/transformer.py) is unchanged:

- **fused products**: q, k and v side by side in one matrix [D, (H + 2K)·hd], gate and up in
  another [D, 2·mlp_dim]: 4 weight products per layer instead of 7. At batch 1 each product costs
  ~20 µs on a CPU beyond reading its bytes (paired, benchmark model: 6.21 → 5.66 ms/token).
- **row blocks** (`split_rows`, `matmul_blocks`): every weight's rows in k blocks. XLA:CPU runs a
  one-row product on one thread but spreads the items of a batched product over its threads.
- **per-layer modules** (`per_layer=True`, the default on a CPU): the stacked blocks become L
  separate modules with their own buffers (and the cache L per-layer buffers). Inside a layer
  loop XLA:CPU copies each layer's weights out of a stacked array before its products, about 3×
  the parameter bytes read per token (benchmarks/results/sampling.md).

Training keeps the stacked, separate weights; this is a copy for generating (one more copy of the
block parameters while it lives). Measurements are in benchmarks/README.md.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from lm.model import lora
from lm.model.attention import Attention
from lm.model.layers import MLP
from lm.model.platform import compile_platform

Array = jax.Array


def default_row_blocks() -> int:
    """2 on a CPU with 2 or more cores, where XLA runs the two halves of a small product on two
    threads (measured on 2 cores; 4 blocks were no faster there); 1 elsewhere."""
    return 2 if compile_platform() == "cpu" and (os.cpu_count() or 1) >= 2 else 1


def split_rows(w: Array, blocks: int) -> Array:
    """[..., R, N] → [..., k, R/k, N]: the rows in k = `blocks` consecutive blocks (k = 1 where k
    does not divide R)."""
    rows = w.shape[-2]
    k = blocks if blocks >= 1 and rows % blocks == 0 else 1
    return w.reshape(*w.shape[:-2], k, rows // k, w.shape[-1])


def matmul_blocks(x: Array, w: Array) -> Array:
    """x [M, R] @ w, with w `[k, R/k, N]` (`split_rows`). For one row (M = 1, decoding at batch 1):
    k partial products, one per row block, as one batched product, then summed; otherwise the
    plain product (w viewed as [R, N]). → [M, N].

    Why: XLA:CPU runs [1, 512] @ [512, 1024] on one thread (73 µs), but spreads the k items of a
    batched product over its threads: k = 2 on 2 cores, 39 µs; each weight shape of the benchmark
    model 1.3–1.8× faster. From 2 rows on, its plain products are threaded and faster than the
    blocks (8 rows: 99 against 124 µs). The same numbers up to float rounding (the sum is split).
    """
    k, r, n = w.shape
    if k == 1 or x.shape[0] != 1:
        return x @ w.reshape(k * r, n)
    return jnp.einsum("kmr,krn->kmn", x.reshape(1, k, r).swapaxes(0, 1), w).sum(axis=0)


def blocked(w: Array, row_blocks: int, rows: str | None, cols: str | None) -> nnx.Variable:
    """`split_rows(w, row_blocks)` as a Variable with logical axes for the mesh rules: a leading
    `layers` axis where stacked, the block axis unsharded, then `rows` and `cols` (None for a
    fused axis: q, k and v side by side, or gate and up, which tensor parallelism would split
    unevenly; those are replicated over `tensor`, split over `fsdp` along `embed`)."""
    value = split_rows(w, row_blocks)
    return nnx.Variable(value, logical_axes=("layers",) * (value.ndim - 3) + (None, rows, cols))


class FusedAttention(Attention):
    """Attention whose q/k/v product is one fused, row-blocked matrix (and wo row-blocked)."""

    def __init__(self, attn: Attention, row_blocks: int):  # from a trained Attention, stacked or not
        flat = lambda w: w[...].reshape(*w.shape[:-2], -1)  # noqa: E731  [..., D, heads, hd] → [..., D, heads·hd]
        wqkv = jnp.concatenate([flat(attn.wq), flat(attn.wk), flat(attn.wv)], axis=-1)
        wo = attn.wo[...].reshape(*attn.wo.shape[:-3], -1, attn.wo.shape[-1])  # [..., H·hd, D]
        self.wqkv = blocked(wqkv, row_blocks, "embed", None)
        self.wo_blocks = blocked(wo, row_blocks, None, "embed")
        if attn.cfg.qkv_bias:  # [..., H, hd], [..., K, hd] → [..., (H + 2K)·hd], in q, k, v order like wqkv
            bqkv = jnp.concatenate([flat(attn.bq), flat(attn.bk), flat(attn.bv)], axis=-1)
            self.bqkv = nnx.Variable(bqkv, logical_axes=("layers",) * (bqkv.ndim - 1) + (None,))
        self.cfg = attn.cfg

    def project_qkv(self, x2):
        cfg = self.cfg
        qkv = matmul_blocks(x2, self.wqkv[...].astype(cfg.compute_dtype))
        if cfg.qkv_bias:
            qkv = qkv + self.bqkv[...].astype(cfg.compute_dtype)
        return tuple(jnp.split(qkv, [cfg.num_heads * cfg.head_dim_, (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim_],
                               axis=1))

    def project_out(self, out2):
        return matmul_blocks(out2, self.wo_blocks[...].astype(self.cfg.compute_dtype))


class FusedMLP(MLP):
    """The SwiGLU MLP with gate and up as one fused, row-blocked matrix (and w_down row-blocked)."""

    def __init__(self, mlp: MLP, row_blocks: int):
        self.w_gate_up = blocked(jnp.concatenate([mlp.w_gate[...], mlp.w_up[...]], axis=-1), row_blocks, "embed", None)
        self.w_down_blocks = blocked(mlp.w_down[...], row_blocks, None, "embed")
        self.dtype = mlp.dtype

    def gate_up(self, x2):
        return tuple(jnp.split(matmul_blocks(x2, self.w_gate_up[...].astype(self.dtype)), 2, axis=1))

    def down(self, hidden):
        return matmul_blocks(hidden, self.w_down_blocks[...].astype(self.dtype))


def fuse_block(block, row_blocks: int = 1):
    """`block` (one Block, or the stacked blocks) with fused, row-blocked products, in place."""
    block.attn = FusedAttention(block.attn, row_blocks)
    block.mlp = FusedMLP(block.mlp, row_blocks)
    return block


def for_decoding(model, *, per_layer: bool | None = None, row_blocks: int | None = None):
    """A copy of `model` (a Transformer, or a graphdef-compatible subclass) laid out for decoding:
    fused, row-blocked products, and per-layer modules if `per_layer` (None: on a CPU, where it is
    faster). Same numbers as `model` up to float rounding. "On a CPU": the platform the mesh in
    context (or else the default backend) runs on (lm/model/platform.py)."""
    per_layer = compile_platform() == "cpu" if per_layer is None else per_layer
    row_blocks = default_row_blocks() if row_blocks is None else row_blocks
    out = nnx.merge(*nnx.split(model))  # new modules over the same arrays: `model` is left as it is
    lora.fold_in(out)  # LoRA adapters folded into their weights, a quantized base dequantized (lm/model/lora.py)
    if per_layer:
        block_graphdef, stacked = nnx.split(out.blocks)
        n = out.cfg.num_layers
        layers = [nnx.merge(block_graphdef, jax.tree.map(lambda x: x[i], stacked)) for i in range(n)]
        for layer in layers:  # one layer's weights: their logical axes without the leading `layers`
            for _, var in nnx.iter_graph(layer):
                axes = var.get_metadata().get("logical_axes") if isinstance(var, nnx.Variable) else None
                if axes and len(axes) == var.ndim + 1 and axes[0] == "layers":
                    var.set_metadata(logical_axes=axes[1:])
        out.blocks = nnx.List([fuse_block(layer, row_blocks) for layer in layers])
    else:
        fuse_block(out.blocks, row_blocks)
    return out
