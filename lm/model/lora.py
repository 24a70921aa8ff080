"""Low-rank adapters (LoRA, Hu et al. 2021) on the Transformer's projections, and the one function
through which attention.py and layers.py multiply by their weights.

A targeted projection W [in, out] (its 2-D view; the stored weight keeps its own axes) becomes

    y = x·W + s·(x·A)·B,     A [in, r], B [r, out],  s = α/r  (rsLoRA: α/√r)

with A drawn like PEFT's (uniform ±1/√in) and B = 0, so an adapted model computes exactly its
base's outputs until B moves. The adapter product is computed separately, never as W + s·A·B:
merging would make the backward pass form the full d×d gradient of W (as costly as full
fine-tuning's) to reduce it to A's and B's; the separate path costs 2·M·r·(in + out) more
multiply-adds per projection, negligible next to M·in·out for r ≪ d.

Adapters are `nnx.LoRAParam`s (flax's variable type for them, a Param subclass: filters pick them
out) named `<weight>_lora_a` / `<weight>_lora_b` beside the weight, with the weight's logical axes
on their `in` and `out` sides (so they shard like it) and none on the rank. A frozen base weight
may be a `lm.model.quant.QuantizedWeight` (int8 / NF4), dequantized here per use: under the layer
scan, one layer's weight at a time.

Adapter dropout (PEFT's lora_dropout): in training, the adapter path reads a dropped-out input,

    y = x·W + s·(dropout_p(x)·A)·B,     dropout_p(x) = x·m/(1−p),  m ~ Bernoulli(1−p) per element,

one mask per adapted weight (as PEFT has a Dropout per adapted Linear). The keys are a
`DropoutKey` variable beside the adapters (one per layer under the stacked blocks), which exists
only in the graph of the training forward (`add_dropout_keys`, filled from the step's rng by
`dropout_keys`); without it (evaluation, sampling, export) the forward is deterministic and equals
the no-dropout one.

`TARGETS`: config name → (weight attribute, Hugging Face / PEFT module name, input axes).
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from lm.model.quant import QuantizedWeight

Array = jax.Array

TARGETS = {  # name: (attribute on Attention / MLP, PEFT target module, number of input axes, per-layer ndim)
    "q": ("wq", "q_proj", 1, 3), "k": ("wk", "k_proj", 1, 3), "v": ("wv", "v_proj", 1, 3),
    "o": ("wo", "o_proj", 2, 3), "gate": ("w_gate", "gate_proj", 1, 2), "up": ("w_up", "up_proj", 1, 2),
    "down": ("w_down", "down_proj", 1, 2)}
ATTRS = {attr: name for name, (attr, *_) in TARGETS.items()}
SUFFIX_A, SUFFIX_B = "_lora_a", "_lora_b"
DROPOUT_KEY = "lora_dropout_key"  # the module attribute holding a training forward's dropout keys


class DropoutKey(nnx.Variable):
    """Key data (uint32 [*layers, *key]) of the adapter dropout in one training forward: neither a
    parameter nor frozen state (never saved), filled per step from the step's rng."""


def target_names(spec: str) -> list[str]:
    """'q,v' / 'all' / 'attention' / 'mlp' / a regex over the names (q, k, v, o, gate, up, down) →
    the names, in TARGETS order; an unknown spec is an error listing them."""
    groups = {"all": list(TARGETS), "attention": ["q", "k", "v", "o"], "mlp": ["gate", "up", "down"]}
    names: list[str] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        hits = groups.get(part) or [n for n in TARGETS if n == part or n == part.removesuffix("_proj")
                                    or re.fullmatch(part, n)]
        if not hits:
            raise ValueError(f"lora.targets: {part!r} names no projection; use names from {list(TARGETS)}, "
                             f"'all', 'attention', 'mlp' or a regex over those names")
        names += hits
    if not names:
        raise ValueError(f"lora.targets={spec!r} selects no projection")
    return [n for n in TARGETS if n in names]


def scaling(rank: int, alpha: float, rslora: bool = False) -> float:
    """s = α/r, or α/√r (rsLoRA, Kalajdzievski 2023)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def kernel(var) -> Array:
    """A weight's value: the array of an nnx.Param, or a QuantizedWeight dequantized (float32)."""
    return var.dequantize() if isinstance(var, QuantizedWeight) else var[...]


def project(module: nnx.Module, x2: Array, attrs: tuple[str, ...], dtype) -> tuple[Array, ...]:
    """x2 [M, in] times each weight `attrs` of `module` (2-D views [in, out_i], in `dtype`) → the
    products [M, out_i], plus each one's adapter term s·(x·A)·B where the module has one."""
    from lm.model.layers import matmuls  # layers.py imports this module

    d = x2.shape[-1]
    outs = matmuls(x2, *[kernel(getattr(module, a)).astype(dtype).reshape(d, -1) for a in attrs])
    if not any(hasattr(module, a + SUFFIX_A) for a in attrs):
        return outs
    s = jnp.asarray(module.lora_scaling, dtype)
    keys = getattr(module, DROPOUT_KEY, None)  # present only in a training forward with lora.dropout > 0
    adapted = []
    for a, y in zip(attrs, outs):
        if hasattr(module, a + SUFFIX_A):
            lora_a = getattr(module, a + SUFFIX_A)[...].astype(dtype).reshape(d, -1)  # [in, r]
            lora_b = getattr(module, a + SUFFIX_B)[...].astype(dtype)
            xa = x2 if keys is None else dropout(x2, jax.random.fold_in(jax.random.wrap_key_data(keys[...]),
                                                                         list(ATTRS).index(a)), module.lora_dropout)
            y = y + s * ((xa @ lora_a) @ lora_b.reshape(lora_a.shape[-1], -1))  # [M, r] @ [r, out]
        adapted.append(y)
    return tuple(adapted)


def dropout(x: Array, key: Array, rate: float) -> Array:
    """x·m/(1−rate), m ~ Bernoulli(1−rate) per element (torch.nn.Dropout in training)."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def add_dropout_keys(model: nnx.Module, rate: float) -> nnx.Module:
    """Give every adapted module of `model` (in place) a `DropoutKey` of zeros, one key per layer,
    and its rate: the graph of the training forward (`dropout_keys` gives the values)."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"lora.dropout: a training forward with dropout needs 0 < rate < 1, got {rate}")
    key_shape = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape
    for _, module in list(nnx.iter_modules(model)):
        if not hasattr(module, "lora_scaling"):
            continue
        attr = next(a for a in ATTRS if hasattr(module, a + SUFFIX_A))
        _, _, in_axes, _ = TARGETS[ATTRS[attr]]
        a_var = getattr(module, attr + SUFFIX_A)
        lead = tuple(a_var.shape[:a_var.ndim - in_axes - 1])  # A is [*lead, *in, r]
        module.lora_dropout = float(rate)
        setattr(module, DROPOUT_KEY, DropoutKey(jnp.zeros(lead + key_shape, jnp.uint32)))
    return model


def dropout_keys(shapes: dict, rng: Array) -> dict:
    """The DropoutKey part of a pure parameter dict (`shapes`: its ShapeDtypeStructs, nested as the
    model) filled with independent keys from `rng` (a key): one per module and layer."""
    flat, tree = jax.tree_util.tree_flatten(shapes)
    filled = []
    for i, sds in enumerate(flat):
        lead = sds.shape[:-1]
        keys = jax.random.split(jax.random.fold_in(rng, i), max(1, math.prod(lead)))
        filled.append(jax.random.key_data(keys).reshape(sds.shape).astype(sds.dtype))
    return jax.tree_util.tree_unflatten(tree, filled)


def _adapter_shapes(var, per_layer_ndim: int, in_axes: int, rank: int):
    """(A shape, A axes, B shape, B axes, fan-in) for a weight of shape [*lead, *in, *out]."""
    shape, axes = tuple(var.shape), tuple(var.get_metadata()["logical_axes"])
    lead = len(shape) - per_layer_ndim
    cut = lead + in_axes
    a_shape, a_axes = shape[:cut] + (rank,), axes[:cut] + (None,)
    b_shape, b_axes = shape[:lead] + (rank,) + shape[cut:], axes[:lead] + (None,) + axes[cut:]
    return a_shape, a_axes, b_shape, b_axes, math.prod(shape[lead:cut])


def add_adapters(model: nnx.Module, names: list[str], rank: int, scale: float, rngs: nnx.Rngs) -> int:
    """Give every attention / MLP module of `model` an adapter pair on each targeted weight (in
    place): A uniform in ±1/√in (PEFT's kaiming_uniform(a=√5) on [r, in]), B zeros, float32.
    Returns the number of weights adapted."""
    wanted = {TARGETS[n][0]: TARGETS[n] for n in names}
    count = 0
    for _, module in nnx.iter_modules(model):
        hits = [attr for attr in wanted if isinstance(getattr(module, attr, None), (nnx.Param, QuantizedWeight))]
        for attr in hits:
            _, _, in_axes, per_layer_ndim = wanted[attr]
            a_shape, a_axes, b_shape, b_axes, fan_in = _adapter_shapes(getattr(module, attr), per_layer_ndim,
                                                                       in_axes, rank)
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(rngs.params(), a_shape, jnp.float32, -bound, bound)
            setattr(module, attr + SUFFIX_A, nnx.LoRAParam(a, logical_axes=a_axes))
            setattr(module, attr + SUFFIX_B, nnx.LoRAParam(jnp.zeros(b_shape, jnp.float32), logical_axes=b_axes))
            count += 1
        if hits:
            module.lora_scaling = scale
    if not count:
        raise ValueError(f"lora.targets {names}: the model has no such weight to adapt")
    return count


def quantize_base(model: nnx.Module, base_dtype: str, block: int, keep=lambda path: False) -> None:
    """Hold the frozen weights of `model` in `base_dtype` (in place): 'float32' as they are;
    'bfloat16' every float Param cast; 'int8' / 'nf4' the projections (all of TARGETS, adapted or
    not) as QuantizedWeights, blocks along their last input axis, and the rest (embedding, norms,
    output head) in bfloat16, as QLoRA keeps them. Adapters (LoRAParam) and the parameters whose
    path `keep(path)` accepts (trained heads) are left alone."""
    if base_dtype not in ("float32", "bfloat16", "int8", "nf4"):
        raise ValueError(f"lora.base_dtype must be 'float32', 'bfloat16', 'int8' or 'nf4', got {base_dtype!r}")
    if base_dtype == "float32":
        return
    for path, module in list(nnx.iter_modules(model)):
        for attr, var in list(vars(module).items()):
            if not isinstance(var, nnx.Param) or isinstance(var, nnx.LoRAParam) or keep((*path, attr)):
                continue
            if base_dtype in ("int8", "nf4") and attr in ATTRS:
                _, _, in_axes, per_layer_ndim = TARGETS[ATTRS[attr]]
                axis = -(per_layer_ndim - in_axes + 1)  # the last input axis, counted from the end
                setattr(module, attr, QuantizedWeight(var[...], tuple(var.get_metadata()["logical_axes"]),
                                                      base_dtype, block, axis, name=attr))
            elif jnp.issubdtype(var[...].dtype, jnp.floating):
                var.set_value(var[...].astype(jnp.bfloat16))


def _plus_adapter(w: Array, a: Array, b: Array, scale: float, per_layer_ndim: int) -> Array:
    """W + s·A·B in float32, for W [*lead, *in, *out], A [*lead, *in, r], B [*lead, r, *out]."""
    lead = w.ndim - per_layer_ndim
    a2 = a.astype(jnp.float32).reshape(*a.shape[:lead], -1, a.shape[-1])  # [*lead, in, r]
    b2 = b.astype(jnp.float32).reshape(*b.shape[:lead + 1], -1)  # [*lead, r, out]
    return w.astype(jnp.float32) + scale * jnp.matmul(a2, b2).reshape(w.shape)


def fold_in(model: nnx.Module) -> nnx.Module:
    """`model` with, in place, every adapter folded into its weight (W + s·A·B, float32) and
    every quantized weight dequantized (float32): a plain model again, for layouts that read the
    weights directly (lm/model/cpu.py) and for export. A model with neither is left as it is."""
    for _, module in list(nnx.iter_modules(model)):
        for attr in [a for a in ATTRS if hasattr(module, a)]:
            var = getattr(module, attr)
            adapted = hasattr(module, attr + SUFFIX_A)
            if not adapted and not isinstance(var, QuantizedWeight):
                continue
            axes = (var.codes if isinstance(var, QuantizedWeight) else var).get_metadata()["logical_axes"]
            w = kernel(var)
            if adapted:
                w = _plus_adapter(w, getattr(module, attr + SUFFIX_A)[...], getattr(module, attr + SUFFIX_B)[...],
                                  module.lora_scaling, TARGETS[ATTRS[attr]][3])
                delattr(module, attr + SUFFIX_A)
                delattr(module, attr + SUFFIX_B)
            setattr(module, attr, nnx.Param(w.astype(jnp.float32), logical_axes=tuple(axes)))
        if hasattr(module, "lora_scaling"):
            delattr(module, "lora_scaling")
    return model


def as_held(params: dict, base_dtype: str, block: int) -> dict:
    """A float32 base parameter dict as `quantize_base` holds it, back in float32: the projections
    quantized and dequantized (int8 / nf4), every other weight rounded through bfloat16 (all of
    them for 'bfloat16'). Merging adapters into this gives the model that was trained (PEFT's
    merge of a quantized base dequantizes it too)."""
    from lm.model.quant import dequantize, quantize

    if base_dtype == "float32":
        return params
    out = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out[key] = as_held(value, base_dtype, block)
        elif key.endswith((SUFFIX_A, SUFFIX_B)):
            out[key] = value
        elif base_dtype in ("int8", "nf4") and key in ATTRS:
            _, _, in_axes, per_layer_ndim = TARGETS[ATTRS[key]]
            axis = -(per_layer_ndim - in_axes + 1)
            out[key] = dequantize(quantize(jnp.asarray(value), base_dtype, block, axis, key), base_dtype, axis)
        else:
            out[key] = jnp.asarray(value).astype(jnp.bfloat16).astype(jnp.float32)
    return out


def merge_weights(params: dict, scale: float, dtype=None) -> dict:
    """A pure parameter dict with adapters → the same without them, each adapted weight replaced
    by W + s·A·B (PEFT's merge_and_unload), computed in float32 and stored in `dtype` (default:
    W's own dtype; a quantized W is dequantized and stored in float32 unless `dtype` says)."""
    from lm.model.quant import dequantize

    out = {}
    for key, value in params.items():
        if key.endswith((SUFFIX_A, SUFFIX_B)):
            continue
        if isinstance(value, dict) and "codes" in value:  # a QuantizedWeight
            if key not in ATTRS:
                raise ValueError(f"quantized parameter {key!r} is not a projection of {list(ATTRS)}")
            _, _, in_axes, per_layer_ndim = TARGETS[ATTRS[key]]
            kind = "int8" if "scale" in value else "nf4"
            w = dequantize(value, kind, -(per_layer_ndim - in_axes + 1))
            store = dtype or jnp.float32
        elif isinstance(value, dict):
            out[key] = merge_weights(value, scale, dtype)
            continue
        else:
            w, store = value, dtype or value.dtype
        if key + SUFFIX_A in params:
            w = _plus_adapter(w, params[key + SUFFIX_A], params[key + SUFFIX_B], scale, TARGETS[ATTRS[key]][3])
        out[key] = jnp.asarray(w).astype(store)
    return out


def is_adapter(path: tuple, var=None) -> bool:
    """nnx filter / path test: an adapter array (its key ends in _lora_a / _lora_b)."""
    return str(getattr(path[-1], "key", path[-1])).endswith((SUFFIX_A, SUFFIX_B))


def adapters_off(params: dict) -> dict:
    """The same pure dict with every B zero: the adapted model computes exactly its base."""
    return {k: (adapters_off(v) if isinstance(v, dict) else jnp.zeros_like(v) if k.endswith(SUFFIX_B) else v)
            for k, v in params.items()}
