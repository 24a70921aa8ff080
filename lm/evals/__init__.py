"""Evaluations, chosen in config.eval.evaluators (comma-separated names; configs/base.py). Each
evaluator reads a trained model through an `EvalContext` and returns summary.json entries; every
one computes sums and divides once. Objectives do no I/O; evaluators print on process 0.

    loss.py         validation loss, perplexity, accuracy (the loop runs it; not in the list)
    samples.py      "samples": a few continuations printed
    exact_match.py  "exact_match": greedy answers on held-out synthetic chat prompts
    pairwise_accuracy.py  "pairwise_accuracy": a reward model on held-out pairs (and vs Bayes on Markov)
    markov_optimum.py     "markov_optimum": a policy's KL-regularized objective vs the exact optimum
    rl.py           "rl_exact_match": the same for an RL policy and its frozen reference (SFT);
                    "markov_gain": the fraction of the optimal KL-regularized gain on the Markov task
    nuance.py       "nuance": sampled correctness, preferred-phrasing rate and KL to the SFT model on
                    the two-phrasing word chat task (experiments/rlhf_nuance.py)
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

EVALUATORS = {"samples": "lm.evals.samples", "exact_match": "lm.evals.exact_match",
              "pairwise_accuracy": "lm.evals.pairwise_accuracy", "markov_optimum": "lm.evals.markov_optimum",
              "rl_exact_match": "lm.evals.rl", "markov_gain": "lm.evals.rl:markov_gain",
              "nuance": "lm.evals.nuance"}


@dataclasses.dataclass
class EvalContext:
    """What an evaluator may read."""

    config: Any  # the run's ConfigDict
    workdir: str
    tokenizer: Any
    graphdef: Any  # the trained model's
    params: Any
    valid_batches: Callable[[], Any]  # fresh per-process validation batches
    frozen: dict = dataclasses.field(default_factory=dict)  # frozen models' params by name
    setup: Any = None  # lm.train.Setup (frozen models' graphdefs, the mesh)


def names(spec: str) -> list[str]:
    """'samples, exact_match' → ['samples', 'exact_match']; an unknown name is a clear error."""
    out = [n.strip() for n in str(spec or "").split(",") if n.strip()]
    unknown = [n for n in out if n not in EVALUATORS]
    if unknown:
        raise ValueError(f"config.eval.evaluators: unknown {unknown}; known: {sorted(EVALUATORS)}")
    return out


def run(spec: str, ctx: EvalContext) -> dict:
    """Run the evaluators named in `spec`, in order; their summary entries merged."""
    summary: dict = {}
    for name in names(spec):
        module, _, function = EVALUATORS[name].partition(":")  # 'module' or 'module:function'
        summary.update(getattr(importlib.import_module(module), function or "evaluate")(ctx))
    return summary
