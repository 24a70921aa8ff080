"""Hugging Face checkpoints of Llama, Qwen2 and Mistral ↔ lm Transformers.

    model = load("path/to/hf_dir")          # config.json + model.safetensors (or a sharded index)
    save(model, "out_dir")                  # config.json + model.safetensors for transformers

The three architectures are the same decoder as `lm.model` (pre-norm RMSNorm, rotary, GQA,
SwiGLU), so conversion is renaming and reshaping:

  HF tensor (torch Linear weights are [out, in])     lm parameter
  model.embed_tokens.weight [V, D]                   embed [V, D]
  model.layers.{i}.input_layernorm.weight [D]        blocks.attn_norm.scale [L, D]
  model.layers.{i}.self_attn.q_proj.weight [H·hd, D] blocks.attn.wq [L, D, H, hd]   (transposed)
  model.layers.{i}.self_attn.k_proj/v_proj [K·hd, D] blocks.attn.wk / wv [L, D, K, hd]
  model.layers.{i}.self_attn.{q,k,v}_proj.bias       blocks.attn.bq [L, H, hd], bk / bv [L, K, hd] (Qwen2)
  model.layers.{i}.self_attn.o_proj.weight [D, H·hd] blocks.attn.wo [L, H, hd, D]
  model.layers.{i}.post_attention_layernorm.weight   blocks.mlp_norm.scale [L, D]
  model.layers.{i}.mlp.gate_proj / up_proj [F, D]    blocks.mlp.w_gate / w_up [L, D, F]
  model.layers.{i}.mlp.down_proj.weight [D, F]       blocks.mlp.w_down [L, F, D]
  model.norm.weight [D]                              final_norm.scale [D]
  lm_head.weight [V, D] (absent when tied)           lm_head [D, V] (absent when tied)

Rotary layout: HF's `rotate_half` pairs x_i with x_{i+d/2}, as `lm.model.rotary` does, so the q/k
weights are taken as they are (no interleave permutation: that is only for Meta's original
checkpoints). The k/v heads are counted with `num_key_value_heads`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from lm.interop import safetensors_io

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
_MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved; recomputed here


class UnsupportedCheckpointError(ValueError):
    """A Hugging Face checkpoint lm cannot represent (architecture, feature, tensor or shape)."""


# -- config -------------------------------------------------------------------------------------------


def _rope_settings(hf: dict, where: str) -> tuple[float, dict]:
    """(rope_theta, lm rope fields) from either transformers 4's `rope_theta` + `rope_scaling` or
    transformers 5's `rope_parameters`."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return theta, {}
    if kind == "llama3":
        return theta, {"rope_scaling": "llama3", "rope_factor": float(scaling["factor"]),
                       "rope_low_freq_factor": float(scaling["low_freq_factor"]),
                       "rope_high_freq_factor": float(scaling["high_freq_factor"]),
                       "rope_original_max_position": int(scaling["original_max_position_embeddings"])}
    raise UnsupportedCheckpointError(f"{where}: rope scaling {kind!r} is not supported (lm knows 'default' "
                                     "and 'llama3')")


def model_fields_from_hf(hf: dict, where: str = "config.json") -> dict:
    """The `lm.model.ModelConfig` fields of a Hugging Face config.json (a dict). Raises
    UnsupportedCheckpointError naming the key for anything lm's model cannot reproduce."""
    archs = hf.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise UnsupportedCheckpointError(f"{where}: architectures={archs!r} is not supported; lm imports "
                                         f"exactly one of {list(ARCHITECTURES)}")
    problems = []
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        problems.append(f"hidden_act={act!r} (lm's MLP is SwiGLU: 'silu')")
    for key in ("attention_bias", "mlp_bias"):  # Llama's optional biases (o_proj / MLP too): not in lm
        if hf.get(key):
            problems.append(f"{key}=true (lm has biases only on q, k and v, as Qwen2)")
    if archs[0] == "Qwen2ForCausalLM" and hf.get("use_sliding_window"):
        problems.append("use_sliding_window=true (lm attends to the whole context)")
    if problems:
        raise UnsupportedCheckpointError(f"{where}: unsupported settings: " + "; ".join(problems))
    window = hf.get("sliding_window") if archs[0] == "MistralForCausalLM" else None
    if window:
        print(f"[lm.interop.hf] {where}: sliding_window={window}: lm attends to the whole context, so its "
              f"outputs equal transformers' only for sequences of at most {window} tokens", file=sys.stderr)
    d, h = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    theta, rope = _rope_settings(hf, where)
    fields = dict(
        vocab_size=int(hf["vocab_size"]), d_model=d, num_layers=int(hf["num_hidden_layers"]), num_heads=h,
        num_kv_heads=int(hf.get("num_key_value_heads") or h), head_dim=int(hf.get("head_dim") or d // h),
        mlp_dim=int(hf["intermediate_size"]), rope_theta=theta, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=archs[0] == "Qwen2ForCausalLM", **rope)
    if fields["head_dim"] * h == d:
        fields["head_dim"] = None  # lm's default: d_model // num_heads
    return fields


def hf_config_from_model(cfg, architecture: str | None = None, dtype: str = "float32") -> dict:
    """A config.json dict for `cfg` (an lm ModelConfig). architecture: one of ARCHITECTURES;
    None: Qwen2ForCausalLM when cfg.qkv_bias, else LlamaForCausalLM. dtype: the tensors' (torch_dtype)."""
    arch = architecture or ("Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM")
    if arch not in ARCHITECTURES:
        raise UnsupportedCheckpointError(f"architecture {arch!r} is not one of {list(ARCHITECTURES)}")
    if cfg.qkv_bias != (arch == "Qwen2ForCausalLM"):
        raise UnsupportedCheckpointError(f"{arch} {'has no' if cfg.qkv_bias else 'needs'} q/k/v biases but "
                                         f"model.qkv_bias={cfg.qkv_bias}; export as "
                                         f"{'Qwen2ForCausalLM' if cfg.qkv_bias else 'LlamaForCausalLM'}")
    if cfg.rope_scaling != "none" and arch != "LlamaForCausalLM":
        raise UnsupportedCheckpointError(f"rope_scaling={cfg.rope_scaling!r} is exported only as LlamaForCausalLM")
    hf = {
        "architectures": [arch], "model_type": _MODEL_TYPES[arch], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim_, "intermediate_size": cfg.mlp_dim,
        "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": dtype, "max_position_embeddings": 8192,
        "attention_dropout": 0.0,
    }
    if arch == "LlamaForCausalLM":
        hf.update(attention_bias=False, mlp_bias=False)
    if arch == "MistralForCausalLM":
        hf["sliding_window"] = None
    if arch == "Qwen2ForCausalLM":
        hf["use_sliding_window"] = False
    if cfg.rope_scaling == "llama3":
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_factor,
                              "low_freq_factor": cfg.rope_low_freq_factor,
                              "high_freq_factor": cfg.rope_high_freq_factor,
                              "original_max_position_embeddings": cfg.rope_original_max_position}
        hf["max_position_embeddings"] = max(8192, int(cfg.rope_original_max_position * cfg.rope_factor))
    return hf


# -- tensors ------------------------------------------------------------------------------------------


def _layer_map(cfg) -> dict[tuple[str, ...], tuple[str, Any, Any]]:
    """lm path under `blocks` → (HF name template, to_lm(hf array) → lm layer array, to_hf(inverse))."""
    d, h, kv, hd, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim_, cfg.mlp_dim
    same = (lambda a: a, lambda a: a)

    def proj(heads):  # torch [heads·hd, D] ↔ lm [D, heads, hd]
        return (lambda a: a.T.reshape(d, heads, hd), lambda a: a.reshape(d, heads * hd).T)

    def bias(heads):  # [heads·hd] ↔ [heads, hd]
        return (lambda a: a.reshape(heads, hd), lambda a: a.reshape(heads * hd))

    p = "model.layers.{i}."
    table = {
        ("attn_norm", "scale"): (p + "input_layernorm.weight", *same),
        ("attn", "wq"): (p + "self_attn.q_proj.weight", *proj(h)),
        ("attn", "wk"): (p + "self_attn.k_proj.weight", *proj(kv)),
        ("attn", "wv"): (p + "self_attn.v_proj.weight", *proj(kv)),
        ("attn", "wo"): (p + "self_attn.o_proj.weight", lambda a: a.T.reshape(h, hd, d),
                         lambda a: a.reshape(h * hd, d).T),
        ("mlp_norm", "scale"): (p + "post_attention_layernorm.weight", *same),
        ("mlp", "w_gate"): (p + "mlp.gate_proj.weight", lambda a: a.T, lambda a: a.T),
        ("mlp", "w_up"): (p + "mlp.up_proj.weight", lambda a: a.T, lambda a: a.T),
        ("mlp", "w_down"): (p + "mlp.down_proj.weight", lambda a: a.T, lambda a: a.T),
    }
    if cfg.qkv_bias:
        table[("attn", "bq")] = (p + "self_attn.q_proj.bias", *bias(h))
        table[("attn", "bk")] = (p + "self_attn.k_proj.bias", *bias(kv))
        table[("attn", "bv")] = (p + "self_attn.v_proj.bias", *bias(kv))
    del f
    return table


def _expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    d, h, kv, hd, f, v = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim_, cfg.mlp_dim, cfg.vocab_size
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (v, d)
    per_layer = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
                 "self_attn.q_proj.weight": (h * hd, d), "self_attn.k_proj.weight": (kv * hd, d),
                 "self_attn.v_proj.weight": (kv * hd, d), "self_attn.o_proj.weight": (d, h * hd),
                 "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f)}
    if cfg.qkv_bias:
        per_layer.update({"self_attn.q_proj.bias": (h * hd,), "self_attn.k_proj.bias": (kv * hd,),
                          "self_attn.v_proj.bias": (kv * hd,)})
    for i in range(cfg.num_layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in per_layer.items()})
    return shapes


def check_tensors(tensors: Mapping[str, Any], cfg, where: str) -> None:
    """Every tensor the config implies is there with its shape, and nothing else is."""
    expected = _expected_shapes(cfg)
    for name, shape in expected.items():
        if name not in tensors:
            hint = " (config.json says tie_word_embeddings=false)" if name == "lm_head.weight" else ""
            raise UnsupportedCheckpointError(f"{where}: missing tensor {name!r}{hint}")
        if tuple(tensors[name].shape) != shape:
            raise UnsupportedCheckpointError(f"{where}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                                             f"config.json implies {shape}")
    extra = sorted(n for n in tensors if n not in expected and not n.endswith(_IGNORED_SUFFIXES))
    if extra:
        raise UnsupportedCheckpointError(f"{where}: tensor {extra[0]!r} has no place in lm's model"
                                         + (f" ({len(extra)} such tensors)" if len(extra) > 1 else ""))


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg, where: str = "checkpoint") -> dict:
    """HF tensors (name → array) → lm's parameter tree (nested dict of float32 numpy arrays)."""
    check_tensors(tensors, cfg, where)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731  (bf16/f16 checkpoints are upcast)
    blocks: dict = {}
    for (module, name), (template, to_lm, _) in _layer_map(cfg).items():
        layers = [to_lm(f32(tensors[template.format(i=i)])) for i in range(cfg.num_layers)]
        blocks.setdefault(module, {})[name] = np.stack(layers)
    params = {"embed": f32(tensors["model.embed_tokens.weight"]), "blocks": blocks,
              "final_norm": {"scale": f32(tensors["model.norm.weight"])}}
    if not cfg.tie_embeddings:
        params["lm_head"] = f32(tensors["lm_head.weight"]).T.copy()
    return params


def hf_from_params(params: Mapping, cfg, dtype: str = "float32") -> dict[str, np.ndarray]:
    """lm's parameter tree → HF tensors (name → contiguous array in `dtype`: each value taken in
    float32, then rounded to nearest even, as torch's .to(dtype))."""
    store = np_dtype(dtype)
    c = lambda a: np.ascontiguousarray(np.asarray(a, np.float32).astype(store))  # noqa: E731
    out = {"model.embed_tokens.weight": c(params["embed"]), "model.norm.weight": c(params["final_norm"]["scale"])}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = c(np.asarray(params["lm_head"]).T)
    for (module, name), (template, _, to_hf) in _layer_map(cfg).items():
        stacked = np.asarray(params["blocks"][module][name])
        for i in range(cfg.num_layers):
            out[template.format(i=i)] = c(to_hf(stacked[i]))
    return out


# -- dtypes -------------------------------------------------------------------------------------------

FLOAT_DTYPES = ("float32", "bfloat16", "float16")  # the dtypes an export may write


def np_dtype(name: str):
    """'float32' | 'bfloat16' | 'float16' → the numpy dtype (ml_dtypes' bfloat16)."""
    if name not in FLOAT_DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {list(FLOAT_DTYPES)}")
    return np.dtype(safetensors_io.DTYPES[{"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[name]])


def tensors_dtype(tensors: Mapping[str, Any]) -> str:
    """The float dtype holding most of a checkpoint's weights ('bfloat16' for a bf16 checkpoint
    that keeps a few float32 norms), by element count; 'float32' when none is a float."""
    names = {np_dtype(n): n for n in FLOAT_DTYPES}
    counts: dict[str, int] = {}
    for a in tensors.values():
        name = names.get(np.dtype(a.dtype).newbyteorder("="))
        if name is not None:
            counts[name] = counts.get(name, 0) + int(np.prod(a.shape))
    return max(counts, key=counts.get) if counts else "float32"


# -- files --------------------------------------------------------------------------------------------


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: is {hf_dir!r} a Hugging Face checkpoint directory?")
    with open(path) as f:
        return json.load(f)


def load_params(hf_dir: str):
    """(ModelConfig, params as a nested dict of numpy float32 arrays) of a checkpoint directory."""
    from lm.model import ModelConfig

    cfg = ModelConfig(**model_fields_from_hf(read_hf_config(hf_dir), os.path.join(hf_dir, "config.json")))
    return cfg, params_from_hf(safetensors_io.read_dir(hf_dir), cfg, hf_dir)


def load(hf_dir: str, **overrides):
    """An lm Transformer holding a HF checkpoint's weights. overrides: more ModelConfig fields
    (e.g. dtype, scan_layers), which must not change a parameter shape."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lm.model import Transformer

    cfg, params = load_params(hf_dir)
    cfg = dataclasses.replace(cfg, **overrides)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    state = nnx.to_pure_dict(abstract)
    nnx.replace_by_pure_dict(abstract, jax.tree.map(lambda _, a: jnp.asarray(a), state, params))
    return nnx.merge(graphdef, abstract)


def save(model, hf_dir: str, architecture: str | None = None, params: Any = None, dtype: str = "float32") -> str:
    """Write `model` (an lm Transformer; or its ModelConfig with `params`) as config.json +
    model.safetensors in `hf_dir`, loadable by transformers.AutoModelForCausalLM.from_pretrained.
    dtype: the tensors' ('float32', 'bfloat16' or 'float16'; the values rounded to nearest even)."""
    from flax import nnx

    cfg = model if params is not None else model.cfg
    if params is None:
        params = nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])
    hf = hf_config_from_model(cfg, architecture, dtype)
    os.makedirs(hf_dir, exist_ok=True)
    safetensors_io.write_file(os.path.join(hf_dir, safetensors_io.SINGLE_FILE), hf_from_params(params, cfg, dtype),
                              metadata={"format": "pt"})
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    return hf_dir



if __name__ == "__main__":  # python -m lm.interop.hf import|export ... (lm/interop/hf_run.py)
    from lm.interop.hf_run import main

    sys.exit(main())
