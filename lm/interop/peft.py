"""LoRA adapters ↔ PEFT adapter directories, and a LoRA run's parameters for export.

A PEFT LoRA adapter directory (what `peft.PeftModel.save_pretrained` writes and
`PeftModel.from_pretrained(base, dir)` reads) holds

    adapter_config.json         peft_type LORA, r, lora_alpha, use_rslora, target_modules, ...
    adapter_model.safetensors   base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight  [r, in]
                                base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight  [out, r]

with torch's layouts: W is [out, in] and the adapted product is W x + s·B A x, s = α/r (α/√r
with use_rslora). lm keeps A [in, r] and B [r, out] per layer, stacked (lm/model/lora.py), with
the projections' own axes for in and out; the conversion is a transpose and a reshape, in the
same row orders as lm/interop/hf.py's weights, so the two directions are exact inverses.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from lm.interop import safetensors_io
from lm.model import lora

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model.model.layers.{i}."
MODULE_OF = {"q": ("attn", "self_attn"), "k": ("attn", "self_attn"), "v": ("attn", "self_attn"),
             "o": ("attn", "self_attn"), "gate": ("mlp", "mlp"), "up": ("mlp", "mlp"), "down": ("mlp", "mlp")}


def _names(name: str, i: int) -> tuple[str, str]:
    lm_module, hf_module = MODULE_OF[name]
    base = PREFIX.format(i=i) + f"{hf_module}.{lora.TARGETS[name][1]}."
    return base + "lora_A.weight", base + "lora_B.weight"


def targets_of(adapters: Mapping) -> list[str]:
    """The target names (q, k, …) an lm adapter dict holds."""
    blocks = adapters["blocks"]
    return [n for n, (attr, *_) in lora.TARGETS.items()
            if attr + lora.SUFFIX_A in blocks.get(MODULE_OF[n][0], {})]


def peft_tensors(adapters: Mapping, num_layers: int) -> dict[str, np.ndarray]:
    """lm adapters ({'blocks': {'attn': {'wq_lora_a': [L, D, r], …}}}) → PEFT's tensors (float32)."""
    out = {}
    for name in targets_of(adapters):
        attr = lora.TARGETS[name][0]
        module = adapters["blocks"][MODULE_OF[name][0]]
        a, b = np.asarray(module[attr + lora.SUFFIX_A], np.float32), np.asarray(module[attr + lora.SUFFIX_B], np.float32)
        for i in range(num_layers):
            a_name, b_name = _names(name, i)
            out[a_name] = np.ascontiguousarray(a[i].reshape(-1, a.shape[-1]).T)  # [r, in]
            out[b_name] = np.ascontiguousarray(b[i].reshape(b.shape[1], -1).T)  # [out, r]
    return out


def adapters_from_peft(tensors: Mapping[str, np.ndarray], model_cfg, targets: list[str], where: str) -> dict:
    """PEFT's tensors → lm adapters (stacked over layers, float32), for `targets`; a missing or
    misshapen tensor is an error naming it."""
    d, h, kv, hd, f = (model_cfg.d_model, model_cfg.num_heads, model_cfg.num_kv_heads, model_cfg.head_dim_,
                       model_cfg.mlp_dim)
    in_shape = {"q": (d,), "k": (d,), "v": (d,), "o": (h, hd), "gate": (d,), "up": (d,), "down": (f,)}
    out_shape = {"q": (h, hd), "k": (kv, hd), "v": (kv, hd), "o": (d,), "gate": (f,), "up": (f,), "down": (d,)}
    blocks: dict = {}
    for name in targets:
        a_layers, b_layers = [], []
        for i in range(model_cfg.num_layers):
            a_name, b_name = _names(name, i)
            for t in (a_name, b_name):
                if t not in tensors:
                    raise ValueError(f"{where}: missing tensor {t!r} (adapter_config.json targets {name!r})")
            a, b = np.asarray(tensors[a_name], np.float32), np.asarray(tensors[b_name], np.float32)
            r = a.shape[0]
            if a.shape != (r, int(np.prod(in_shape[name]))) or b.shape != (int(np.prod(out_shape[name])), r):
                raise ValueError(f"{where}: {a_name} {a.shape} / {b_name} {b.shape} do not fit the model's "
                                 f"{lora.TARGETS[name][1]} (in {in_shape[name]}, out {out_shape[name]})")
            a_layers.append(a.T.reshape(*in_shape[name], r))
            b_layers.append(b.T.reshape(r, *out_shape[name]))
        attr = lora.TARGETS[name][0]
        module = blocks.setdefault(MODULE_OF[name][0], {})
        module[attr + lora.SUFFIX_A], module[attr + lora.SUFFIX_B] = np.stack(a_layers), np.stack(b_layers)
    return {"blocks": blocks}


def adapter_config(lora_cfg: Any, targets: list[str], base_model: str | None = None) -> dict:
    """PEFT's adapter_config.json for lm's config.lora."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(lora_cfg.rank),
            "lora_alpha": float(lora_cfg.alpha), "use_rslora": bool(lora_cfg.rslora),
            "lora_dropout": float(lora_cfg.get("dropout", 0.0)),
            "target_modules": sorted(lora.TARGETS[n][1] for n in targets), "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "base_model_name_or_path": base_model, "modules_to_save": None}


def save_adapter(out_dir: str, adapters: Mapping, model_cfg, lora_cfg: Any, base_model: str | None = None) -> str:
    """Write `adapters` as a PEFT LoRA adapter directory."""
    os.makedirs(out_dir, exist_ok=True)
    safetensors_io.write_file(os.path.join(out_dir, WEIGHTS_FILE), peft_tensors(adapters, model_cfg.num_layers),
                              metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(adapter_config(lora_cfg, targets_of(adapters), base_model), f, indent=2, sort_keys=True)
    return out_dir


def load_adapter(adapter_dir: str, model_cfg) -> tuple[dict, dict]:
    """(lm adapters, the config.lora fields: rank, alpha, rslora, targets, dropout) of a PEFT adapter directory."""
    path = os.path.join(adapter_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: is {adapter_dir!r} a PEFT adapter directory?")
    with open(path) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r}; only LORA adapters are supported")
    for key, ok in (("bias", "none"), ("fan_in_fan_out", False), ("use_dora", False)):
        if cfg.get(key, ok) != ok:
            raise ValueError(f"{path}: {key}={cfg[key]!r} is not supported (lm's adapters: {key}={ok!r})")
    modules = cfg["target_modules"]
    modules = [modules] if isinstance(modules, str) else modules
    by_hf = {hf_name: n for n, (_, hf_name, *_) in lora.TARGETS.items()}
    unknown = [m for m in modules if m not in by_hf]
    if unknown:
        raise ValueError(f"{path}: target_modules {unknown} are not projections lm adapts ({sorted(by_hf)})")
    targets = [n for n in lora.TARGETS if lora.TARGETS[n][1] in modules]
    weights = os.path.join(adapter_dir, WEIGHTS_FILE)
    if not os.path.exists(weights):
        raise FileNotFoundError(f"{weights} does not exist (PEFT's safetensors adapter file)")
    tensors = safetensors_io.read_file(weights)
    adapters = adapters_from_peft(tensors, model_cfg, targets, adapter_dir)
    fields = {"rank": int(cfg["r"]), "alpha": float(cfg["lora_alpha"]), "rslora": bool(cfg.get("use_rslora", False)),
              "targets": ",".join(targets), "dropout": float(cfg.get("lora_dropout") or 0.0)}
    return adapters, fields
