"""The Transformer's building blocks besides attention: parameters with logical axes, RMSNorm,
rotary position embeddings, the weight products and SwiGLU (with written-out VJPs when compiling
for CPU), and the SwiGLU MLP."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lm.model.config import ModelConfig
from lm.model.hints import constrain
from lm.model.platform import cpu_kernels

Array = jax.Array


def param(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, axes: tuple[str, ...]) -> nnx.Param:
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


def matmuls(x: Array, *ws: Array) -> tuple[Array, ...]:
    """x [M, D] @ w [D, N] for each w: every weight product of a block, with M = B·T flattened so
    each weight gradient is one 2-D product (contracting two batch axes at once is several times
    slower on XLA:CPU). Compiling for CPU (lm/model/platform.py: cpu_kernels) the backward pass
    is `_matmuls_cpu`'s; elsewhere plain autodiff, which TPU and GPU compilers fuse and shard."""
    return _matmuls_cpu(x, *ws) if cpu_kernels() else tuple(x @ w for w in ws)


@jax.custom_vjp
def _matmuls_cpu(x: Array, *ws: Array) -> tuple[Array, ...]:
    """`matmuls` whose backward pass forms the weight gradients from one transposed copy of x.

    Autodiff would compute dW = xᵀ·dy as a product contracting both operands' first axis, which
    XLA:CPU hands to a slower kernel than the plain [D, M] @ [M, N] product: for the narrow
    outputs of q, k, v and o (N = 256 or 512, M = 2048) 60–77% of the matmul peak against 78–89%.
    Here xᵀ is written out once (the barrier keeps XLA from folding the transpose back into the
    product) and shared by all the weights that read x.
    """
    return tuple(x @ w for w in ws)


def _matmuls_fwd(x, *ws):
    return _matmuls_cpu(x, *ws), (x, ws)


def _matmuls_bwd(saved, grads):
    x, ws = saved
    xt = jax.lax.optimization_barrier(x.T)
    dx = functools.reduce(jnp.add, [g @ w.T for g, w in zip(grads, ws)])
    return (dx, *[xt @ g for g in grads])


_matmuls_cpu.defvjp(_matmuls_fwd, _matmuls_bwd)


def swiglu(gate: Array, up: Array) -> Array:
    """silu(gate) · up, elementwise. Compiling for CPU (lm/model/platform.py: cpu_kernels) with
    `_swiglu_cpu`'s backward pass; elsewhere plain autodiff (the TPU/GPU compilers fuse it)."""
    return _swiglu_cpu(gate, up) if cpu_kernels() else jax.nn.silu(gate) * up


@jax.custom_vjp
def _swiglu_cpu(gate: Array, up: Array) -> Array:
    """silu(gate) · up, whose backward pass keeps only its two inputs.

    Plain autodiff saves sigmoid(gate) and silu(gate) as well: two more [B·T, mlp_dim] arrays per
    layer, each written and read again. Here the backward pass recomputes the sigmoid inside the
    one fusion that produces both gradients.
    """
    return gate * jax.nn.sigmoid(gate) * up


def _swiglu_fwd(gate, up):
    return _swiglu_cpu(gate, up), (gate, up)


def _swiglu_bwd(saved, grad):
    gate, up = saved
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    # d silu / d gate = sig + gate · sig · (1 − sig) = sig + silu · (1 − sig)
    return grad * up * (sig + silu * (1 - sig)), grad * silu


_swiglu_cpu.defvjp(_swiglu_fwd, _swiglu_bwd)


class MLP(nnx.Module):
    """SwiGLU: (silu(x W_gate) ⊙ x W_up) W_down. `gate_up` and `down` are its two weight products,
    which a decode layout may replace (lm/model/cpu.py)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.mlp_dim
        self.w_gate = param(rngs, (d, f), cfg.init_scale / math.sqrt(d), ("embed", "mlp"))
        self.w_up = param(rngs, (d, f), cfg.init_scale / math.sqrt(d), ("embed", "mlp"))
        out_std = cfg.init_scale / math.sqrt(f) / math.sqrt(2 * cfg.num_layers)
        self.w_down = param(rngs, (f, d), out_std, ("mlp", "embed"))
        self.dtype = cfg.compute_dtype

    def gate_up(self, x2: Array) -> tuple[Array, Array]:
        """x [M, D] → (gate, up) [M, mlp_dim]."""
        return matmuls(x2, self.w_gate[...].astype(self.dtype), self.w_up[...].astype(self.dtype))

    def down(self, hidden: Array) -> Array:
        """hidden [M, mlp_dim] → [M, D]."""
        return matmuls(hidden, self.w_down[...].astype(self.dtype))[0]

    def __call__(self, x: Array) -> Array:
        x2 = x.reshape(-1, x.shape[-1])  # [B·T, D]: plain 2-D matmuls, forward and backward
        gate, up = self.gate_up(x2)
        gate, up = constrain(gate, ("batch", "mlp")), constrain(up, ("batch", "mlp"))
        return self.down(swiglu(gate, up)).reshape(x.shape)
