""""rl_exact_match": held-out greedy exact match of an RL policy and of the frozen reference it
started from (the SFT model), on the same prompts (lm/evals/exact_match.py's rule and knobs).

    rl_exact_match, sft_exact_match     fractions of config.eval.exact_match.examples prompts
    rl_error_rate, sft_error_rate       1 − each
    error_rate_ratio                    rl_error_rate / sft_error_rate (≤ 0.5: RL halved the errors)
"""

from __future__ import annotations

import time

import jax


def evaluate(ctx) -> dict:
    from lm import data
    from lm.evals.exact_match import evaluate_answers

    config, started = ctx.config, time.perf_counter()
    valid = data.build_source(config.data, split="valid", seq_len=config.train.seq_len, seed=config.seed,
                              tokenizer=ctx.tokenizer)
    if not hasattr(valid, "example") or "messages" not in valid.example(0):
        if jax.process_index() == 0:
            print(f"rl_exact_match: skipped for data.source={config.data.source!r} (no chat answers)")
        return {}
    ec = config.eval.exact_match
    examples = [valid.example(i) for i in range(ec.examples)]
    models = {"rl": (ctx.graphdef, ctx.params)}
    if "reference" in ctx.frozen:
        models["sft"] = (ctx.setup.frozen_graphdefs["reference"], ctx.frozen["reference"])
    out = {}
    for name, (graphdef, params) in models.items():
        result = evaluate_answers(graphdef, params, ctx.tokenizer, examples, max_answer_tokens=ec.max_answer_tokens,
                                  continue_tokens=ec.continue_tokens, batch_size=ec.batch_size, seed=config.seed)
        out[f"{name}_exact_match"] = result["exact_match"]
        out[f"{name}_error_rate"] = 1.0 - result["exact_match"]
        if jax.process_index() == 0:
            print(f"{name}: held-out exact match (greedy) {100 * result['exact_match']:.1f}% of {result['n']}")
            for r in result["replies"][:ec.print_examples]:
                print(f"  {r['prompt']}\n    → {r['reply']!r} (expected {r['answer']!r})")
    if "sft_error_rate" in out and out["sft_error_rate"] > 0:
        out["error_rate_ratio"] = out["rl_error_rate"] / out["sft_error_rate"]
    out["rl_exact_match_n"] = len(examples)
    out["rl_eval_seconds"] = time.perf_counter() - started
    return out
