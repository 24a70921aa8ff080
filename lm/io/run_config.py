"""A run directory's config.json and its history.

    write_config(workdir, config)   config.json; where a different one is there (a run resumed
                                    with a changed config) it is kept as
                                    config_history/config.step<N>.json first and the
                                    differences are returned
    read_config(workdir)            the ConfigDict back
    config_differences(old, new)    ['optimizer.lr: 0.001 -> 0.003', ...]
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections

from lm.io import paths


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the dotted keys of a nested dict (a config's JSON)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(old: dict, new: dict) -> list[str]:
    """['optimizer.lr: 0.001 -> 0.003', ...]: the dotted keys whose values differ (sorted)."""
    a, b = flat(old), flat(new)
    missing = object()
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)]


def write_config(workdir: str, config: ml_collections.ConfigDict) -> list[str]:
    """Write `workdir/config.json`. Where one with other values is already there (a run resumed
    with a changed config), it is kept first as config_history/config.step<N>.json, N the newest
    checkpoint's step (the step that config trained up to). Returns the differences (old -> new);
    [] for a new run or an unchanged config."""
    run = paths.run_path(workdir)
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    path = run / "config.json"
    changes: list[str] = []
    if path.exists():
        old_text = path.read_text()
        try:
            changes = config_differences(json.loads(old_text), json.loads(text))
        except ValueError:  # unreadable: keep it all the same
            changes = ["config.json: (unreadable) -> (this run's)"]
        if changes:
            ckpts = run / "checkpoints"
            steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.is_dir() else []
            step = max(steps, default=0)
            dest = run / "config_history" / f"config.step{step}.json"
            n = 1
            while dest.exists():
                n += 1
                dest = run / "config_history" / f"config.step{step}.{n}.json"
            paths.write_text(dest, old_text)
    paths.write_text(path, text)
    return changes


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = paths.run_path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {workdir!r} a run directory of lm?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))
