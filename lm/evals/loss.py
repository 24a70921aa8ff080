"""Validation loss: sums over every batch, divided once (the loop runs it every train.eval_every
steps and at the end; its result is the run's final_eval)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lm.losses import mean_of


_KNOWN = ("nll_sum", "correct_sum", "z_loss_sum", "objective_sum")


def summary_metrics(sums: dict) -> dict:
    """Means from sums: nll (→ perplexity), token accuracy, z-loss, and `<name>` for every other
    `<name>_sum` (e.g. DPO's 'rewards/margins_sum'); each 0 when count is 0. The objective's own
    mean is the step's / evaluation's `loss`. An objective may also add
    `sums["means"] = {name: (numerator sum, denominator sum)}` for a ratio with its own
    denominator: summed over micro-batches like every sum, reported as numerator / denominator."""
    count = sums["count"]
    out = {}
    if "nll_sum" in sums:
        out["nll"] = mean_of(sums["nll_sum"], count)
        out["perplexity"] = jnp.exp(out["nll"])
    if "correct_sum" in sums:
        out["accuracy"] = mean_of(sums["correct_sum"], count)
    if "z_loss_sum" in sums:
        out["z_loss"] = mean_of(sums["z_loss_sum"], count)
    for key in sums:  # any other per-count sum an objective reports, e.g. 'margin_sum' → 'margin'
        if key.endswith("_sum") and key not in _KNOWN:
            out[key[:-4]] = mean_of(sums[key], count)
    for name, (numerator, denominator) in sums.get("means", {}).items():  # an objective's own ratios
        out[name] = mean_of(numerator, denominator)
    return out


def evaluate(eval_step, params, batches, *frozen) -> dict[str, float]:
    """Run `eval_step` (lm.train.make_eval_step) over an iterable of global batches; sums added,
    then means taken once."""
    total = None
    for batch in batches:
        sums = eval_step(params, batch, *frozen)
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    if total is None:
        raise ValueError("evaluation got no batches")
    out = {k: float(v) for k, v in summary_metrics(total).items()}
    out["loss"] = float(mean_of(total["objective_sum"], total["count"]))
    out["tokens"] = float(total["count"])
    return out
