"""LoRA ↔ Hugging Face (lm/interop/peft.py, hf_run export/import_adapter): a LoRA run over the
imported Llama fixture exports merged (its logits = the unmerged model's) and as a PEFT adapter
that `peft.PeftModel.from_pretrained` loads over the transformers base with lm's logits; lm →
PEFT → lm is exact. The torch/peft parts skip without the `hf` extra."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.interop import hf, hf_run, peft, safetensors_io
from lm.model import Transformer, lora
from lm.train import lora as lora_train
from test_hf import fixture_dir

HAVE_PEFT = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "peft"))
TOKENS = np.random.default_rng(5).integers(0, 300, 24).astype(np.int32)


def lora_logits(model_cfg, params, lora_cfg):
    """The adapted model (base ∪ adapters, float32) on TOKENS → [T, V]."""
    factory = lora_train.AdaptedFactory(lambda rngs: Transformer(model_cfg, rngs=rngs), lora_cfg, quantized=False)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: factory(nnx.Rngs(0))))
    t = len(TOKENS)
    fn = jax.jit(lambda p: nnx.merge(graphdef, p)(jnp.asarray(TOKENS)[None], jnp.arange(t)[None],
                                                    jnp.ones((1, t), jnp.int32)))
    return np.asarray(fn(jax.tree.map(jnp.asarray, params))[0])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(base run, adapter dir written by lm, LoRA run imported from it, its lora config)."""
    root = tmp_path_factory.mktemp("lora_hf")
    base_run = str(root / "base")
    assert hf_run.main(["import", "--hf_dir", fixture_dir("llama"), "--workdir", base_run]) == 0
    model_cfg, base = hf.load_params(fixture_dir("llama"))
    from configs import base as base_config

    lc = base_config.get_config().lora
    lc.update(rank=4, alpha=8.0, targets="q,v,o,down")
    factory = lora_train.AdaptedFactory(lambda rngs: Transformer(model_cfg, rngs=rngs), lc, quantized=False)
    adapters = nnx.to_pure_dict(nnx.state(factory(nnx.Rngs(1)), lora_train.trainable))
    keys = iter(jax.random.split(jax.random.key(2), 64))
    adapters = jax.tree.map(lambda x: np.asarray(0.1 * jax.random.normal(next(keys), x.shape)), adapters)  # B ≠ 0
    adapter_dir = peft.save_adapter(str(root / "adapter"), adapters, model_cfg, lc)
    lora_run = str(root / "lora_run")
    assert hf_run.main(["import_adapter", "--adapter_dir", adapter_dir, "--base_run", base_run,
                        "--workdir", lora_run]) == 0
    return model_cfg, base, adapters, adapter_dir, lora_run, lc


def test_lm_to_peft_to_lm_is_exact(runs, tmp_path):
    model_cfg, _, adapters, adapter_dir, lora_run, lc = runs
    back, fields = peft.load_adapter(adapter_dir, model_cfg)
    assert fields == {"rank": 4, "alpha": 8.0, "rslora": False, "targets": "q,v,o,down", "dropout": 0.0}
    jax.tree.map(np.testing.assert_array_equal, back, adapters)
    # the imported run's checkpoint holds exactly these adapters, and exports them unchanged
    _, config, restored, _ = hf_run.lora_run_params(lora_run)
    assert config.lora.rank == 4 and config.train.init_from.endswith("base")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), restored, adapters)
    assert hf_run.main(["export", "--run_dir", lora_run, "--hf_dir", str(tmp_path), "--adapters_only"]) == 0
    a, b = safetensors_io.read_file(os.path.join(adapter_dir, peft.WEIGHTS_FILE)), \
        safetensors_io.read_file(str(tmp_path / peft.WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert "base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight" in a
    assert a["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (64, 4)  # [out, r]


def test_the_merged_export_gives_the_unmerged_logits(runs, tmp_path):
    model_cfg, base, adapters, _, lora_run, lc = runs
    want = lora_logits(model_cfg, lora_train.combine(adapters, {lora_train.BASE: base}, False)[0], lc)
    plain = hf.load(fixture_dir("llama"))
    from test_hf import lm_logits

    assert np.max(np.abs(want - lm_logits(plain, TOKENS))) > 1e-2  # the adapters change the model
    assert hf_run.main(["export", "--run_dir", lora_run, "--hf_dir", str(tmp_path)]) == 0
    np.testing.assert_allclose(lm_logits(hf.load(str(tmp_path)), TOKENS), want, atol=1e-4, rtol=0)


@pytest.mark.skipif(not HAVE_PEFT, reason="torch, transformers and peft are the `hf` extra (pip install -e '.[hf]')")
def test_peft_loads_the_adapter_over_the_transformers_base_with_lm_logits(runs):
    import torch
    import transformers
    from peft import PeftModel

    model_cfg, base, adapters, adapter_dir, _, lc = runs
    want = lora_logits(model_cfg, lora_train.combine(adapters, {lora_train.BASE: base}, False)[0], lc)
    torch_base = transformers.AutoModelForCausalLM.from_pretrained(fixture_dir("llama"), dtype=torch.float32)
    model = PeftModel.from_pretrained(torch_base, adapter_dir).eval()
    with torch.no_grad():
        got = model(torch.as_tensor(TOKENS[None].astype(np.int64))).logits[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_the_merged_export_of_a_bfloat16_base_is_bfloat16(runs, tmp_path):
    """A base imported from bfloat16 weights exports merged in bfloat16 (PEFT's merge_and_unload keeps
    the base's dtype): W + s·B·A computed in float32, then rounded to nearest even; the weights
    without adapters come back bit for bit."""
    import json
    import shutil

    import ml_dtypes

    _, _, adapters, adapter_dir, _, lc = runs
    src = tmp_path / "bf16"
    src.mkdir()
    original = {k: np.asarray(v, np.float32).astype(ml_dtypes.bfloat16)
                for k, v in safetensors_io.read_dir(fixture_dir("llama")).items()}
    safetensors_io.write_file(str(src / "model.safetensors"), original)
    config = hf.read_hf_config(fixture_dir("llama"))
    (src / "config.json").write_text(json.dumps(dict(config, dtype="bfloat16")))
    shutil.copy(os.path.join(fixture_dir("llama"), "tokenizer.json"), src)
    shutil.copy(os.path.join(fixture_dir("llama"), "tokenizer_config.json"), src)
    assert hf_run.main(["import", "--hf_dir", str(src), "--workdir", str(tmp_path / "base")]) == 0
    assert hf_run.original_dtype(str(tmp_path / "base")) == "bfloat16"
    assert hf_run.main(["import_adapter", "--adapter_dir", adapter_dir, "--base_run", str(tmp_path / "base"),
                        "--workdir", str(tmp_path / "lora")]) == 0
    assert hf_run.main(["export", "--run_dir", str(tmp_path / "lora"), "--hf_dir", str(tmp_path / "out")]) == 0
    got = safetensors_io.read_dir(str(tmp_path / "out"))
    assert hf.read_hf_config(str(tmp_path / "out"))["torch_dtype"] == "bfloat16"
    assert sorted(got) == sorted(original) and all(v.dtype == ml_dtypes.bfloat16 for v in got.values())
    model_cfg, base = hf.load_params(str(src))
    scale = lora.scaling(lc.rank, lc.alpha)
    full = lora_train.combine(jax.tree.map(jnp.asarray, adapters), {lora_train.BASE: base}, False)[0]
    want = hf.hf_from_params(jax.tree.map(np.asarray, lora.merge_weights(full, scale)), model_cfg, "bfloat16")
    for name in original:
        np.testing.assert_array_equal(got[name].view(np.uint16), want[name].view(np.uint16), err_msg=name)
    # the same from PEFT's tensors in torch's layout: W + s·B·A (float64), within half a bfloat16 step
    tensors = safetensors_io.read_file(os.path.join(adapter_dir, peft.WEIGHTS_FILE))
    touched = 0
    for name, w in original.items():
        stem = "base_model.model." + name.removesuffix(".weight")
        if stem + ".lora_A.weight" not in tensors:
            np.testing.assert_array_equal(got[name].view(np.uint16), w.view(np.uint16), err_msg=name)
            continue
        exact = w.astype(np.float64) + scale * (tensors[stem + ".lora_B.weight"].astype(np.float64)
                                                @ tensors[stem + ".lora_A.weight"].astype(np.float64))
        step = np.abs(exact) * 2.0 ** -8 + 1e-30  # one bfloat16 ulp is ≤ |x|·2⁻⁷
        assert np.all(np.abs(got[name].astype(np.float64) - exact) <= step), name
        touched += 1
    assert touched == 4 * model_cfg.num_layers  # q, v, o, down in each layer
