"""The training loop: start or resume, step, log, evaluate, checkpoint, stop cleanly. Effects
live here, at the edge.

`run()` is objective-agnostic: it gets the model config (and optionally a model factory and
frozen models, lm/train/state.py), a function that builds the loss from the model's graphdef, a
training iterator of per-process numpy batches (with get_state / set_state) and a function that
yields fresh validation batches.

Where a run starts (first match):
  1. the workdir holds a checkpoint: resume from the newest intact one (state, data order, rng);
  2. train.restore_from: resume another run's checkpoint in this workdir, or, with
     train.restore_params_only, take only its parameters and start a new run at step 0;
  3. train.init_from: a new run at step 0 whose parameters that match the other run's (path and
     shape) are taken from it, the rest (a new head) freshly initialized (lm/train/init.py);
  4. otherwise a fresh start from config.seed.
A run resumed from step k logs exactly the losses an uninterrupted run logs after step k.

Stopping: SIGTERM/SIGINT finish the step, save a checkpoint and raise `preemption.Preempted`
(exit status 0). A step with a non-finite loss or gradient norm is skipped by the train step;
here it is logged with its step, counted, and after train.max_bad_steps in a row the run stops
with FloatingPointError naming the step.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import ml_collections
import numpy as np

from lm.io import checkpoint as ckpt
from lm.train import lora as lora_train
from lm.train import memory
from lm.io import metrics as mx
from lm.io.report import headline
from lm.train import preemption
from lm.parallel import sharding as shd
from lm import train
from lm.model import ModelConfig, flops_per_token, param_count
from lm.evals.loss import evaluate
from lm.train.init import init_params
from lm.train.init import load_frozen as load_frozen_params
from lm.train.optim import make_optimizer
from lm.train.state import FrozenModel, ModelFactory, init_frozen


@dataclasses.dataclass
class RunResult:
    state: train.TrainState
    setup: train.Setup
    final_eval: dict[str, float]
    history: list[dict]  # the logged metrics of this process's run (not those before a resume)
    frozen: dict = dataclasses.field(default_factory=dict)  # the frozen models' params by name


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def parse_steps(text: str) -> set[int]:
    """'5, 7' -> {5, 7} (train.inject.nan_steps)."""
    try:
        return {int(s) for s in str(text or "").replace(" ", "").split(",") if s}
    except ValueError:
        raise ValueError(f"train.inject.nan_steps must be comma-separated step numbers, got {text!r}") from None


def poison(batch: dict) -> dict:
    """The batch with NaN loss masks: its loss and gradient are NaN (a fault-injection hook)."""
    if "loss_mask" not in batch:  # a preference pair: poison both sides
        return {side: poison(b) for side, b in batch.items()}
    return dict(batch, loss_mask=batch["loss_mask"] * np.float32(np.nan))


class BadSteps:
    """Reads each step's `skipped` / `bad_steps` one step late, so the host never waits for the
    step it has just dispatched. Logs every skipped step; raises after `max_bad` in a row."""

    def __init__(self, max_bad: int, total: int = 0):
        self.max_bad, self.total = max_bad, total
        self._pending: tuple[int, dict] | None = None

    def push(self, step: int, metrics: dict) -> None:
        self.flush()
        self._pending = (step, {k: metrics[k] for k in ("skipped", "bad_steps", "loss", "grad_norm")})

    def flush(self) -> None:
        if self._pending is None:
            return
        step, m = self._pending
        self._pending = None
        m = jax.device_get(m)
        if not int(m["skipped"]):
            return
        self.total += 1
        in_a_row = int(m["bad_steps"])
        _log(f"step {step}: non-finite loss ({float(m['loss'])}) or gradient norm ({float(m['grad_norm'])}); "
             f"update skipped ({in_a_row} in a row, {self.total} skipped in this run)")
        if in_a_row >= self.max_bad:
            raise FloatingPointError(
                f"step {step}: {in_a_row} consecutive steps (steps {step - in_a_row + 1}..{step}) had a "
                f"non-finite loss or gradient norm (train.max_bad_steps={self.max_bad}); stopping. "
                f"The parameters are those after step {step - in_a_row}, the last finite step.")


def _validate(tc: ml_collections.ConfigDict, mesh) -> None:
    if tc.steps < 1 or tc.batch_size < 1 or tc.seq_len < 1 or tc.micro_batches < 1:
        raise ValueError("train.steps, batch_size, seq_len and micro_batches must be >= 1")
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if tc.batch_size % (batch_shards * tc.micro_batches):
        raise ValueError(f"train.batch_size={tc.batch_size} must be a multiple of data×fsdp "
                         f"({batch_shards}) × train.micro_batches ({tc.micro_batches})")
    if tc.restore_params_only and not tc.restore_from:
        raise ValueError("train.restore_params_only needs train.restore_from (a run or checkpoint path)")
    if tc.restore_from and tc.init_from:
        raise ValueError("set train.restore_from (resume another run) or train.init_from (start from its "
                         "parameters), not both")
    for key in ("restore_from", "init_from"):
        if tc[key]:  # a missing or unreadable path fails now, not after compiling
            ckpt.find_checkpoints(tc[key])


def _set_data_state(train_iter: Any, data_state: dict) -> None:
    if data_state:
        train_iter.set_state(data_state)


def _data_state(train_iter: Any) -> dict | None:
    get = getattr(train_iter, "get_state", None)
    return get() if callable(get) else None


def initial_state(tc, checkpointer: ckpt.Checkpointer, setup: train.Setup, state: train.TrainState,
                  optimizer, train_iter: Any) -> tuple[train.TrainState, int, int]:
    """(state, start step, steps skipped so far) per the rules in the module docstring."""
    target = ckpt.abstract_with_shardings(setup.abstract_state, setup.state_shardings)
    if checkpointer.steps():
        if tc.restore_from:
            _log(f"{checkpointer.directory} holds checkpoints: resuming from them, not from "
                 f"train.restore_from={tc.restore_from}")
        restored = checkpointer.restore(target)
        if checkpointer.broken:
            checkpointer.set_aside(checkpointer.broken)
        _set_data_state(train_iter, restored.data)
        _log(f"resumed from {restored.path} (step {int(restored.tree.step)})")
        return restored.tree, restored.step, int(restored.meta.get("skipped_steps", 0))
    if tc.init_from and not tc.restore_from and lora_train.BASE not in setup.frozen_graphdefs:
        # (a LoRA run's train.init_from is its frozen base; its adapters start fresh)
        params, _ = init_params(tc.init_from, target.params, state.params, log=_log)
        opt_state = jax.jit(optimizer.init, out_shardings=setup.state_shardings.opt_state)(params)
        return state._replace(params=params, opt_state=opt_state), 0, 0
    if not tc.restore_from:
        return state, 0, 0
    if tc.restore_params_only:
        restored = ckpt.restore_params(tc.restore_from, target.params)
        opt_state = jax.jit(optimizer.init, out_shardings=setup.state_shardings.opt_state)(restored.tree)
        _log(f"parameters from {restored.path} (step {restored.step}); a new run from step 0 with a fresh "
             f"optimizer state and data order")
        return state._replace(params=restored.tree, opt_state=opt_state), 0, 0
    directory, step = ckpt.find_checkpoints(tc.restore_from)
    reader = ckpt.CheckpointReader(directory)
    try:
        restored = reader.restore(target, step)
    finally:
        reader.close()
    _set_data_state(train_iter, restored.data)
    _log(f"resumed from {restored.path} (step {restored.step}), given by train.restore_from")
    return restored.tree, restored.step, int(restored.meta.get("skipped_steps", 0))


PrepareBatch = Callable[..., tuple[Any, dict]]
"""prepare_batch(params, global_batch, rng, *frozen_args) -> (the step's batch, metrics to log):
runs between the data and the train step, with the parameters about to be updated (on-policy
RL samples its rollouts here). Its metrics are logged with the step's."""


def load_frozen(setup: train.Setup, sources: dict[str, FrozenModel], seed: int) -> dict:
    """The frozen models' parameters, in their sharded layout: from each one's checkpoint, or
    freshly initialized where it names none."""
    frozen = {}
    for name, source in sources.items():
        if source.path:
            target = ckpt.abstract_with_shardings(setup.abstract_frozen[name], setup.frozen_shardings[name])
            frozen[name] = (source.load or load_frozen_params)(source.path, target)
            _log(f"frozen model {name!r}: parameters from {source.path}")
        else:
            frozen[name] = init_frozen(setup, name, seed)
    return frozen


def run(config: ml_collections.ConfigDict, workdir: str, *, model_cfg: ModelConfig,
        make_loss_fn: Callable[[Any], train.LossFn], train_iter: Any,
        valid_batches: Callable[[], Iterable[dict]] | None, make_model: ModelFactory | None = None,
        frozen: dict[str, FrozenModel] | None = None, batch_kind: Any = "tokens",
        prepare_batch: PrepareBatch | None = None,
        make_prepare_batch: Callable[[train.Setup], PrepareBatch] | None = None,
        on_ready: Callable[[], None] | None = None) -> RunResult:
    """Train `config` in `workdir`. make_model: what is trained (default: a Transformer of
    model_cfg); frozen: models the loss reads but never trains; batch_kind: what the train step
    reads (lm/data/batch.py: spec); prepare_batch: turns each global batch from the data into
    the step's batch with the current parameters (RL: rollouts), see `PrepareBatch`;
    make_prepare_batch: builds it from the planned Setup (graphdefs, mesh) when it needs them;
    on_ready: called once everything is validated and compiled and the start state restored,
    before the first step (the caller writes config.json then: a run that fails validation
    leaves no config behind, a resume that fails leaves the run's config.json as it was)."""
    tc = config.train
    mesh = shd.make_mesh(config.mesh)
    _validate(tc, mesh)
    nan_steps = parse_steps(tc.inject.nan_steps)
    optimizer, schedule = make_optimizer(config.optimizer, tc.steps)
    model = make_model or model_cfg
    frozen = frozen or {}
    # lora.rank > 0: train adapters over a frozen base (lm/train/lora.py); 0: all as given
    model, frozen, make_loss_fn, make_prepare_batch = lora_train.adapt(config, model, frozen, make_loss_fn,
                                                                       make_prepare_batch)
    setup = train.plan_state(model, optimizer, mesh, config.mesh.rules, config.seed,
                             frozen={name: f.make_model for name, f in frozen.items()})
    if make_prepare_batch is not None:
        if prepare_batch is not None:
            raise ValueError("pass prepare_batch or make_prepare_batch, not both")
        prepare_batch = make_prepare_batch(setup)
    n_params = param_count(setup.abstract_state.params)
    _log(f"model: {n_params:,} parameters; mesh {dict(mesh.shape)}"
         + "".join(f"; frozen {name}: {param_count(p):,}" for name, p in setup.abstract_frozen.items()))
    # compiled on abstract inputs before any array exists: a step that cannot fit fails here,
    # with the per-device bytes of parameters, optimizer state and temporaries
    step_fn = memory.compile_and_check(
        train.jit_train_step(train.make_train_step(make_loss_fn(setup.graphdef), optimizer, schedule,
                                                   tc.micro_batches), setup), setup, config, log=_log,
        batch_kind=batch_kind)
    state = train.init_state(model, optimizer, setup, config.seed)
    frozen_args = train.frozen_args(setup, load_frozen(setup, frozen, config.seed))
    rollout_key = jax.random.fold_in(jax.random.key(config.seed), 2)

    checkpointer = ckpt.Checkpointer(workdir, keep=tc.keep_checkpoints, async_save=tc.async_checkpointing,
                                     config=config, save_delay_s=tc.inject.save_delay_s)
    writer = bar = None
    finished = False
    watcher = preemption.PreemptionWatcher().start()  # a SIGTERM while compiling stops after the first step
    try:
        state, start, skipped = initial_state(tc, checkpointer, setup, state, optimizer, train_iter)
        if on_ready is not None:  # restored too: a checkpoint that does not fit leaves config.json as it was
            on_ready()
        writer = mx.MetricsWriter(workdir, wandb_cfg=config.wandb, config=config, resume_step=start)
        eval_fn = train.make_eval_step(make_loss_fn(setup.graphdef), setup)
        peak = mx.peak_flops(tc.peak_flops)[0]  # MFU = (6N + causal attention) FLOPs/token × tokens/s
        flops_tok = flops_per_token(model_cfg, tc.seq_len)  # / (peak × devices); lm/model/counting.py
        tokens_per_step = tc.batch_size * tc.seq_len
        bad = BadSteps(tc.max_bad_steps, skipped)

        def run_eval(step: int) -> dict[str, float]:
            if valid_batches is None:  # an objective without a validation loss (RL: it needs rollouts)
                return {}
            batches = (train.global_batch(b, mesh) for b in valid_batches())
            result = evaluate(eval_fn, state.params, batches, *frozen_args)
            writer.write(step, {f"valid/{k}": v for k, v in result.items()})
            return result

        def save(step: int) -> None:
            bad.flush()  # count this step's skip in the saved total
            checkpointer.save(step, state, _data_state(train_iter), extra={"skipped_steps": bad.total})

        if tc.progress_bar and jax.process_index() == 0:
            from tqdm import tqdm

            bar = tqdm(total=tc.steps, initial=start, unit="step", dynamic_ncols=True)
        if start >= tc.steps:
            _log(f"the checkpoint is at step {start} >= train.steps={tc.steps}: nothing left to train")
        history: list[dict] = []
        t_last, step_last = time.perf_counter(), start
        for step in range(start, tc.steps):
            local = next(train_iter)
            if step + 1 in nan_steps:
                local = poison(local)
            batch = train.global_batch(local, mesh)
            if prepare_batch is not None:
                batch, extra = prepare_batch(state.params, batch, jax.random.fold_in(rollout_key, step),
                                             *frozen_args)
            state, metrics = step_fn(state, batch, *frozen_args)
            if prepare_batch is not None:
                metrics = {**extra, **metrics}
            done = step + 1
            bad.push(done, metrics)
            if done % tc.log_every == 0 or done == tc.steps:
                metrics = jax.device_get(metrics)
                now = time.perf_counter()
                tok_s = tokens_per_step * (done - step_last) / (now - t_last)
                t_last, step_last = now, done
                row = {k: float(v) for k, v in metrics.items()}
                row.update(tokens_per_s=tok_s, mfu=flops_tok["total"] * tok_s / (peak * jax.device_count()))
                counts = getattr(train_iter, "error_counts", None)
                if callable(counts):
                    row.update({f"data/skipped_{k}": v for k, v in counts().items()})
                writer.write(done, row)
                history.append({"step": done, **row})
                if bar is not None:
                    bar.set_postfix({"loss": f"{row['loss']:.4f}",  # the objective's headline metrics next
                                     **{k: f"{v:.4g}" for k, v in headline(row).items()},
                                     "tok_s": f"{tok_s:,.0f}"}, refresh=False)
            if bar is not None:
                bar.update(1)
            if tc.inject.step_delay_s:
                time.sleep(tc.inject.step_delay_s)
            if watcher.should_stop(done) and done < tc.steps:
                if checkpointer.latest_step() != done:
                    save(done)
                checkpointer.wait()
                message = (f"preempted ({watcher.received}) after step {done}: checkpoint saved to "
                           f"{checkpointer.step_path(done)}. To resume, run the same command again with "
                           f"--workdir={checkpointer.workdir} (it resumes from the newest checkpoint there).")
                _log(message)
                raise preemption.Preempted(message, done, checkpointer.step_path(done))
            if tc.eval_every and done % tc.eval_every == 0 and done != tc.steps:
                run_eval(done)
            if tc.checkpoint_every and done % tc.checkpoint_every == 0 and done != tc.steps:
                save(done)
        bad.flush()
        if start < tc.steps:
            save(tc.steps)  # asynchronous: the final evaluation runs while it is written
        last_eval = run_eval(max(start, tc.steps))
        checkpointer.wait()
        finished = True
    finally:
        watcher.stop()
        _close(checkpointer, writer, bar, raise_errors=finished)
    if bad.total:
        _log(f"{bad.total} steps were skipped for a non-finite loss or gradient norm (see the log above)")
    frozen_params = frozen_args[0] if frozen_args else {}
    if lora_train.BASE in frozen_params:  # what evaluators read: the adapted model's whole parameters
        params, frozen_params = lora_train.full_params(state.params, frozen_params)
        state = state._replace(params=params)
    return RunResult(state, setup, last_eval, history, frozen_params)


def _close(checkpointer: ckpt.Checkpointer, writer, bar, *, raise_errors: bool) -> None:
    """Finish pending checkpoint writes and close everything; after another error, only try."""
    if bar is not None:
        bar.close()
    try:
        checkpointer.wait()
        checkpointer.close()
    except Exception:
        if raise_errors:
            raise
    if writer is not None:
        writer.close()
