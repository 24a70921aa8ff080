"""Objectives: one module per objective (`lm/objectives/<name>.py`).

Each module exposes `make_loss_fn(config, graphdef)`, returning
`loss_fn(params, batch, rng) -> (objective_sum, sums)` for the generic trainer (see
lm/train/step.py): a sum over scored tokens and a dict of sums that includes `count`.
A module may also define `after_training(config, result, tokenizer, workdir) -> dict`,
whose entries are added to the run's summary.json (e.g. an exact-match evaluation).
"""

import importlib
import pkgutil


def names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get(name: str):
    """The objective module `lm.objectives.<name>`; a clear error for an unknown name."""
    if name not in names():
        raise ValueError(f"config.objective={name!r} is not one of {names()}")
    return importlib.import_module(f"lm.objectives.{name}")
