"""A decoder-only Transformer in Flax NNX.

Token embedding → N pre-norm blocks (RMSNorm → grouped-query attention with rotary
position embeddings → residual; RMSNorm → SwiGLU MLP → residual) → final RMSNorm →
output projection (tied to the embedding or separate).

The model follows the batch contract of DESIGN.md: it is given `inputs`,
`positions` and `segment_ids` explicitly and never derives a mask or a position
from token values. Attention is causal within a segment; segment 0 is padding and
attends to nothing real. The blocks are stacked along a leading `layers` axis and
applied with `lax.scan`, so compile time does not grow with depth.

Every parameter carries `logical_axes` metadata (`vocab`, `embed`, `heads`,
`kv_heads`, `head_dim`, `mlp`, `layers`); `lm.sharding` maps these names onto mesh
axes, so this file knows nothing about meshes.

After `graphdef, params = nnx.split(model)`, `nnx.merge(graphdef, params)` inside a
jitted function gives a pure forward pass over a plain dict of arrays.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lm import masking

Array = jax.Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# -- activation sharding hints ------------------------------------------------------------------------
# Parameters are laid out by their logical axes (lm.sharding); activations are left to XLA's
# sharding propagation, which on FSDP meshes may keep a whole batch on every device after it
# gathers a weight. `constrain` names an activation's logical axes ("batch", "length", "embed",
# "heads", "kv_heads", "head_dim", "mlp", "vocab"); while tracing inside `activation_sharding(fn)`
# it pins `x` to `fn(axes, shape)` (a Sharding, or None for no hint). Outside, it is the identity,
# so the model itself stays mesh-agnostic (decoding and tests on one device never see a hint).

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


def constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
    """`x` with a sharding constraint for its logical `axes`, if a hint is active (else `x`)."""
    fn = _ACTIVATION_SHARDING.get()
    sharding = None if fn is None else fn(axes, x.shape)
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of the Transformer (mirrors `config.model`; see configs/base.py)."""

    vocab_size: int
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int | None = None  # None: d_model // num_heads
    mlp_dim: int = 768
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    dtype: str = "float32"  # compute dtype; parameters are always float32
    remat: bool = False  # recompute each block's activations in the backward pass
    attention_block: int = 0  # training attention in causal blocks of this many queries, skipping
    # the key blocks after each (exact; ~(1 + c/T)/2 of the score work); 0: one T×T block
    decode_block: int = 0  # 0: cached decoding attends to all cache slots (masked), the cost per
    # token flat in the generated length; b > 0: to the filled slots rounded up to a multiple of b
    # (at most 8 sizes, each compiled once: lax.switch), for caches much longer than what is used
    scan_layers: bool = True  # apply the stacked blocks with lax.scan (compile time flat in depth);
    # False unrolls them: a longer compile, but no stacked activation buffers to fill and slice
    init_scale: float = 1.0  # multiplies every initial standard deviation
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2): params bq [H, hd], bk, bv [K, hd]
    rope_scaling: str = "none"  # rotary frequencies: 'none' (theta^(-2i/d)) or 'llama3' (Llama 3.1's
    # rescaling of the low frequencies, see `rope_frequencies`; uses the four rope_* fields below)
    rope_factor: float = 8.0  # llama3: the long wavelengths' frequencies are divided by this
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original_max_position / this are scaled fully
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original_max_position / this are kept
    rope_original_max_position: int = 8192  # llama3: the context length the frequencies were trained for

    def __post_init__(self):
        problems = []
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim"):
            if getattr(self, name) is None or getattr(self, name) < 1:
                problems.append(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if not problems:
            if self.head_dim is None and self.d_model % self.num_heads:
                problems.append(
                    f"model.num_heads={self.num_heads} does not divide model.d_model={self.d_model}; "
                    "change one or set model.head_dim")
            if self.num_heads % self.num_kv_heads:
                problems.append(
                    f"model.num_kv_heads={self.num_kv_heads} must divide model.num_heads={self.num_heads}")
            if self.head_dim_ % 2:
                problems.append(f"head dim {self.head_dim_} must be even for rotary embeddings")
        if self.attention_block is None or self.attention_block < 0:
            problems.append(f"model.attention_block must be >= 0 (0: off), got {self.attention_block}")
        if self.decode_block is None or self.decode_block < 0:
            problems.append(f"model.decode_block must be >= 0 (0: off), got {self.decode_block}")
        if self.rope_scaling not in ("none", "llama3"):
            problems.append(f"model.rope_scaling must be 'none' or 'llama3', got {self.rope_scaling!r}")
        elif self.rope_scaling == "llama3" and not (
                self.rope_factor > 0 and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor
                and self.rope_original_max_position > 0):
            problems.append("model.rope_scaling='llama3' needs rope_factor > 0, 0 < rope_low_freq_factor < "
                            f"rope_high_freq_factor and rope_original_max_position > 0, got {self.rope_factor}, "
                            f"{self.rope_low_freq_factor}, {self.rope_high_freq_factor}, "
                            f"{self.rope_original_max_position}")
        if self.dtype not in _DTYPES:
            problems.append(f"model.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def head_dim_(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, axes: tuple[str, ...]) -> nnx.Param:
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, logical_axes=axes)


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x²) + eps) · scale, computed in float32."""

    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("embed",))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> Array:
    """The rotary angular frequencies inv_freq [d/2] (float32), d = the head dim.

    'none': inv_freq_i = theta^(−2i/d). 'llama3' (Llama 3.1): with the wavelength λ_i = 2π/inv_freq_i,
    L = rope_original_max_position, f = rope_factor, l = rope_low_freq_factor, h = rope_high_freq_factor:
    λ > L/l (long waves): inv_freq / f; λ < L/h (short waves): unchanged; in between, interpolated
    with s = (L/λ − l)/(h − l): (1 − s)·inv_freq/f + s·inv_freq.
    """
    half = cfg.head_dim_ // 2
    inv_freq = cfg.rope_theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    if cfg.rope_scaling == "none":
        return inv_freq
    old_len, f = cfg.rope_original_max_position, cfg.rope_factor
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    medium = (1 - smooth) * inv_freq / f + smooth * inv_freq
    return jnp.where(wavelen > old_len / low, inv_freq / f, jnp.where(wavelen < old_len / high, inv_freq, medium))


def rotary(x: Array, positions: Array, theta: float, inv_freq: Array | None = None) -> Array:
    """Rotate pairs (x_i, x_{i+d/2}) of `x [B, T, H, d]` by angle positions · inv_freq_i, where
    inv_freq_i = theta^(−2i/d) unless `inv_freq [d/2]` is given (`rope_frequencies`).

    With the halves a = x[..., :d/2], b = x[..., d/2:]: (a, b) → (a cos − b sin, b cos + a sin).
    Computed on x viewed as [..., 2, d/2] as x · [cos, cos] + swap(x) · [−sin, sin], where swap
    reverses the size-2 axis: an index remap XLA fuses into one elementwise loop. Splitting x and
    concatenating the rotated halves gives the same numbers, but those fusions cost ~4% of a CPU
    train step (benchmarks/README.md).
    """
    half = x.shape[-1] // 2
    if inv_freq is None:
        inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [d/2]
    angle = positions.astype(jnp.float32)[..., None, None, None] * inv_freq  # [B, T, 1, 1, d/2]
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    cos2 = jnp.concatenate([cos, cos], axis=-2)  # [B, T, 1, 2, d/2]
    sin2 = jnp.concatenate([-sin, sin], axis=-2)
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], 2, half)
    out = pairs * cos2 + pairs[..., ::-1, :] * sin2
    return out.reshape(x.shape).astype(x.dtype)


@jax.custom_vjp
def matmuls(x: Array, *ws: Array) -> tuple[Array, ...]:
    """x [M, D] @ w [D, N] for each w: every weight product of a block, with M = B·T flattened so
    each weight gradient is one 2-D product (contracting two batch axes at once is several times
    slower on XLA:CPU). The backward pass forms the weight gradients from one transposed copy of x.

    Autodiff would compute dW = xᵀ·dy as a product contracting both operands' first axis, which
    XLA:CPU hands to a slower kernel than the plain [D, M] @ [M, N] product: for the narrow
    outputs of q, k, v and o (N = 256 or 512, M = 2048) 60–77% of the matmul peak against 78–89%.
    Here xᵀ is written out once (the barrier keeps XLA from folding the transpose back into the
    product) and shared by all the weights that read x.
    """
    return tuple(x @ w for w in ws)


def _matmuls_fwd(x, *ws):
    return matmuls(x, *ws), (x, ws)


def _matmuls_bwd(saved, grads):
    x, ws = saved
    xt = jax.lax.optimization_barrier(x.T)
    dx = functools.reduce(jnp.add, [g @ w.T for g, w in zip(grads, ws)])
    return (dx, *[xt @ g for g in grads])


matmuls.defvjp(_matmuls_fwd, _matmuls_bwd)


def split_rows(w: Array, blocks: int) -> Array:
    """[..., R, N] → [..., k, R/k, N]: the rows in k = `blocks` consecutive blocks (k = 1 where k
    does not divide R). The decode layout of a weight (see `fuse_for_decoding`, `matmul_blocks`)."""
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


def cache_sizes(slots: int, block: int) -> list[int]:
    """The cache lengths a decode step may attend over: multiples of `block` (raised until there
    are at most 8) up to `slots`, and `slots` itself. block 0: [slots]."""
    if not block or block >= slots:
        return [slots]
    step = block * -(-slots // (8 * block))  # a multiple of block, ≥ slots / 8
    return [*range(step, slots, step), slots]


class Attention(nnx.Module):
    """Multi-head attention with `num_kv_heads` key/value heads shared by groups of query heads."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim_
        std = cfg.init_scale / math.sqrt(d)
        out_std = cfg.init_scale / math.sqrt(h * hd) / math.sqrt(2 * cfg.num_layers)
        self.wq = _param(rngs, (d, h, hd), std, ("embed", "heads", "head_dim"))
        self.wk = _param(rngs, (d, kv, hd), std, ("embed", "kv_heads", "head_dim"))
        self.wv = _param(rngs, (d, kv, hd), std, ("embed", "kv_heads", "head_dim"))
        self.wo = _param(rngs, (h, hd, d), out_std, ("heads", "head_dim", "embed"))
        if cfg.qkv_bias:  # zeros at init; only present when asked (the parameter tree is unchanged otherwise)
            self.bq = nnx.Param(jnp.zeros((h, hd), jnp.float32), logical_axes=("heads", "head_dim"))
            self.bk = nnx.Param(jnp.zeros((kv, hd), jnp.float32), logical_axes=("kv_heads", "head_dim"))
            self.bv = nnx.Param(jnp.zeros((kv, hd), jnp.float32), logical_axes=("kv_heads", "head_dim"))
        self.bqkv = nnx.data(None)  # the decode layout of the biases: bq, bk, bv side by side, [(H + 2K)·hd]
        # the decode layout, set by `fuse_for_decoding`: wq, wk, wv side by side, [D, (H + 2K)·hd],
        # and wo as [H·hd, D], each in row blocks (`split_rows`)
        self.wqkv = nnx.data(None)
        self.wo_blocks = nnx.data(None)
        self.cfg = cfg

    def __call__(self, x, positions, q_segment_ids, q_index, kv_cache=None, kv_segment_ids=None,
                 cache_index=None):
        """x [B, T, D] → ([B, T, D], updated (k, v) cache or None).

        Without a cache, queries attend to the same T tokens. With `kv_cache = (k, v)`, keys
        stored transposed as `[B, K, hd, S]` and values as `[B, K, S, hd]` (see `init_cache`),
        the queries attend to the cached slots before `cache_index`
        (masked by `kv_segment_ids [B, S]`, 0 = empty) and causally to the T new keys, in one
        softmax; the new keys/values are then written at slots `cache_index .. cache_index+T−1`.
        """
        cfg, dt = self.cfg, self.cfg.compute_dtype
        b, t, d = x.shape
        h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim_
        if self.wqkv is not None:  # one product for q, k and v (see `fuse_for_decoding`)
            qkv = matmul_blocks(x.reshape(b * t, d), self.wqkv[...].astype(dt))
            if self.bqkv is not None:
                qkv = qkv + self.bqkv[...].astype(dt)
            q, k, v = jnp.split(qkv, [h * hd, (h + kv) * hd], axis=1)
        else:
            ws = [w[...].astype(dt).reshape(d, -1) for w in (self.wq, self.wk, self.wv)]  # [D, heads·hd]
            q, k, v = matmuls(x.reshape(b * t, d), *ws)
            if cfg.qkv_bias:
                q, k, v = (y + bias[...].astype(dt).reshape(-1) for y, bias in zip((q, k, v), (self.bq, self.bk, self.bv)))
        q, k, v = q.reshape(b, t, h, hd), k.reshape(b, t, kv, hd), v.reshape(b, t, kv, hd)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))  # [B, T, H, hd]
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        inv_freq = rope_frequencies(cfg)
        q = rotary(q, positions, cfg.rope_theta, inv_freq)
        k = rotary(k, positions, cfg.rope_theta, inv_freq).transpose(0, 2, 1, 3)  # [B, K, T, hd]: the layout the
        v = v.transpose(0, 2, 1, 3)  # score and value products read (and the cache keeps) without a copy
        groups = h // kv
        q = q * jnp.asarray(1 / math.sqrt(hd), q.dtype)  # scale the [T, hd] side, not [T, S]
        # [B, K, T, G, hd]: for each (batch, kv head) its T·G query rows are contiguous, so the score
        # and value products take q, and any causal block of it, without a copy
        q = q.reshape(b, t, kv, groups, hd).transpose(0, 2, 1, 3, 4)
        new_cache = None
        block = cfg.attention_block
        if kv_cache is not None:
            # The queries attend to the cache as it was (slots before cache_index) and to the T
            # new keys, in one softmax; the cache is then updated. Reading the old cache rather
            # than the updated one leaves the update as the cache's only consumer, so XLA writes
            # it in place instead of copying every layer's cache at every decode step (measured on
            # a CPU: attending over the updated cache made XLA copy each cache buffer twice per step).
            ck, cv = kv_cache
            new = masking.attention_mask(q_segment_ids, q_segment_ids, q_index, q_index)  # [B, T, T]

            def attend_first(n):  # the queries against cache slots [0, n) (n static) and the new keys
                kv_index = jnp.arange(n, dtype=jnp.int32)[None, :]
                old = masking.attention_mask(q_segment_ids, kv_segment_ids[:, :n], q_index, kv_index)
                old = old & (kv_index < cache_index)[:, None, :]  # [B, T, n]
                return _attend(q, [(ck[..., :n].astype(dt), cv[:, :, :n].astype(dt), old, True),
                                   (k, v, new, False)])

            sizes = cache_sizes(ck.shape[3], cfg.decode_block)
            if len(sizes) == 1:
                out = attend_first(sizes[0])
            else:  # only the slots before cache_index hold keys: attend to the smallest size that covers them
                # (a slice of the cache is a copy on a CPU: there this reads more than all slots would)
                which = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), cache_index)
                out = jax.lax.switch(jnp.minimum(which, len(sizes) - 1), [functools.partial(attend_first, n)
                                                                          for n in sizes])
            new_cache = (jax.lax.dynamic_update_slice(ck, k.swapaxes(2, 3).astype(ck.dtype),
                                                      (0, 0, 0, cache_index)),
                         jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, 0, cache_index, 0)))
        elif not block or t <= block or t % block:
            mask = masking.attention_mask(q_segment_ids, q_segment_ids, q_index, q_index)  # [B, T, T]
            out = _attend(q, [(k, v, mask, False)])
        else:
            # Causal blocks: queries block i (positions i·c .. i·c+c−1) only need keys 0 .. i·c+c−1;
            # the keys after them are masked anyway, so skipping them changes no number.
            outs = []
            for start in range(0, t, block):
                stop = start + block
                mask = masking.attention_mask(q_segment_ids[:, start:stop], q_segment_ids[:, :stop],
                                              q_index[:, start:stop], q_index[:, :stop])
                outs.append(_attend(q[:, :, start:stop], [(k[:, :, :stop], v[:, :, :stop], mask, False)]))
            out = jnp.concatenate(outs, axis=2)
        out = out.transpose(0, 2, 1, 3, 4).reshape(b * t, h * hd)
        if self.wo_blocks is not None:
            return matmul_blocks(out, self.wo_blocks[...].astype(dt)).reshape(b, t, d), new_cache
        wo = self.wo[...].astype(dt).reshape(h * hd, d)
        return matmuls(out, wo)[0].reshape(b, t, d), new_cache


def _attend(q: Array, blocks: list[tuple[Array, Array, Array, bool]]) -> Array:
    """Softmax attention of (pre-scaled) queries `q [B, K, T, G, hd]` over the keys and values of
    all `blocks` together, each `(k, v [B, K, S_i, hd], mask [B, T, S_i], keys_transposed)` (mask
    True = may attend; keys_transposed: k is `[B, K, hd, S_i]`, as the decode cache keeps it): one
    softmax over the concatenated key axis. Scores and softmax in float32. → [B, K, T, G, hd].

    Every product is a dot, also for one query per row (decoding): on a CPU, products summed by
    hand wrote the whole [hd, S] product out before reducing it (8 layers over 528 slots: 0.48
    against 0.35 ms as dots; benchmarks/README.md, session 8)."""
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


@jax.custom_vjp
def swiglu(gate: Array, up: Array) -> Array:
    """silu(gate) · up, elementwise, whose backward pass keeps only its two inputs.

    Plain autodiff saves sigmoid(gate) and silu(gate) as well: two more [B·T, mlp_dim] arrays per
    layer, each written and read again. Here the backward pass recomputes the sigmoid inside the
    one fusion that produces both gradients.
    """
    return gate * jax.nn.sigmoid(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(saved, grad):
    gate, up = saved
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    # d silu / d gate = sig + gate · sig · (1 − sig) = sig + silu · (1 − sig)
    return grad * up * (sig + silu * (1 - sig)), grad * silu


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class MLP(nnx.Module):
    """SwiGLU: (silu(x W_gate) ⊙ x W_up) W_down."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.mlp_dim
        self.w_gate = _param(rngs, (d, f), cfg.init_scale / math.sqrt(d), ("embed", "mlp"))
        self.w_up = _param(rngs, (d, f), cfg.init_scale / math.sqrt(d), ("embed", "mlp"))
        out_std = cfg.init_scale / math.sqrt(f) / math.sqrt(2 * cfg.num_layers)
        self.w_down = _param(rngs, (f, d), out_std, ("mlp", "embed"))
        # the decode layout, set by `fuse_for_decoding`: w_gate and w_up side by side, [D, 2·mlp_dim],
        # and w_down, each in row blocks (`split_rows`)
        self.w_gate_up = nnx.data(None)
        self.w_down_blocks = nnx.data(None)
        self.dtype = cfg.compute_dtype

    def __call__(self, x: Array) -> Array:
        dt = self.dtype
        x2 = x.reshape(-1, x.shape[-1])  # [B·T, D]: plain 2-D matmuls, forward and backward
        if self.w_gate_up is not None:  # one product for gate and up (see `fuse_for_decoding`)
            gate, up = jnp.split(matmul_blocks(x2, self.w_gate_up[...].astype(dt)), 2, axis=1)
        else:
            gate, up = matmuls(x2, self.w_gate[...].astype(dt), self.w_up[...].astype(dt))
        gate, up = constrain(gate, ("batch", "mlp")), constrain(up, ("batch", "mlp"))
        hidden = swiglu(gate, up)
        if self.w_down_blocks is not None:
            out = matmul_blocks(hidden, self.w_down_blocks[...].astype(dt))
        else:
            out = matmuls(hidden, self.w_down[...].astype(dt))[0]
        return out.reshape(x.shape)


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(·))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, segment_ids, q_index, kv_cache=None, kv_segment_ids=None,
                 cache_index=None):
        attn_out, new_cache = self.attn(self.attn_norm(x), positions, segment_ids, q_index,
                                        kv_cache, kv_segment_ids, cache_index)
        x = constrain(x + attn_out, ("batch", "length", "embed"))
        return constrain(x + self.mlp(self.mlp_norm(x)), ("batch", "length", "embed")), new_cache


def fuse_for_decoding(block: Block, row_blocks: int = 1) -> Block:
    """Lay `block`'s weights out for products with a few rows (decoding), in place: q, k, v side by
    side in one matrix and gate and up in another (one product each instead of three and two, the
    same numbers), and every weight's rows in `row_blocks` blocks (`split_rows`; `matmul_blocks`
    runs the blocks as one batched product, which XLA:CPU spreads over its threads). A copy for
    generating; training keeps separate weights. Also takes the stacked blocks of a Transformer
    (every weight with a leading layer axis).

    Why: at batch 1 each product costs ~20 µs on a CPU beyond reading its bytes; fused, the
    benchmark model's decode step is ~0.5 ms faster (paired: 6.21 → 5.66 ms); row blocks: see
    `matmul_blocks`.
    """
    attn, mlp = block.attn, block.mlp
    flat = lambda w: w[...].reshape(*w.shape[:-2], -1)  # noqa: E731  [..., D, heads, hd] → [..., D, heads·hd]
    wqkv = jnp.concatenate([flat(attn.wq), flat(attn.wk), flat(attn.wv)], axis=-1)
    wo = attn.wo[...].reshape(*attn.wo.shape[:-3], -1, attn.wo.shape[-1])  # [..., H·hd, D]
    attn.wqkv = nnx.Variable(split_rows(wqkv, row_blocks))
    attn.wo_blocks = nnx.Variable(split_rows(wo, row_blocks))
    mlp.w_gate_up = nnx.Variable(split_rows(jnp.concatenate([mlp.w_gate[...], mlp.w_up[...]], axis=-1), row_blocks))
    mlp.w_down_blocks = nnx.Variable(split_rows(mlp.w_down[...], row_blocks))
    if attn.cfg.qkv_bias:  # [..., H, hd], [..., K, hd] → [..., (H + 2K)·hd], in q, k, v order like wqkv
        attn.bqkv = nnx.Variable(jnp.concatenate([flat(attn.bq), flat(attn.bk), flat(attn.bv)], axis=-1))
        attn.bq = attn.bk = attn.bv = None
    attn.wq = attn.wk = attn.wv = attn.wo = mlp.w_gate = mlp.w_up = mlp.w_down = None
    return block


class Transformer(nnx.Module):
    """The whole decoder. Parameters are float32; compute runs in `cfg.dtype`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), cfg.init_scale / math.sqrt(cfg.d_model),
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
            self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), cfg.init_scale / math.sqrt(cfg.d_model),
                                  ("embed", "vocab"))

    # -- the forward pass ---------------------------------------------------------------------------

    def _run_blocks(self, x, positions, segment_ids, q_index, cache=None, cache_index=None):
        graphdef, stacked = nnx.split(self.blocks)
        kv_segment_ids = None if cache is None else cache["segment_ids"]

        def body(h, layer):
            params, layer_cache = layer
            block = nnx.merge(graphdef, params)
            h, new_layer_cache = block(h, positions, segment_ids, q_index, layer_cache, kv_segment_ids,
                                       cache_index)
            return h, new_layer_cache

        if self.cfg.remat:
            body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
        layer_caches = None if cache is None else (cache["k"], cache["v"])
        if self.cfg.scan_layers:
            return jax.lax.scan(body, x, (stacked, layer_caches))
        # unrolled: one copy of the block per layer. The stacked arrays are cut with one
        # lax.split each, whose gradient is a concatenate (indexing layer i would pad each
        # layer's gradient to the full stack and add L of them).
        n = self.cfg.num_layers
        layers = jax.tree.map(lambda a: [p[0] for p in jax.lax.split(a, [1] * n)], (stacked, layer_caches))
        outs = []
        for i in range(n):
            x, out = body(x, jax.tree.map(lambda parts: parts[i], layers, is_leaf=lambda v: isinstance(v, list)))
            outs.append(out)
        return x, jax.tree.map(lambda *a: jnp.stack(a), *outs)

    def hidden_states(self, inputs: Array, positions: Array, segment_ids: Array) -> Array:
        """inputs, positions, segment_ids [B, T] int32 → final-normed hidden states [B, T, D]."""
        x = jnp.take(self.embed[...], inputs, axis=0).astype(self.cfg.compute_dtype)
        x = constrain(x, ("batch", "length", "embed"))
        q_index = jnp.arange(inputs.shape[1], dtype=jnp.int32)[None, :]
        x, _ = self._run_blocks(x, positions, segment_ids, q_index)
        return self.final_norm(x)

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

    # -- decoding with a key/value cache --------------------------------------------------------

    def init_cache(self, batch_size: int, max_len: int) -> dict[str, Array]:
        """An empty cache: k [L, B, K, hd, S] (keys transposed: a decode step's scores then read
        them along S without a copy), v [L, B, K, S, hd], both in the compute dtype, and
        segment_ids [B, S] (0 = empty)."""
        cfg = self.cfg
        layers, kv, hd = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim_
        return {
            "k": jnp.zeros((layers, batch_size, kv, hd, max_len), cfg.compute_dtype),
            "v": jnp.zeros((layers, batch_size, kv, max_len, hd), cfg.compute_dtype),
            "segment_ids": jnp.zeros((batch_size, max_len), jnp.int32),
        }

    def decode(self, inputs: Array, positions: Array, segment_ids: Array, cache: dict[str, Array],
               cache_index: Array) -> tuple[Array, dict[str, Array]]:
        """Run T new tokens against the cache, writing them at slots cache_index .. cache_index+T−1.

        inputs, positions, segment_ids: [B, T] (segment_ids 0 marks a padding token that no
        later token may attend to). cache_index: scalar int32, the same slot for every row.
        Returns (logits [B, T, V], updated cache). Uses the same attention code as training.
        """
        t = inputs.shape[1]
        kv_segment_ids = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids.astype(jnp.int32),
                                                      (0, cache_index))
        cache = dict(cache, segment_ids=kv_segment_ids)
        x = jnp.take(self.embed[...], inputs, axis=0).astype(self.cfg.compute_dtype)
        q_index = (cache_index + jnp.arange(t, dtype=jnp.int32))[None, :]
        x, (k, v) = self._run_blocks(x, positions, segment_ids, q_index, cache, cache_index)
        logits = self.logits_from_hidden(self.final_norm(x))
        return logits, {"k": k, "v": v, "segment_ids": kv_segment_ids}


# -- counting -------------------------------------------------------------------------------------


def param_count(params: Any) -> int:
    """Total number of parameters in a pytree of arrays (or ShapeDtypeStructs)."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: all but the embedding lookup, plus the
    output projection (which is the embedding itself when tied)."""
    d, hd, layers = cfg.d_model, cfg.head_dim_, cfg.num_layers
    attn = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = 3 * d * cfg.mlp_dim
    return layers * (attn + mlp) + d * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token (forward + backward = 3 × forward, 2 FLOPs per multiply-add).

    `model`: 6 · matmul_params, the usual 6N. `attention`: 12 · L · T · H · hd for the
    score and value products (full T×T, as in the PaLM accounting; causal masking would
    halve the useful part). `total` is their sum.
    """
    model = 6.0 * matmul_params(cfg)
    attention = 12.0 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim_
    return {"model": model, "attention": attention, "total": model + attention}
