"""The command line: read an ml_collections config, train, evaluate, report.

    python -m lm.cli.train --config=configs/default.py --workdir=runs/default
    python -m lm.cli.train --config=configs/default.py:tiny --config.optimizer.lr=1e-3 --workdir=/tmp/x

The run directory (local, or gs://... through lm/io/paths.py) receives config.json,
metrics.jsonl, summary.json, loss.png, console.log and checkpoints/. Running again with the same
--workdir resumes from its newest checkpoint; a changed config is printed key by key and the old
one kept in config_history/. Nothing is written before the config, data and mesh are validated
and the step compiled. A configuration, data or mesh error is one line without a traceback
(--verbose or LM_VERBOSE=1 shows it).
"""

from __future__ import annotations

if __name__ == "__main__":  # before jax is imported: glibc settings for XLA:CPU (see lm/cli/runtime.py)
    import sys

    from lm.cli.runtime import tune_malloc

    tune_malloc()
    from lm.cli import errors

    errors.install("lm.cli.train", verbose_flag=True)
    from lm.cli import config as config_files

    for _arg in sys.argv[1:]:  # configs import each other as `from configs import base`
        if _arg.startswith("--config="):
            config_files.importable(_arg.split("=", 1)[1])

import json
import os
import sys
import traceback

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created if missing; resumed if it "
                               "holds a checkpoint; gs://... works too). Default: runs/<config name>.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of configuration, data and mesh errors "
                             "(also: LM_VERBOSE=1).")


def build_model_config(config: ml_collections.ConfigDict, vocab_size: int):
    from lm.model import ModelConfig

    return ModelConfig.from_config(config.model, vocab_size)


def train_and_report(config: ml_collections.ConfigDict, workdir: str,
                     console_log: "console.ConsoleLog | None" = None) -> dict:
    """Train `config` in `workdir`; write summary.json and loss.png; print samples. Returns the summary.
    console_log: starts writing console.log into the run directory once the run is validated."""
    from lm.io import checkpoint as ckpt
    from lm import data, evals, objectives
    from lm.train import loop
    from lm.parallel import sharding
    from lm.io import console, paths, report

    tokenizer = data.build_tokenizer(config.data)
    model_cfg = build_model_config(config, tokenizer.vocab_size)
    objective = objectives.get(config.objective)
    tc = config.train
    # this process's block of every global batch (processes that share rows load the same data)
    mesh = sharding.make_mesh(config.mesh)
    if jax.process_index() == 0:
        print("\n".join(console.where_and_on_what(mesh, workdir)), flush=True)
    shard, shards = sharding.batch_shard(mesh)
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

    def write_run_files() -> None:  # once validated and compiled: the first writes to the run directory
        if jax.process_index():
            return
        if console_log is not None:
            console_log.attach(workdir)
        changes = ckpt.write_config(workdir, config)
        if changes:
            print(f"resuming with a changed config: {len(changes)} key(s) differ from the run's config.json "
                  f"(the old one is kept in {paths.run_path(workdir) / 'config_history'}/):\n  "
                  + "\n  ".join(changes), flush=True)
        if hasattr(tokenizer, "metadata"):
            from lm.data.tokenizer import METADATA_FILE

            paths.write_text(paths.run_path(workdir) / METADATA_FILE,
                             json.dumps(tokenizer.metadata(), indent=2, sort_keys=True))

    result = loop.run(config, workdir, model_cfg=model_cfg,
                      make_loss_fn=lambda graphdef: objective.make_loss_fn(config, graphdef),
                      train_iter=train_iter, valid_batches=valid_batches,
                      make_model=objectives.make_model(objective, config, model_cfg),
                      frozen=objectives.frozen_models(objective, config, model_cfg),
                      batch_kind=objectives.batch_kind(objective, config),
                      make_prepare_batch=objectives.make_prepare_batch(objective, config, tokenizer),
                      on_ready=write_run_files)
    info = data.source_info(config.data, seq_len=tc.seq_len)
    summary = report.summarize(config, model_cfg, result, info)
    ctx = evals.EvalContext(config=config, workdir=workdir, tokenizer=tokenizer, graphdef=result.setup.graphdef,
                            params=result.state.params, valid_batches=valid_batches, frozen=result.frozen,
                            setup=result.setup)
    summary.update(evals.run(config.eval.evaluators, ctx))
    verdict = report.target_verdict(config, summary)
    if verdict:
        summary["target_met"] = verdict.startswith("target met")
    if jax.process_index() == 0:
        paths.write_text(paths.run_path(workdir) / "summary.json", json.dumps(summary, indent=2))
        report.plot_loss(workdir, summary.get("bayes_optimal_ce"))
        report.print_summary(summary)
        last = next((r for r in reversed(result.history) if "loss" in r), None)
        if last and report.headline(last):
            print("last training step: " + ", ".join(f"{k} {v:.4g}" for k, v in report.headline(last).items()))
        if verdict:
            print(verdict)
        print("\n".join(console.where_outputs_are(workdir)), flush=True)
    return summary


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("runs", os.path.splitext(os.path.basename(
        flags.FLAGS["config"].config_filename))[0])
    from lm.io import console
    from lm.parallel import distributed

    distributed.maybe_initialize(config)
    log = console.ConsoleLog(enabled=jax.process_index() == 0)
    try:
        train_and_report(config, workdir, console_log=log)
    except Exception as e:  # the error that ends the run goes into console.log too
        from lm.cli import errors

        log.note("error: " + (errors.message(e) or "".join(traceback.format_exception(e))))
        raise
    finally:
        log.close()


if __name__ == "__main__":
    for _arg in sys.argv[1:]:  # absl's --help exits with status 1; a usage request is no error
        if _arg in ("-h", "--help", "--helpshort", "--helpfull", "-?"):
            app.usage(shorthelp=_arg != "--helpfull", writeto_stdout=True, exitcode=0)
    jax.config.parse_flags_with_absl()
    sys.exit(app.run(main))
