"""Hyperparameter sweeps: expand an experiment into runs, run them, gather one table.

An experiment is a Python file with

    CONFIG = "configs/default.py"           # the config (":arg" allowed)
    def sweep() -> list[dict]:              # one dict of dotted overrides per run
        return [{"optimizer.lr": lr} for lr in (1e-3, 3e-3)]

and optionally `NAME` and `COLUMNS` (summary.json keys to put in the table).

    python -m lm.cli.sweep experiments/lr_sweep.py                  # run one after another here
    python -m lm.cli.sweep experiments/lr_sweep.py --print_only     # print the command lines (for a cluster)
    python -m lm.cli.sweep experiments/lr_sweep.py --set train.steps=50   # extra overrides for every run

Each run gets its own run directory under `--root` (default runs/sweeps/<name>/<run>);
a run that already has a summary.json is not run again. At the end every run's
summary.json is gathered into results.csv and results.md in the sweep directory.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import shlex
import subprocess
import sys
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


def gather(runs: list[tuple[str, dict, str]], columns: tuple[str, ...], out_dir: str) -> list[dict]:
    """Read each run's summary.json into rows; write results.csv and results.md. Missing runs say so."""
    rows = []
    keys = sorted({k for _, o, _ in runs for k in o})
    for name, overrides, workdir in runs:
        path = os.path.join(workdir, "summary.json")
        summary = json.load(open(path)) if os.path.exists(path) else {}
        row = {"run": name, **{k: overrides.get(k, "") for k in keys}}
        row.update({c: summary.get(c, "") for c in columns})
        row["status"] = "done" if summary else "missing"
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment")
    ap.add_argument("--root", default=None, help="sweep directory (default runs/sweeps/<name>)")
    ap.add_argument("--print_only", action="store_true", help="print the command lines and exit")
    ap.add_argument("--set", action="append", default=[], help="key=value added to every run")
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
    if args.print_only:
        for _, overrides, workdir in runs:
            print(shlex.join(command(exp.CONFIG, overrides, workdir)))
        return 0
    failed = []
    for i, (run, overrides, workdir) in enumerate(runs):
        if os.path.exists(os.path.join(workdir, "summary.json")):
            print(f"[{i + 1}/{len(runs)}] {run}: already done")
            continue
        print(f"[{i + 1}/{len(runs)}] {run}", flush=True)
        if subprocess.run(command(exp.CONFIG, overrides, workdir)).returncode:
            failed.append(run)
    rows = gather(runs, tuple(getattr(exp, "COLUMNS", DEFAULT_COLUMNS)), root)
    print(open(os.path.join(root, "results.md")).read())
    if failed:
        print(f"failed runs: {failed}", file=sys.stderr)
    return 1 if failed or any(r["status"] != "done" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
