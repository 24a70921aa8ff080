"""The command line: read an ml_collections config, train, evaluate, report.

    python -m lm.cli.train --config=configs/default.py --workdir=runs/default
    python -m lm.cli.train --config=configs/default.py:tiny --config.optimizer.lr=1e-3 --workdir=/tmp/x

The run directory receives config.json, metrics.jsonl, summary.json, loss.png and
checkpoints/. Running again with the same --workdir resumes from its newest checkpoint.
"""

from __future__ import annotations

if __name__ == "__main__":  # before jax is imported: glibc settings for XLA:CPU (see lm/cli/runtime.py)
    from lm.cli.runtime import tune_malloc

    tune_malloc()

import json
import os
import sys

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created if missing; resumed if it "
                               "holds a checkpoint). Default: runs/<config name>.")


def build_model_config(config: ml_collections.ConfigDict, vocab_size: int):
    from lm.model import ModelConfig

    return ModelConfig.from_config(config.model, vocab_size)


def train_and_report(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train `config` in `workdir`; write summary.json and loss.png; print samples. Returns the summary."""
    from lm.io import checkpoint as ckpt
    from lm import data, evals, objectives
    from lm.train import loop
    from lm.parallel import sharding
    from lm.io import report

    tokenizer = data.build_tokenizer(config.data)
    model_cfg = build_model_config(config, tokenizer.vocab_size)
    objective = objectives.get(config.objective)
    tc = config.train
    # this process's block of every global batch (processes that share rows load the same data)
    shard, shards = sharding.batch_shard(sharding.make_mesh(config.mesh))
    if tc.batch_size % shards:
        raise ValueError(f"train.batch_size={tc.batch_size} must be a multiple of the {shards} processes "
                         "that feed distinct rows")
    common = dict(batch_size=tc.batch_size // shards, seq_len=tc.seq_len, seed=config.seed,
                  process_index=shard, process_count=shards)
    train_iter = objectives.make_train_iter(objective, config, tokenizer, data.build_iterator, **common)
    valid_batches = None  # an objective without a validation loss (RL) gets no passes
    if objectives.has_validation_loss(objective):
        valid_batches = lambda: data.build_iterator(config.data, split="valid", tokenizer=tokenizer,  # noqa: E731
                                                    **common)
    if jax.process_index() == 0:
        ckpt.write_config(workdir, config)
        if hasattr(tokenizer, "save_metadata"):
            tokenizer.save_metadata(workdir)
    result = loop.run(config, workdir, model_cfg=model_cfg,
                      make_loss_fn=lambda graphdef: objective.make_loss_fn(config, graphdef),
                      train_iter=train_iter, valid_batches=valid_batches,
                      make_model=objectives.make_model(objective, config, model_cfg),
                      frozen=objectives.frozen_models(objective, config, model_cfg),
                      batch_kind=objectives.batch_kind(objective, config),
                      make_prepare_batch=objectives.make_prepare_batch(objective, config, tokenizer))
    info = data.source_info(config.data, seq_len=tc.seq_len)
    summary = report.summarize(config, model_cfg, result, info)
    ctx = evals.EvalContext(config=config, workdir=workdir, tokenizer=tokenizer, graphdef=result.setup.graphdef,
                            params=result.state.params, valid_batches=valid_batches, frozen=result.frozen,
                            setup=result.setup)
    summary.update(evals.run(config.eval.evaluators, ctx))
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        report.plot_loss(workdir, summary.get("bayes_optimal_ce"))
        report.print_summary(summary)
    return summary


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("runs", os.path.splitext(os.path.basename(
        flags.FLAGS["config"].config_filename))[0])
    from lm.parallel import distributed

    distributed.maybe_initialize(config)
    train_and_report(config, workdir)


if __name__ == "__main__":
    jax.config.parse_flags_with_absl()
    sys.exit(app.run(main))
