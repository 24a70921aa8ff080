"""Objectives: one module per objective, each exposing `make_loss_fn(config, graphdef)`.

`make_loss_fn` returns `loss_fn(params, batch, rng) -> (objective_sum, sums)` for the
generic trainer (see lm/train.py): a sum over scored tokens and a dict of sums that
includes `count`.
"""

import importlib

NAMES = ("pretrain",)


def get(name: str):
    """The objective module `lm.objectives.<name>`; a clear error for an unknown name."""
    if name not in NAMES:
        raise ValueError(f"config.objective={name!r} is not one of {NAMES}")
    return importlib.import_module(f"lm.objectives.{name}")
