"""The command lines as a new user meets them: the launcher's pack step, sweeps that never
report a stale run, --help everywhere, one-line errors."""

import csv
import json
import os
import subprocess
import sys
import tarfile

import pytest

from lm.cli import config as cli_config
from lm.cli import errors, launch, sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_launcher_packs_the_repository_root_by_default(tmp_path):
    tarball = tmp_path / "src.tgz"
    args = launch.parse(["--tpu=t", "--zone=z", "--config=configs/default.py", "--workdir=/mnt/r",
                         f"--tarball={tarball}"])
    assert args.source_dir == REPO
    pack = dict(launch.commands(args))["pack this checkout"]
    subprocess.run(pack, check=True, cwd=tmp_path, timeout=60)  # the printed step, run as printed
    with tarfile.open(tarball) as tar:
        names = {n.removeprefix("./") for n in tar.getnames()}
    assert {"pyproject.toml", "lm/__init__.py", "configs/base.py", "README.md"} <= names
    assert not any(n.startswith((".git/", ".venv/", "runs/")) or "__pycache__" in n for n in names)


# -- sweeps ------------------------------------------------------------------------------------------

EXPERIMENT = 'CONFIG = "configs/default.py:tiny"\ndef sweep():\n    return [{"optimizer.lr": 1e-3}, {"optimizer.lr": 1e-2}]\n'


def _fake_train(calls):
    """subprocess.run for lm.cli.train: writes the config.json and summary.json a real run would."""
    def run(cmd, **_):
        workdir = next(a.split("=", 1)[1] for a in cmd if a.startswith("--workdir="))
        overrides = dict(a[len("--config."):].split("=", 1) for a in cmd if a.startswith("--config."))
        config = cli_config.load(cmd[cmd.index("-m") + 2].split("=", 1)[1], overrides)
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump({"valid_ce": 2.0 + config.train.steps / 100}, f)
        calls.append(os.path.basename(workdir))
        return subprocess.CompletedProcess(cmd, 0)
    return run


def test_sweep_reuses_a_run_only_when_its_config_is_the_same(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    exp = tmp_path / "exp.py"
    exp.write_text(EXPERIMENT)
    root = tmp_path / "sweep"
    calls = []
    monkeypatch.setattr(sweep.subprocess, "run", _fake_train(calls))
    base = [str(exp), f"--root={root}"]
    assert sweep.main(base + ["--set", "train.steps=30"]) == 0
    assert calls == ["lr=0.001", "lr=0.01"]
    assert sweep.main(base + ["--set", "train.steps=30"]) == 0  # same config: reused
    assert calls == ["lr=0.001", "lr=0.01"] and "already done" in capsys.readouterr().out
    # another train.steps: with --on_changed=stop nothing runs and the differing key is named
    assert sweep.main(base + ["--set", "train.steps=60", "--on_changed=stop"]) == 2
    assert "train.steps: 30 -> 60" in capsys.readouterr().err and len(calls) == 2
    # by default the stale runs are moved aside and run again; the table holds only the new numbers
    assert sweep.main(base + ["--set", "train.steps=60"]) == 0
    out = capsys.readouterr().out
    assert calls[2:] == ["lr=0.001", "lr=0.01"] and f"results table: {root}/results.md" in out
    assert len(list((root / "stale").iterdir())) == 2
    rows = list(csv.DictReader(open(root / "results.csv")))
    assert [r["valid_ce"] for r in rows] == ["2.6", "2.6"] and {r["status"] for r in rows} == {"done"}


def test_sweep_checks_every_override_before_running_print_only_too(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    exp = tmp_path / "exp.py"
    exp.write_text(EXPERIMENT)
    monkeypatch.setattr(sweep.subprocess, "run", lambda *a, **k: pytest.fail("a run started"))
    for extra in ([], ["--print_only"]):
        with pytest.raises(AttributeError) as info:
            sweep.main([str(exp), f"--root={tmp_path}/s", "--set", "optimizer.lrr=1", *extra])
        assert 'Did you mean "lr"' in errors.message(info.value, info.tb, ["--set", "optimizer.lrr=1"])
    with pytest.raises(ValueError, match="optimizer.lr=abc"):
        sweep.main([str(exp), "--print_only", "--set", "optimizer.lr=abc"])
    assert not (tmp_path / "s").exists()


# -- every `python -m lm...` answers --help ------------------------------------------------------------

OWNED_ELSEWHERE = {"lm.train.memory"}  # its --help is checked with the fit check


def _entry_points() -> list[str]:
    found = []
    for folder, _, files in os.walk(os.path.join(REPO, "lm")):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and 'if __name__ == "__main__"' in open(path).read():
                found.append(os.path.relpath(path, REPO)[:-3].replace(os.sep, ".").removesuffix(".__main__"))
    return sorted(set(found) - OWNED_ELSEWHERE)


def test_every_entry_point_answers_help_with_its_usage_and_status_0():
    modules = _entry_points()
    assert {"lm.cli.train", "lm.cli.sweep", "lm.cli.launch", "lm.cli.sample"} <= set(modules)
    env = dict(os.environ, JAX_PLATFORMS="cpu", LM_TUNE_MALLOC="0")
    procs = {m: subprocess.Popen([sys.executable, "-m", m, "--help"], cwd=REPO, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for m in modules}
    for module, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{module} --help: exit status {proc.returncode}\n{out[-2000:]}"
        assert f"python -m {module}" in out and "Traceback" not in out, f"{module} --help:\n{out[-2000:]}"


# -- errors, and what a run says ----------------------------------------------------------------------


def test_a_config_typo_is_one_line_without_a_literal_newline():
    from configs import default

    config = default.get_config("tiny")
    config.lock()
    for typo in (lambda: config.optimizer.lrr, lambda: setattr(config.optimizer, "lrr", 0.1)):  # read, write
        with pytest.raises(AttributeError) as info:
            typo()
        text = errors.message(info.value, info.tb, ["lm.cli.train", "--config.optimizer.lrr=0.1"])
        assert text.startswith("config: the override --config.optimizer.lrr names no field")
        assert 'Did you mean "lr" instead of "lrr"?' in text and "\\n" not in text and "\n" not in text
    assert errors.message(ValueError("optimizer.lr must be > 0, got -1.0")) == \
        "ValueError: optimizer.lr must be > 0, got -1.0"
    assert errors.message(ZeroDivisionError("a bug")) is None  # a bug keeps its traceback
    assert errors.verbose(["lm.cli.train", "--verbose"]) and not errors.verbose(["lm.cli.train"])


def test_target_verdict_says_met_not_met_or_cannot_check():
    import ml_collections

    from configs import default
    from lm.io import report

    config = default.get_config()
    assert report.target_verdict(config, {"relative_gap": 0.015}) == \
        "target met: relative_gap = 0.015 (stated: <= 0.02)"
    assert report.target_verdict(config, {"relative_gap": 0.05}).startswith("target NOT met")
    assert "cannot be checked" in report.target_verdict(config, {})
    assert report.target_verdict(default.get_config("tiny"), {"relative_gap": 0.5}) is None
    assert report.target_verdict(ml_collections.ConfigDict({"train": {}}), {}) is None


def test_resumed_with_another_config_keeps_the_first_in_config_history(tmp_path):
    from configs import default
    from lm.io import checkpoint as ckpt

    first, second = default.get_config("tiny"), default.get_config("tiny")
    second.optimizer.lr = 0.003
    assert ckpt.write_config(str(tmp_path), first) == []
    (tmp_path / "checkpoints" / "8").mkdir(parents=True)
    assert ckpt.write_config(str(tmp_path), first) == []  # unchanged: nothing kept
    assert ckpt.write_config(str(tmp_path), second) == ["optimizer.lr: 0.01 -> 0.003"]
    kept = json.loads((tmp_path / "config_history" / "config.step8.json").read_text())
    assert kept["optimizer"]["lr"] == 0.01
    assert json.loads((tmp_path / "config.json").read_text())["optimizer"]["lr"] == 0.003


def test_a_gpu_that_jax_does_not_use_is_a_loud_warning(monkeypatch):
    from lm.io import console

    monkeypatch.setattr(console.shutil, "which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    warning = console.gpu_without_jax_gpu("cpu")
    assert warning.startswith("WARNING:") and "pip install -e '.[gpu]'" in warning
    assert console.gpu_without_jax_gpu("gpu") is None
    monkeypatch.setattr(console.shutil, "which", lambda name: None)
    monkeypatch.setattr(console.glob, "glob", lambda pattern: [])
    assert console.gpu_without_jax_gpu("cpu") is None


def test_console_log_keeps_what_was_printed_before_the_run_directory_and_a_bar_s_last_state(tmp_path, capsys):
    from lm.io import console

    log = console.ConsoleLog()
    try:
        print("validated")
        assert not (tmp_path / "run").exists()  # nothing written before attach
        path = log.attach(str(tmp_path / "run"))
        sys.stderr.write("  0%| 0/8\r 50%| 4/8\r100%| 8/8\n")
        print("done")
        log.note("error: only in the file")
    finally:
        log.close()
    lines = open(path).read().splitlines()
    assert lines[1:] == ["validated", "100%| 8/8", "done", "error: only in the file"]
    assert "only in the file" not in capsys.readouterr().out


def test_append_file_on_an_object_store_rewrites_the_whole_file(tmp_path, monkeypatch):
    from lm.io import paths

    assert str(paths.run_path("gs://bucket/runs/x")) == "gs://bucket/runs/x"  # URLs kept, local paths absolute
    assert str(paths.run_path("~/r")) == os.path.expanduser("~/r")
    (tmp_path / "m.jsonl").write_text('{"step": 1}\n')  # a resumed run's earlier lines are kept
    monkeypatch.setattr(paths, "is_remote", lambda path: True)  # object stores cannot append
    log = paths.AppendFile(tmp_path / "m.jsonl", flush_s=3600)
    log.write('{"step": 2}\n')
    assert (tmp_path / "m.jsonl").read_text() == '{"step": 1}\n'  # held until flush_s or close
    log.close()
    assert (tmp_path / "m.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
