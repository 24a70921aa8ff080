"""The training loop: resume, step, log, evaluate, checkpoint. Effects live here, at the edge.

`run()` is objective-agnostic: it gets the model config, a function that builds the
loss from the model's graphdef, a training iterator of per-process numpy batches
(with get_state/set_state) and a function that yields fresh validation batches.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import ml_collections

from lm import checkpoint as ckpt
from lm import metrics as mx
from lm import sharding as shd
from lm import train
from lm.model import ModelConfig, flops_per_token, param_count
from lm.optim import make_optimizer


@dataclasses.dataclass
class RunResult:
    state: train.TrainState
    setup: train.Setup
    final_eval: dict[str, float]
    history: list[dict]  # the logged metrics of this process's run (not those before a resume)


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def run(config: ml_collections.ConfigDict, workdir: str, *, model_cfg: ModelConfig,
        make_loss_fn: Callable[[Any], train.LossFn], train_iter: Any,
        valid_batches: Callable[[], Iterable[dict]]) -> RunResult:
    tc = config.train
    if tc.steps < 1 or tc.batch_size < 1 or tc.seq_len < 1 or tc.micro_batches < 1:
        raise ValueError("train.steps, batch_size, seq_len and micro_batches must be >= 1")
    mesh = shd.make_mesh(config.mesh)
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if tc.batch_size % (batch_shards * tc.micro_batches):
        raise ValueError(f"train.batch_size={tc.batch_size} must be a multiple of data×fsdp "
                         f"({batch_shards}) × train.micro_batches ({tc.micro_batches})")
    optimizer, schedule = make_optimizer(config.optimizer, tc.steps)
    state, setup = train.create_state(model_cfg, optimizer, mesh, config.mesh.rules, config.seed)
    n_params = param_count(state.params)
    _log(f"model: {n_params:,} parameters; mesh {dict(mesh.shape)}; "
         f"per device: params {shd.per_device_bytes(state.params, setup.state_shardings.params) / 2**20:.1f} MiB, "
         f"optimizer {shd.per_device_bytes(state.opt_state, setup.state_shardings.opt_state) / 2**20:.1f} MiB")

    checkpointer = ckpt.Checkpointer(workdir, keep=tc.keep_checkpoints)
    start = 0
    if checkpointer.latest_step() is not None:
        target = ckpt.abstract_with_shardings(setup.abstract_state, setup.state_shardings)
        state, data_state, start = checkpointer.restore(target)
        if data_state:
            train_iter.set_state(data_state)
        _log(f"resumed from {ckpt.checkpoint_dir(workdir)}/{start} (step {int(state.step)})")

    writer = mx.MetricsWriter(workdir, wandb_cfg=config.wandb, config=config, resume_step=start)
    step_fn = train.jit_train_step(train.make_train_step(make_loss_fn(setup.graphdef), optimizer, schedule,
                                                         tc.micro_batches), setup)
    eval_fn = train.make_eval_step(make_loss_fn(setup.graphdef), setup)
    peak = tc.peak_flops or mx.measure_peak_flops()
    flops_tok = flops_per_token(model_cfg, tc.seq_len)
    tokens_per_step = tc.batch_size * tc.seq_len

    def run_eval(step: int) -> dict[str, float]:
        batches = (train.global_batch(b, mesh) for b in valid_batches())
        result = train.evaluate(eval_fn, state.params, batches)
        writer.write(step, {f"valid/{k}": v for k, v in result.items()})
        return result

    bar = None
    if tc.progress_bar and jax.process_index() == 0:
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=start, unit="step", dynamic_ncols=True)
    history: list[dict] = []
    t_last, step_last = time.perf_counter(), start
    last_eval: dict[str, float] = {}
    for step in range(start, tc.steps):
        batch = train.global_batch(next(train_iter), mesh)
        state, metrics = step_fn(state, batch)
        done = step + 1
        if done % tc.log_every == 0 or done == tc.steps:
            metrics = jax.device_get(metrics)
            now = time.perf_counter()
            tok_s = tokens_per_step * (done - step_last) / (now - t_last)
            t_last, step_last = now, done
            row = {k: float(v) for k, v in metrics.items()}
            row.update(tokens_per_s=tok_s, mfu=flops_tok["model"] * tok_s / (peak * jax.device_count()))
            counts = getattr(train_iter, "error_counts", None)
            if callable(counts):
                row.update({f"data/skipped_{k}": v for k, v in counts().items()})
            writer.write(done, row)
            history.append({"step": done, **row})
            if bar is not None:
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            if row["bad_steps"] >= tc.max_bad_steps:
                raise FloatingPointError(
                    f"{int(row['bad_steps'])} consecutive non-finite steps ending at step {done}: stopping")
            if row["skipped"]:
                _log(f"step {done}: non-finite loss or gradient, update skipped")
        if bar is not None:
            bar.update(1)
        if tc.eval_every and done % tc.eval_every == 0 and done != tc.steps:
            last_eval = run_eval(done)
        if tc.checkpoint_every and done % tc.checkpoint_every == 0 and done != tc.steps:
            checkpointer.save(done, state, train_iter.get_state())
    if bar is not None:
        bar.close()
    if start < tc.steps or not last_eval:
        last_eval = run_eval(tc.steps)
    if checkpointer.latest_step() != tc.steps:
        checkpointer.save(tc.steps, state, train_iter.get_state())
    checkpointer.wait()
    checkpointer.close()
    writer.close()
    return RunResult(state, setup, last_eval, history)
