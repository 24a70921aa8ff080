"""Hugging Face checkpoint ↔ lm run directory, and the command line of `python -m lm.interop.hf`.

    python -m lm.interop.hf import --hf_dir D --workdir W     # D: config.json, *.safetensors, tokenizer files
    python -m lm.interop.hf export --run_dir W --hf_dir D2 [--architecture Qwen2ForCausalLM] [--step S]
                                   [--adapters_only]          # a LoRA run: merged, or a PEFT adapter
    python -m lm.interop.hf import_adapter --adapter_dir A --base_run W --workdir W2   # PEFT → LoRA run

`import` writes a normal run directory, as a training run would:
    W/config.json                 lm's config (configs/base.py) with the model fields of D's config.json
                                  and data.tokenizer = 'hf:W/hf' (the checkpoint's own tokenizer)
    W/tokenizer_metadata.json     the tokenizer record runs keep next to their checkpoints
    W/checkpoints/0/              a TrainState at step 0: the imported params, a fresh AdamW state
    W/hf/                         D's config.json and tokenizer files, copied (export reads the
                                  architecture from here; the tokenizer is loaded from here), and
                                  lm_import.json: D's path and its weights' dtype (e.g. bfloat16;
                                  the run holds them in float32, exactly)
so `python -m lm.cli.sample --run_dir W` samples from it, and a fine-tuning run starts from it with
`--config=configs/hf_finetune.py:W` (its model, tokenizer and train.init_from), or with
train.init_from=W and the same model.* fields (and a RewardModel or a policy with a value head
starts from it the same way, with a fresh head).
`export` writes the newest (or --step) checkpoint's params as config.json + model.safetensors,
plus W/hf's tokenizer files, into D2: transformers' AutoModelForCausalLM.from_pretrained(D2) loads it.
Tensors are written in float32, or `--dtype`; a LoRA run's merged export defaults to its imported
base's original dtype (lm_import.json; the merge computed in float32, then rounded to nearest even,
as PEFT's merge_and_unload keeps the base's dtype).
A LoRA run (config.lora.rank > 0) exports its base with the adapters merged in, or with
--adapters_only a PEFT adapter directory (lm/interop/peft.py) that peft.PeftModel.from_pretrained
loads over the base; `import_adapter --adapter_dir A --base_run W --workdir W2` makes a LoRA run
from such a directory over an imported base.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from typing import Sequence

from lm.interop import hf, safetensors_io

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
HF_SUBDIR = "hf"
IMPORT_RECORD = "lm_import.json"  # in W/hf: {"source": D, "dtype": the weights' dtype in D}


def original_dtype(run_dir: str) -> str:
    """The dtype of the Hugging Face weights `run_dir` was imported from: its hf/lm_import.json, else
    (an import made before that record existed) its hf/config.json's dtype / torch_dtype; 'float32'
    for a run that was not imported."""
    import json

    record = os.path.join(run_dir, HF_SUBDIR, IMPORT_RECORD)
    if os.path.exists(record):
        with open(record) as f:
            return json.load(f)["dtype"]
    if os.path.exists(os.path.join(run_dir, HF_SUBDIR, "config.json")):
        declared = hf.read_hf_config(os.path.join(run_dir, HF_SUBDIR))
        name = declared.get("dtype") or declared.get("torch_dtype") or "float32"
        return name if name in hf.FLOAT_DTYPES else "float32"
    return "float32"


def run_config(model_cfg, tokenizer_spec: str, add_bos: bool):
    """configs/base.py's config with the model fields of `model_cfg` and the given tokenizer."""
    from lm.cli.config import configs_module

    base = configs_module("base")  # configs/ is read from the checkout, not installed

    config = base.get_config()
    for field in dataclasses.fields(model_cfg):
        if field.name in config.model:
            config.model[field.name] = getattr(model_cfg, field.name)
    config.data.tokenizer = tokenizer_spec
    config.data.add_bos = add_bos
    return config


def import_run(hf_dir: str, workdir: str) -> str:
    """Make the run directory `workdir` from the Hugging Face checkpoint `hf_dir` (module docstring)."""
    import jax
    import jax.numpy as jnp

    from lm.io import checkpoint
    from lm.data.hf_tokenizer import HFCheckpointTokenizer
    from lm.train.optim import make_optimizer
    from lm.train import TrainState

    workdir = os.path.abspath(workdir)
    if os.path.isdir(checkpoint.checkpoint_dir(workdir)) and os.listdir(checkpoint.checkpoint_dir(workdir)):
        raise FileExistsError(f"{workdir} already holds checkpoints; import into a new directory")
    import json

    model_cfg, params = hf.load_params(hf_dir)
    copy_dir = os.path.join(workdir, HF_SUBDIR)
    os.makedirs(copy_dir, exist_ok=True)
    shutil.copy(os.path.join(hf_dir, "config.json"), copy_dir)
    with open(os.path.join(copy_dir, IMPORT_RECORD), "w") as f:
        json.dump({"source": os.path.abspath(hf_dir), "dtype": hf.tensors_dtype(safetensors_io.read_dir(hf_dir))}, f)
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(hf_dir, name)):
            shutil.copy(os.path.join(hf_dir, name), copy_dir)
    if os.path.exists(os.path.join(copy_dir, "tokenizer.json")):
        tokenizer = HFCheckpointTokenizer(copy_dir)
        if tokenizer.vocab_size > model_cfg.vocab_size:
            raise ValueError(f"{hf_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"{model_cfg.vocab_size} embeddings")
        config = run_config(model_cfg, "hf:" + copy_dir, tokenizer.has_bos)
    else:
        print(f"[lm.interop.hf] {hf_dir} has no tokenizer.json: the run keeps data.tokenizer='byte'; set "
              "data.tokenizer before sampling or training", file=sys.stderr)
        tokenizer, config = None, run_config(model_cfg, "byte", True)
    checkpoint.write_config(workdir, config)
    if tokenizer is not None:
        tokenizer.save_metadata(workdir)
    optimizer, _ = make_optimizer(config.optimizer, config.train.steps)
    params = jax.tree.map(jnp.asarray, params)
    state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params),
                       jax.random.key_data(jax.random.key(config.seed)), jnp.zeros((), jnp.int32))
    saver = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints, async_save=False, config=config)
    try:
        saver.save(0, state, None, extra={"imported_from": os.path.abspath(hf_dir)})
        saver.wait()
    finally:
        saver.close()
    return workdir


def lora_run_params(run_dir: str, step: int | None = None):
    """(model_cfg, config, adapters, base params) of a LoRA run (config.lora.rank > 0): its
    checkpoint's adapters and its base, train.init_from's parameters, in float32 on one device."""
    import jax
    from flax import nnx

    from lm.io import checkpoint
    from lm.model import Transformer
    from lm.train import lora as lora_train

    config = checkpoint.read_config(run_dir)
    if not config.train.init_from:
        raise ValueError(f"{run_dir}: a LoRA run without train.init_from has no base to export with")
    model_cfg, _, base, _ = checkpoint.load_for_inference(config.train.init_from)
    factory = lora_train.AdaptedFactory(lambda rngs: Transformer(model_cfg, rngs=rngs), config.lora, quantized=False)
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: factory(nnx.Rngs(0))), lora_train.trainable))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), abstract)
    path = run_dir if step is None else os.path.join(checkpoint.checkpoint_dir(run_dir), str(step))
    return model_cfg, config, checkpoint.restore_params(path, target).tree, base


def lora_merged(run_dir: str, step: int | None = None):
    """(model_cfg, graphdef, params, config) of a LoRA run with its adapters merged into its base
    as it was held in training (lora.base_dtype's rounding included; W + s·A·B in float32): a
    plain Transformer's, for sampling (lm.cli.sample) and export."""
    from flax import nnx

    from lm.model import Transformer, lora
    from lm.train import lora as lora_train

    model_cfg, config, adapters, base = lora_run_params(run_dir, step)
    base = lora.as_held(base, config.lora.base_dtype, config.lora.block_size)  # the base as trained over
    full = lora_train.combine(adapters, {lora_train.BASE: base}, reference=False)[0]
    params = lora.merge_weights(full, lora.scaling(config.lora.rank, config.lora.alpha, config.lora.rslora))
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))))
    return model_cfg, graphdef, params, config


def export_run(run_dir: str, hf_dir: str, architecture: str | None = None, step: int | None = None,
               adapters_only: bool = False, dtype: str | None = None) -> str:
    """Write run `run_dir`'s newest (or `step`) params as a Hugging Face checkpoint in `hf_dir`. A
    LoRA run: its base with the adapters merged in (W + s·A·B in float32, PEFT's merge_and_unload),
    or with `adapters_only` the adapters as a PEFT adapter directory (lm/interop/peft.py).
    dtype: the tensors' dtype; None: a LoRA run's merged export takes its base's original dtype
    (`original_dtype` of train.init_from), any other export float32."""
    import jax
    import numpy as np

    from lm.io.checkpoint import load_for_inference, read_config
    from lm.interop import peft

    run_config_ = read_config(run_dir)
    if adapters_only and dtype not in (None, "float32"):
        raise ValueError(f"--adapters_only writes the adapters in float32 (PEFT upcasts them); --dtype={dtype} "
                         "applies to a merged export")
    if run_config_.get("lora") and run_config_.lora.rank:
        if adapters_only:
            model_cfg, config, adapters, _ = lora_run_params(run_dir, step)
            return peft.save_adapter(hf_dir, jax.tree.map(np.asarray, adapters), model_cfg, config.lora,
                                     base_model=config.train.init_from)
        model_cfg, _, params, config = lora_merged(run_dir, step)
        dtype = dtype or original_dtype(config.train.init_from)
    elif adapters_only:
        raise ValueError(f"{run_dir} is not a LoRA run (config.lora.rank is 0): it has no adapters to export")
    else:
        model_cfg, _, params, config = load_for_inference(run_dir, step)
    source = os.path.join(run_dir, HF_SUBDIR)
    if not os.path.exists(os.path.join(source, "config.json")) and config.train.get("init_from"):
        source = os.path.join(config.train.init_from, HF_SUBDIR)  # a LoRA run: its imported base's
    if architecture is None and os.path.exists(os.path.join(source, "config.json")):
        architecture = hf.read_hf_config(source)["architectures"][0]
    hf.save(model_cfg, hf_dir, architecture, params=jax.tree.map(np.asarray, params), dtype=dtype or "float32")
    spec = config.data.get("tokenizer", "byte")
    tokenizer_dir = spec[3:] if spec.startswith("hf:") else None
    for name in TOKENIZER_FILES if tokenizer_dir else ():
        if os.path.exists(os.path.join(tokenizer_dir, name)):
            shutil.copy(os.path.join(tokenizer_dir, name), hf_dir)
    return hf_dir


def import_adapter(adapter_dir: str, base_run: str, workdir: str) -> str:
    """Make the LoRA run directory `workdir` from a PEFT adapter directory over the imported base
    run `base_run` (the same model): base_run's config with config.lora from adapter_config.json
    and train.init_from = base_run, and a step-0 checkpoint holding the adapters (and a fresh AdamW
    state for them). Training, sampling and export then treat it like any LoRA run."""
    import jax
    import jax.numpy as jnp

    from lm.interop import peft
    from lm.io import checkpoint
    from lm.train import TrainState
    from lm.train.optim import make_optimizer

    workdir, base_run = os.path.abspath(workdir), os.path.abspath(base_run)
    if os.path.isdir(checkpoint.checkpoint_dir(workdir)) and os.listdir(checkpoint.checkpoint_dir(workdir)):
        raise FileExistsError(f"{workdir} already holds checkpoints; import into a new directory")
    config = checkpoint.read_config(base_run)
    model_cfg = checkpoint.load_for_inference(base_run)[0]
    adapters, fields = peft.load_adapter(adapter_dir, model_cfg)
    if "lora" not in config:  # a run written before config.lora existed
        from lm.cli.config import configs_module

        config.lora = configs_module("base").get_config().lora
    config.lora.update(fields, base_dtype="float32")  # the base as PEFT reads it (set bfloat16/nf4 to train on)
    config.train.init_from = base_run
    checkpoint.write_config(workdir, config)
    for name in ("tokenizer_metadata.json",):
        if os.path.exists(os.path.join(base_run, name)):
            shutil.copy(os.path.join(base_run, name), workdir)
    optimizer, _ = make_optimizer(config.optimizer, config.train.steps)
    params = jax.tree.map(jnp.asarray, adapters)
    state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params),
                       jax.random.key_data(jax.random.fold_in(jax.random.key(config.seed), 1)), jnp.zeros((), jnp.int32))
    saver = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints, async_save=False, config=config)
    try:
        saver.save(0, state, None, extra={"imported_from": os.path.abspath(adapter_dir)})
        saver.wait()
    finally:
        saver.close()
    return workdir


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lm.interop.hf", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face checkpoint directory -> lm run directory")
    imp.add_argument("--hf_dir", required=True)
    imp.add_argument("--workdir", required=True)
    exp = sub.add_parser("export", help="lm run directory -> Hugging Face checkpoint directory")
    exp.add_argument("--run_dir", required=True)
    exp.add_argument("--hf_dir", required=True)
    exp.add_argument("--architecture", default=None, choices=hf.ARCHITECTURES,
                     help="default: the imported checkpoint's, else Qwen2 with q/k/v biases, else Llama")
    exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    exp.add_argument("--adapters_only", action="store_true",
                     help="a LoRA run: write its adapters as a PEFT adapter directory instead of the merged model")
    exp.add_argument("--dtype", default=None, choices=hf.FLOAT_DTYPES,
                     help="the tensors' dtype (default: a LoRA run's merged export its imported base's, else float32)")
    ada = sub.add_parser("import_adapter", help="PEFT LoRA adapter directory over an imported base -> lm LoRA run")
    ada.add_argument("--adapter_dir", required=True)
    ada.add_argument("--base_run", required=True, help="the base model's lm run directory (from `import`)")
    ada.add_argument("--workdir", required=True)
    args = p.parse_args(argv)
    try:
        if args.command == "import_adapter":
            out = import_adapter(args.adapter_dir, args.base_run, args.workdir)
            print(f"imported the adapter {args.adapter_dir} over {args.base_run} into the run directory {out}")
        elif args.command == "import":
            out = import_run(args.hf_dir, args.workdir)
            print(f"imported {args.hf_dir} into the run directory {out} (step 0)")
        else:
            out = export_run(args.run_dir, args.hf_dir, args.architecture, args.step, args.adapters_only, args.dtype)
            print(f"exported {args.run_dir} to {out}")
    except (hf.UnsupportedCheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"lm.interop.hf: error: {e}", file=sys.stderr)
        return 2
    return 0
