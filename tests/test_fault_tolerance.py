"""Fault tolerance end to end: the real training process (python -m lm.cli.train) is killed with
SIGKILL (once while a checkpoint is being written, once between saves), preempted with SIGTERM,
restored from a checkpoint with a flipped bit, fed NaN batches, and restored params-only. A
restarted run must be exactly the run it would have been: losses are compared bit for bit (CPU,
one device) with an uninterrupted run of the same config, and metrics.jsonl holds every step once.

The processes share a JAX compilation cache in the test's temp dir, so only the first one
compiles. `train.inject.*` hooks slow the steps or the saves down so that a kill lands mid-run.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from test_checkpoint import flip_a_bit_orbax_misses

from lm.io import checkpoint as ckpt
from lm.parallel import sharding as shd
from lm import train
from lm.train.optim import make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
BASE = ["--config=configs/default.py:tiny", f"--config.train.steps={STEPS}", "--config.train.log_every=1",
        "--config.train.checkpoint_every=3", "--config.train.keep_checkpoints=2", "--config.train.eval_every=0",
        "--config.sample.num_samples=0", "--config.train.peak_flops=1e12"]
SLOW_STEPS = "--config.train.inject.step_delay_s=0.3"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("jax_cache"))
    return dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


class Proc:
    """One `python -m lm.cli.train` process; its stdout/stderr go to files next to the workdir."""

    count = 0

    def __init__(self, env, workdir, *args):
        Proc.count += 1
        self.workdir = str(workdir)
        self.log = f"{self.workdir}.{Proc.count}"
        with open(self.log + ".out", "w") as out, open(self.log + ".err", "w") as err:
            self.popen = subprocess.Popen([sys.executable, "-m", "lm.cli.train", *BASE, f"--workdir={workdir}", *args],
                                          cwd=REPO, env=env, stdout=out, stderr=err)

    def wait(self, timeout=240) -> int:
        return self.popen.wait(timeout)

    @property
    def out(self) -> str:
        return open(self.log + ".out").read()

    @property
    def err(self) -> str:
        return open(self.log + ".err").read()

    def ok(self) -> "Proc":
        rc = self.wait()
        assert rc == 0, f"lm.cli.train exited {rc}:\n{self.out[-2000:]}\n{self.err[-3000:]}"
        return self

    def wait_until(self, condition, what: str, timeout=240) -> None:
        end = time.time() + timeout
        while not condition():
            if self.popen.poll() is not None:
                raise AssertionError(f"lm.cli.train ended ({self.popen.returncode}) before {what}:\n{self.err[-3000:]}")
            if time.time() > end:
                self.popen.kill()
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.01)

    def kill_after_step(self, step: int, sig=signal.SIGKILL) -> int:
        """Send `sig` once metrics.jsonl shows `step`; return the last step logged before it."""
        self.wait_until(lambda: last_step(self.workdir) >= step, f"step {step}")
        logged = last_step(self.workdir)
        self.popen.send_signal(sig)
        return logged


def rows(workdir) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def last_step(workdir) -> int:
    return max([r["step"] for r in rows(workdir) if "loss" in r], default=0)


def losses(workdir) -> dict[int, float]:
    """{step: loss}; asserts that every step appears once."""
    train_rows = [r for r in rows(workdir) if "loss" in r]
    steps = [r["step"] for r in train_rows]
    assert len(steps) == len(set(steps)), f"a step is logged twice: {steps}"
    return {r["step"]: r["loss"] for r in train_rows}


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    """The uninterrupted run: its directory and {step: loss}."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    Proc(env, workdir).ok()
    ref = losses(workdir)
    assert sorted(ref) == list(range(1, STEPS + 1))
    return str(workdir), ref


def assert_same_run(workdir, ref):
    got = losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1)), sorted(got)
    diff = {s: (got[s], ref[s]) for s in ref if got[s] != ref[s]}
    assert not diff, f"losses differ from the uninterrupted run (step: got, expected): {diff}"


def test_killed_while_saving_killed_again_then_preempted_resumes_to_the_same_run(env, reference, tmp_path):
    """One run directory, four processes: kill -9 while step 6 is being saved; kill -9 at a
    later step; SIGTERM; run to the end. Each restart resumes from the newest complete
    checkpoint, and the 12 logged losses equal the uninterrupted run's, each step once."""
    workdir = tmp_path / "run"
    ckpts = workdir / "checkpoints"
    first = Proc(env, workdir, SLOW_STEPS, "--config.train.inject.save_delay_s=1.0")
    # step 3's save has completed (a save waits for the previous one); step 6's is being written
    first.wait_until(lambda: (ckpts / "3").is_dir() and any(n.startswith("6.orbax-checkpoint-tmp")
                                                             for n in os.listdir(ckpts)), "the save of step 6")
    first.popen.kill()
    assert first.wait() == -signal.SIGKILL
    assert not (ckpts / "6").exists()

    second = Proc(env, workdir, SLOW_STEPS)
    killed_at = second.kill_after_step(9)
    assert second.wait() == -signal.SIGKILL
    assert f"ignoring {ckpts}/6.orbax-checkpoint-tmp" in second.out and "did not finish" in second.out
    assert f"resumed from {ckpts}/3 (step 3)" in second.out
    assert killed_at < STEPS - 1, killed_at

    third = Proc(env, workdir, SLOW_STEPS)
    third.kill_after_step(killed_at + 1, signal.SIGTERM)
    assert third.wait() == 0, third.err[-3000:]
    assert "resumed from" in third.out
    stopped = last_step(workdir)
    assert killed_at < stopped < STEPS
    checkpoint = f"{ckpts}/{stopped}"
    assert f"preempted (SIGTERM) after step {stopped}: checkpoint saved to {checkpoint}" in third.out
    assert f"--workdir={workdir}" in third.out and os.path.isdir(checkpoint)

    final = Proc(env, workdir).ok()
    assert f"resumed from {checkpoint} (step {stopped})" in final.out
    assert_same_run(workdir, reference[1])


def test_restore_from_a_run_with_a_damaged_newest_checkpoint_continues_it_exactly(env, reference, tmp_path):
    """train.restore_from=<another run>: its newest checkpoint has one flipped bit that orbax
    alone restores as wrong numbers; the run refuses it, falls back to the one before, says so,
    and continues exactly as the original run did."""
    ref_dir, ref = reference
    source = tmp_path / "source"
    subprocess.run(["cp", "-r", ref_dir, str(source)], check=True)
    flip_a_bit_orbax_misses(str(source / "checkpoints"), STEPS, _state_target(source))
    workdir = tmp_path / "run"
    proc = Proc(env, workdir, f"--config.train.restore_from={source}").ok()
    assert f"checkpoint {source}/checkpoints/{STEPS} cannot be restored (CorruptCheckpointError" in proc.out
    assert f"resumed from {source}/checkpoints/9 (step 9), given by train.restore_from" in proc.out
    assert losses(workdir) == {s: ref[s] for s in (10, 11, 12)}


def test_nan_batches_are_skipped_logged_and_stop_the_run_naming_the_step(env, reference, tmp_path):
    workdir = tmp_path / "run"
    proc = Proc(env, workdir, "--config.train.inject.nan_steps=4,7,8", "--config.train.max_bad_steps=2")
    assert proc.wait() != 0
    assert "step 4: non-finite loss (nan)" in proc.out and "update skipped (1 in a row" in proc.out
    assert "FloatingPointError: step 8: 2 consecutive steps (steps 7..8)" in proc.err
    by_step = {r["step"]: r for r in rows(workdir) if "loss" in r}
    assert sorted(by_step) == list(range(1, 9))
    assert [s for s, r in by_step.items() if r["skipped"]] == [4, 7, 8]
    assert by_step[4]["loss"] == "nan"
    assert {s: by_step[s]["loss"] for s in (1, 2, 3)} == {s: reference[1][s] for s in (1, 2, 3)}
    # the parameters stayed finite (a NaN parameter would make every later loss NaN), and the
    # checkpoint after the skipped step counts it
    assert np.isfinite([by_step[s][k] for s in (5, 6) for k in ("loss", "grad_norm")]).all()
    assert json.load(open(workdir / "checkpoints" / "6" / "meta" / "metadata"))["skipped_steps"] == 1


def test_params_only_restore_starts_a_new_run_from_the_pretrained_model(env, reference, tmp_path):
    """restore_params_only: step 1 of a new run (fresh schedule: its learning rate is 0 at step 0,
    so the update is exactly zero) evaluates exactly like the pretrained run's final parameters."""
    ref_dir, _ = reference
    workdir = tmp_path / "run"
    proc = Proc(env, workdir, f"--config.train.restore_from={ref_dir}", "--config.train.restore_params_only=True",
                "--config.train.steps=1").ok()
    assert f"parameters from {ref_dir}/checkpoints/{STEPS} (step {STEPS}); a new run from step 0" in proc.out
    (train_row,) = [r for r in rows(workdir) if "loss" in r]
    assert train_row["step"] == 1 and train_row["learning_rate"] == 0.0
    (evaluated,) = [r for r in rows(workdir) if "valid/loss" in r]
    (pretrained,) = [r for r in rows(ref_dir) if "valid/loss" in r]
    assert evaluated["valid/loss"] == pretrained["valid/loss"]


def _state_target(run_dir):
    """The run's train state as ShapeDtypeStructs on one device."""
    model_cfg, _, _, config = ckpt.load_for_inference(str(run_dir))
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    setup = train.plan_state(model_cfg, make_optimizer(config.optimizer, STEPS)[0], mesh, config.mesh.rules)
    return ckpt.abstract_with_shardings(setup.abstract_state, setup.state_shardings)
