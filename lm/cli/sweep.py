"""Hyperparameter sweeps: expand an experiment into runs, run them, gather one table.

An experiment is a Python file with

    CONFIG = "configs/default.py"           # the config (":arg" allowed)
    def sweep() -> list[dict]:              # one dict of dotted overrides per run
        return [{"optimizer.lr": lr} for lr in (1e-3, 3e-3)]

and optionally `NAME` and `COLUMNS` (summary.json keys to put in the table).

    python -m lm.cli.sweep experiments/lr_sweep.py                  # run one after another here
    python -m lm.cli.sweep experiments/lr_sweep.py --print_only     # print the command lines (for a cluster)
    python -m lm.cli.sweep experiments/lr_sweep.py --set train.steps=50   # extra overrides for every run

Each run gets its own run directory under `--root` (default runs/sweeps/<name>/<run>). Before
any run starts (--print_only too), every run's config is built as lm.cli.train would build it,
so a misspelt or ill-typed override fails at once, naming the key and the close match. A run is
reused only if its directory holds a summary.json and a config.json equal to that config; a run
whose recorded config differs (another --set, an edited config file) is moved aside to
<root>/stale/ and run again, or, with --on_changed=stop, the sweep stops and names the keys
that differ. At the end every run's summary.json is gathered into results.csv and results.md
in the sweep directory, and the sweep prints where they are.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any

DEFAULT_COLUMNS = ("valid_ce", "bayes_optimal_ce", "kl_gap", "valid_accuracy", "train_loss", "tokens_per_s")


def load_experiment(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"experiment file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location("experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for attr in ("CONFIG", "sweep"):
        if not hasattr(module, attr):
            raise AttributeError(f"{path} must define {attr} (see lm/cli/sweep.py)")
    return module


def run_name(overrides: dict[str, Any]) -> str:
    """A directory-safe name from the overrides: 'optimizer.lr=0.001,train.steps=50' → 'lr=0.001_steps=50'."""
    if not overrides:
        return "base"
    parts = [f"{k.split('.')[-1]}={v}" for k, v in overrides.items()]
    return "_".join(parts).replace("/", "-").replace(" ", "")


def command(config: str, overrides: dict[str, Any], workdir: str) -> list[str]:
    args = [sys.executable, "-m", "lm.cli.train", f"--config={config}", f"--workdir={workdir}"]
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    return args


def parse_sets(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def expected_configs(exp, runs: list[tuple[str, dict, str]]) -> dict[str, dict]:
    """{run: the config JSON lm.cli.train would write}; raises on the first bad override."""
    from lm.cli import config as config_files

    out = {}
    for run, overrides, _ in runs:
        out[run] = json.loads(config_files.load(exp.CONFIG, overrides).to_json_best_effort())
    return out


def recorded_config(workdir: str) -> dict | None:
    path = os.path.join(workdir, "config.json")
    return json.load(open(path)) if os.path.exists(path) else None


def status(workdir: str, expected: dict) -> tuple[str, list[str]]:
    """('done' | 'partial' | 'stale' | 'missing', the keys whose values differ)."""
    from lm.io.checkpoint import config_differences

    recorded = recorded_config(workdir)
    if recorded is None:
        return "missing", []
    changes = config_differences(recorded, expected)
    if changes:
        return "stale", changes
    return ("done" if os.path.exists(os.path.join(workdir, "summary.json")) else "partial"), []


def gather(runs: list[tuple[str, dict, str]], columns: tuple[str, ...], out_dir: str,
           expected: dict[str, dict]) -> list[dict]:
    """Read each run's summary.json into rows; write results.csv and results.md. A run that is
    missing, unfinished or ran another config says so in `status` and shows no numbers."""
    rows = []
    keys = sorted({k for _, o, _ in runs for k in o})
    for name, overrides, workdir in runs:
        state, _ = status(workdir, expected[name])
        summary = json.load(open(os.path.join(workdir, "summary.json"))) if state == "done" else {}
        row = {"run": name, **{k: overrides.get(k, "") for k in keys}}
        row.update({c: summary.get(c, "") for c in columns})
        row["status"] = state
        rows.append(row)
    header = ["run", *keys, *columns, "status"]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(r[h]) for h in header) + " |" for r in rows]
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return rows


def set_aside(root: str, run: str, workdir: str) -> str:
    """Move a run directory that ran another config to <root>/stale/<run>-<time> (never deleted)."""
    dest = os.path.join(root, "stale", f"{run}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.move(workdir, dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lm.cli.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", help="the experiment file (CONFIG, sweep(), optional NAME and COLUMNS)")
    ap.add_argument("--root", default=None, help="sweep directory (default runs/sweeps/<name>)")
    ap.add_argument("--print_only", action="store_true", help="check every run's config, print the command "
                    "lines and exit")
    ap.add_argument("--set", action="append", default=[], help="key=value added to every run")
    ap.add_argument("--on_changed", choices=("rerun", "stop"), default="rerun",
                    help="a run directory whose config.json differs from the config the sweep would run now: "
                    "move it to <root>/stale/ and run again (rerun), or stop before any run, naming the "
                    "keys that differ (stop)")
    args = ap.parse_args(argv)
    exp = load_experiment(args.experiment)
    name = getattr(exp, "NAME", os.path.splitext(os.path.basename(args.experiment))[0])
    root = args.root or os.path.join("runs", "sweeps", name)
    extra = parse_sets(args.set)
    runs = []
    for overrides in exp.sweep():
        run = run_name(overrides)
        runs.append((run, {**overrides, **extra}, os.path.join(root, run)))
    names = [r[0] for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"two runs of {args.experiment} share a name: {names}")
    expected = expected_configs(exp, runs)  # every override checked before anything runs
    if args.print_only:
        for _, overrides, workdir in runs:
            print(shlex.join(command(exp.CONFIG, overrides, workdir)))
        return 0
    states = {run: status(workdir, expected[run]) for run, _, workdir in runs}
    stale = {run: changes for run, (state, changes) in states.items() if state == "stale"}
    if stale and args.on_changed == "stop":
        for run, changes in stale.items():
            print(f"{run}: its config.json differs from this sweep's config in {len(changes)} key(s):\n  "
                  + "\n  ".join(changes), file=sys.stderr)
        print(f"lm.cli.sweep: stopped (--on_changed=stop); nothing ran. Rerun without it to move those runs to "
              f"{os.path.join(root, 'stale')}/ and run them again, or use another --root.", file=sys.stderr)
        return 2
    failed = []
    for i, (run, overrides, workdir) in enumerate(runs):
        state, changes = states[run]
        if state == "done":
            print(f"[{i + 1}/{len(runs)}] {run}: already done with this config ({workdir})")
            continue
        if state == "stale":
            print(f"[{i + 1}/{len(runs)}] {run}: its earlier run had another config ({'; '.join(changes[:5])}"
                  f"{' ...' if len(changes) > 5 else ''}); moved to {set_aside(root, run, workdir)}")
        print(f"[{i + 1}/{len(runs)}] {run}" + (" (resuming)" if state == "partial" else ""), flush=True)
        if subprocess.run(command(exp.CONFIG, overrides, workdir)).returncode:
            failed.append(run)
    rows = gather(runs, tuple(getattr(exp, "COLUMNS", DEFAULT_COLUMNS)), root, expected)
    print(open(os.path.join(root, "results.md")).read())
    print(f"results table: {os.path.join(root, 'results.md')} and {os.path.join(root, 'results.csv')}")
    if failed:
        print(f"failed runs: {failed}", file=sys.stderr)
    return 1 if failed or any(r["status"] != "done" for r in rows) else 0


if __name__ == "__main__":
    from lm.cli import errors

    errors.install("lm.cli.sweep")
    sys.exit(main())
