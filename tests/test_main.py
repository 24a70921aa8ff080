"""The main job end to end, as a user runs it: a real process, a real run directory."""

import json
import os
import subprocess
import sys

import pytest

from lm.cli import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, check=True):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "lm.cli.train", "--config=configs/default.py:tiny", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode:
        raise AssertionError(f"lm.cli.train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    return workdir, _run(f"--workdir={workdir}")


def test_run_directory_has_everything(tiny_run):
    workdir, proc = tiny_run
    for name in ("config.json", "metrics.jsonl", "summary.json", "loss.png", "checkpoints"):
        assert os.path.exists(os.path.join(workdir, name)), name
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["steps"] == 8 and summary["bayes_optimal_ce"] > 0
    assert summary["kl_gap"] == pytest.approx(summary["valid_ce"] - summary["bayes_optimal_ce"])
    train_steps = [r["step"] for r in _metrics(workdir) if "loss" in r]
    assert train_steps == [2, 4, 6, 8]
    row = next(r for r in _metrics(workdir) if "loss" in r)
    for key in ("loss", "grad_norm", "learning_rate", "tokens_per_s", "mfu"):
        assert key in row
    assert "Bayes-optimal cross-entropy" in proc.stdout and "samples" in proc.stdout
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert config["train"]["steps"] == 8 and config["model"]["d_model"] == 32
    assert "memory per device: parameters" in proc.stdout and "temporaries" in proc.stdout
    # where and on what, at the start; where everything went, at the end; the console kept
    assert f"run directory: {workdir}" in proc.stdout and "platform: cpu, 1 × cpu" in proc.stdout
    assert f"outputs in {workdir}: checkpoints checkpoints/, metrics metrics.jsonl" in proc.stdout
    log = open(os.path.join(workdir, "console.log")).read()
    assert "Bayes-optimal cross-entropy" in log and "platform: cpu" in log


def test_a_step_that_cannot_fit_stops_before_training(tmp_path):
    proc = _run(f"--workdir={tmp_path}", "--config.mesh.device_memory_gib=0.0001", check=False)
    assert proc.returncode != 0
    assert "DoesNotFit" in proc.stderr and "per device but" in proc.stderr
    assert not os.path.exists(os.path.join(tmp_path, "metrics.jsonl"))  # no step ran, nothing logged


def test_rerun_resumes_without_duplicating_steps(tiny_run):
    workdir, _ = tiny_run
    proc = _run(f"--workdir={workdir}", "--config.train.steps=12")
    assert "resumed from" in proc.stdout
    steps = [r["step"] for r in _metrics(workdir) if "loss" in r]
    assert steps == [2, 4, 6, 8, 10, 12]
    # the changed key is printed and the first segment's config kept
    assert "resuming with a changed config: 1 key(s) differ" in proc.stdout and "train.steps: 8 -> 12" in proc.stdout
    assert json.load(open(os.path.join(workdir, "config_history", "config.step8.json")))["train"]["steps"] == 8
    assert json.load(open(os.path.join(workdir, "config.json")))["train"]["steps"] == 12


def test_unknown_config_key_names_the_close_match(tmp_path):
    proc = _run(f"--workdir={tmp_path}/run", "--config.optimizer.lrr=0.1", check=False)
    assert proc.returncode != 0
    assert 'Did you mean "lr"' in proc.stderr and "--config.optimizer.lrr" in proc.stderr
    assert "Traceback" not in proc.stderr and "\\n" not in proc.stderr and len(proc.stderr.splitlines()) <= 2
    proc = _run(f"--workdir={tmp_path}/run", "--config.optimizer.lr=-1", check=False)
    assert proc.returncode == 1 and "optimizer.lr must be > 0, got -1.0" in proc.stderr
    assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "run")  # nothing written


def test_impossible_values_fail_before_compiling(tmp_path):
    proc = _run(f"--workdir={tmp_path}", "--config.model.num_heads=3", check=False)
    assert proc.returncode != 0 and "does not divide" in proc.stderr
    proc = _run(f"--workdir={tmp_path}", "--config.mesh.data=3", check=False)
    assert proc.returncode != 0 and "needs 3 devices" in proc.stderr


def test_sweep_runs_each_point_and_gathers_a_table(tmp_path):
    exp = tmp_path / "exp.py"
    exp.write_text('CONFIG = "configs/default.py:tiny"\n'
                   'def sweep():\n    return [{"optimizer.lr": 1e-3}, {"optimizer.lr": 1e-2}]\n')
    root = tmp_path / "sweep"
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "lm.cli.sweep", str(exp), f"--root={root}",
                           "--set", "train.steps=2", "--set", "sample.num_samples=0"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(open(root / "results.csv"))
    assert len(rows) == 3 and all("done" in r for r in rows[1:])
    assert "lr=0.001" in (root / "results.md").read_text()
    assert f"results table: {root}/results.md" in proc.stdout
    printed = subprocess.run([sys.executable, "-m", "lm.cli.sweep", str(exp), "--print_only"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=60).stdout.splitlines()
    assert len(printed) == 2 and "--config.optimizer.lr=0.01" in printed[1]


def test_run_name_is_directory_safe():
    assert sweep.run_name({"optimizer.lr": 0.001, "data.text.train_files": "a/b"}) == "lr=0.001_train_files=a-b"
