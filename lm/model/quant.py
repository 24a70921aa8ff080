"""Frozen weights held in fewer bits (the base of QLoRA, lm/model/lora.py): int8 or NF4 codes with
one absmax scale per block of `block` consecutive values along the weight's last input axis, and
for NF4 the block scales themselves quantized (double quantization, Dettmers et al. 2023, §3).

With b a block of the weight and m = max |b| its absmax:

    int8   q = round(127.5 · x / m) clipped to [−128, 127],   x̂ = q · m / 127.5
    nf4    q = argmin_i |NF4_i − x / m|  (NF4: the paper's 16 levels, −1 … 0 … 1),   x̂ = NF4_q · m

(qwix's absmax convention for int8: the bound 127.5 gives the extreme buckets their full width.)
Double quantization: the NF4 block scales s of a group of up to 256 consecutive blocks (along
the same axis) are stored as int8 codes of s − mean(s) with the group's absmax, plus the mean:
1 byte per 64 weights instead of 4, and 8 more bytes per group.

Bits per weight: int8 8 + 32/64 = 8.5; nf4 4 + 8/64 + 64/(64·g) ≈ 4.14 (g = blocks per group).

The codes and scales come from qwix (Google's quantization library for JAX: `qwix.quantize`,
`qwix.dequantize`, NF4 as the paper's table); what it does not provide, the double quantization
of the scales and the layout that keeps each array's logical axes (so the frozen base shards by
the same rules as the full-precision weight), is here.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

Array = jax.Array
KINDS = ("int8", "nf4")
SCALE_GROUP = 256  # block scales per second-level (double quantization) group, at most


def _layout(shape: tuple[int, ...], axis: int, block: int, name: str) -> tuple[int, int, list[int]]:
    """(the block axis ≥ 0, the block size, the other axes) after checking that the block divides it."""
    axis %= len(shape)
    block = min(block, shape[axis])  # an axis shorter than a block is one block
    if shape[axis] % block:
        raise ValueError(f"lora.block_size={block} does not divide axis {axis} (size {shape[axis]}) of {name} "
                         f"{shape}: pick a block size that divides it (64 for Llama shapes)")
    return axis, block, [a for a in range(len(shape)) if a != axis]


def quantize(w: Array, kind: str, block: int, axis: int, name: str = "weight") -> dict[str, Array]:
    """w (float) → the arrays that hold it: `codes` (int8 of w's shape, or for nf4 uint8 holding two
    4-bit codes per byte, the block axis half as long) and the
    scales (their block axis `block` times shorter): int8 `scale` float32; nf4 `scale_codes` int8,
    `scale_scale` and `scale_mean` float32 (one per group of blocks)."""
    if kind not in KINDS:
        raise ValueError(f"lora.base_dtype: quantized kinds are {KINDS}, got {kind!r}")
    axis, block, others = _layout(w.shape, axis, block, name)
    if kind == "nf4" and w.shape[axis] % 2:
        raise ValueError(f"nf4 packs two codes per byte along axis {axis} of {name} {w.shape}: it must be even")
    q = qwix.quantize(w.astype(jnp.float32), jnp.int8 if kind == "int8" else "nf4", channelwise_axes=others,
                      tiled_axes={axis: block})
    if kind == "int8":
        return {"codes": q.qvalue, "scale": q.scale}
    scale = q.scale  # [..., n/block, ...] float32, ≥ 0
    group = math.gcd(scale.shape[axis], SCALE_GROUP)
    split = scale.shape[:axis] + (scale.shape[axis] // group, group) + scale.shape[axis + 1:]
    mean = jnp.mean(scale.reshape(split), axis=axis + 1)  # [..., n/(block·group), ...]
    centred = scale - jnp.repeat(mean, group, axis=axis)
    q2 = qwix.quantize(centred, jnp.int8, channelwise_axes=others, tiled_axes={axis: group})
    return {"codes": _pack(q.qvalue, axis), "scale_codes": q2.qvalue, "scale_scale": q2.scale, "scale_mean": mean}


def _pack(codes: Array, axis: int) -> Array:
    """4-bit codes → uint8, two per byte (the even position in the low nibble) along `axis`: a
    backend-neutral 0.5 byte per weight (uint4 arrays' layout differs between jit outputs and
    inputs on XLA:CPU)."""
    pairs = codes.astype(jnp.uint8).reshape(*codes.shape[:axis], codes.shape[axis] // 2, 2, *codes.shape[axis + 1:])
    low, high = jnp.take(pairs, 0, axis=axis + 1), jnp.take(pairs, 1, axis=axis + 1)
    return low | (high << 4)


def _unpack(packed: Array, axis: int) -> Array:
    both = jnp.stack([packed & 15, packed >> 4], axis=axis + 1)
    return both.reshape(*packed.shape[:axis], packed.shape[axis] * 2, *packed.shape[axis + 1:])


def dequantize(parts: dict[str, Array], kind: str, axis: int) -> Array:
    """The float32 weight `quantize` stored (up to its rounding)."""
    if kind == "int8":
        return qwix.dequantize(qwix.QArray(parts["codes"], parts["scale"], None, jnp.int8))
    axis %= parts["codes"].ndim
    centred = qwix.dequantize(qwix.QArray(parts["scale_codes"], parts["scale_scale"], None, jnp.int8))
    group = parts["scale_codes"].shape[axis] // parts["scale_mean"].shape[axis]
    scale = centred + jnp.repeat(parts["scale_mean"], group, axis=axis)
    return qwix.dequantize(qwix.QArray(_unpack(parts["codes"], axis), scale, None, "nf4"))


def bits_per_weight(kind: str, block: int, n_blocks_per_group: int = SCALE_GROUP) -> float:
    """Storage bits per quantized weight: codes + the scales' share."""
    if kind == "int8":
        return 8 + 32 / block
    return 4 + 8 / block + 64 / (block * n_blocks_per_group)


class QuantizedWeight(nnx.Module):
    """A frozen weight stored by `quantize`: each array an nnx.Param with the weight's logical axes
    (the double-quantized scales' per-group arrays are replicated along the quantized axis).
    `axis` counts from the end, so a layer's slice of stacked weights reads the same axis."""

    def __init__(self, value: Array, logical_axes: tuple, kind: str, block: int, axis: int, name: str = "weight"):
        axis = axis - value.ndim if axis >= 0 else axis
        self.kind, self.axis = kind, axis
        for key, array in quantize(value, kind, block, axis, name).items():
            axes = logical_axes
            if key in ("scale_scale", "scale_mean"):  # one entry per group of blocks along the quantized
                # axis: too short to shard there (the sharding rules refuse an axis a mesh does not divide)
                # and small; they keep the weight's other axes. The codes (two per byte) and the per-block
                # scales shard like the weight.
                axes = tuple(None if i == array.ndim + axis else a for i, a in enumerate(logical_axes))
            setattr(self, key, nnx.Param(array, logical_axes=axes))

    def dequantize(self) -> Array:
        keys = ("codes", "scale") if self.kind == "int8" else ("codes", "scale_codes", "scale_scale", "scale_mean")
        return dequantize({k: getattr(self, k)[...] for k in keys}, self.kind, self.axis)
