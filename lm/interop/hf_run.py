"""Hugging Face checkpoint ↔ lm run directory, and the command line of `python -m lm.interop.hf`.

    python -m lm.interop.hf import --hf_dir D --workdir W     # D: config.json, *.safetensors, tokenizer files
    python -m lm.interop.hf export --run_dir W --hf_dir D2 [--architecture Qwen2ForCausalLM] [--step S]

`import` writes a normal run directory, as a training run would:
    W/config.json                 lm's config (configs/base.py) with the model fields of D's config.json
                                  and data.tokenizer = 'hf:W/hf' (the checkpoint's own tokenizer)
    W/tokenizer_metadata.json     the tokenizer record runs keep next to their checkpoints
    W/checkpoints/0/              a TrainState at step 0: the imported params, a fresh AdamW state
    W/hf/                         D's config.json and tokenizer files, copied (export reads the
                                  architecture from here; the tokenizer is loaded from here)
so `python -m lm.cli.sample --run_dir W` samples from it, and a fine-tuning run starts from it with
`--config=configs/hf_finetune.py:W` (its model, tokenizer and train.init_from), or with
train.init_from=W and the same model.* fields (and a RewardModel or a policy with a value head
starts from it the same way, with a fresh head).
`export` writes the newest (or --step) checkpoint's params as config.json + model.safetensors,
plus W/hf's tokenizer files, into D2: transformers' AutoModelForCausalLM.from_pretrained(D2) loads it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from typing import Sequence

from lm.interop import hf

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
HF_SUBDIR = "hf"


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
    model_cfg, params = hf.load_params(hf_dir)
    copy_dir = os.path.join(workdir, HF_SUBDIR)
    os.makedirs(copy_dir, exist_ok=True)
    shutil.copy(os.path.join(hf_dir, "config.json"), copy_dir)
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


def export_run(run_dir: str, hf_dir: str, architecture: str | None = None, step: int | None = None) -> str:
    """Write run `run_dir`'s newest (or `step`) params as a Hugging Face checkpoint in `hf_dir`."""
    import jax
    import numpy as np

    from lm.io.checkpoint import load_for_inference

    model_cfg, _, params, config = load_for_inference(run_dir, step)
    source = os.path.join(run_dir, HF_SUBDIR)
    if architecture is None and os.path.exists(os.path.join(source, "config.json")):
        architecture = hf.read_hf_config(source)["architectures"][0]
    hf.save(model_cfg, hf_dir, architecture, params=jax.tree.map(np.asarray, params))
    spec = config.data.get("tokenizer", "byte")
    tokenizer_dir = spec[3:] if spec.startswith("hf:") else None
    for name in TOKENIZER_FILES if tokenizer_dir else ():
        if os.path.exists(os.path.join(tokenizer_dir, name)):
            shutil.copy(os.path.join(tokenizer_dir, name), hf_dir)
    return hf_dir


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
    args = p.parse_args(argv)
    try:
        if args.command == "import":
            out = import_run(args.hf_dir, args.workdir)
            print(f"imported {args.hf_dir} into the run directory {out} (step 0)")
        else:
            out = export_run(args.run_dir, args.hf_dir, args.architecture, args.step)
            print(f"exported {args.run_dir} to {out}")
    except (hf.UnsupportedCheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"lm.interop.hf: error: {e}", file=sys.stderr)
        return 2
    return 0
