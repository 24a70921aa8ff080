"""Exact match of greedy answers on held-out prompts of the synthetic chat tasks (lm/data/synthetic.py:
WordChat, ArithmeticChat), and what the model does when left to continue past its answer.

    exact_match = (Σ over prompts [reply == answer and it ended with <|end_of_turn|>]) / n

The prompt is the conversation without its final answer, ending with <|assistant|>; decoding is
greedy (lm.sampling). Knobs: config.eval.exact_match (configs/base.py).
"""

from __future__ import annotations

import time
from typing import Any

import jax


def split_reply(tokens: list[int], end_of_turn: int) -> tuple[list[int], bool, list[int]]:
    """Generated tokens -> (answer tokens before the first end-of-turn, whether it came, the rest)."""
    if end_of_turn in tokens:
        i = tokens.index(end_of_turn)
        return tokens[:i], True, tokens[i + 1:]
    return tokens, False, []


def evaluate_answers(graphdef: Any, params: Any, tokenizer: Any, examples: list[dict], *,
                     max_answer_tokens: int, continue_tokens: int, batch_size: int, seed: int = 0, mesh=None,
                     rules=None) -> dict:
    """Greedy replies to `examples` ({'messages': [... final assistant message], 'answer'}).

    The prompt is the conversation without its final answer, ending with <|assistant|>. The
    model generates max_answer_tokens + 1 + continue_tokens tokens without stopping: the
    answer is what precedes the first <|end_of_turn|>, and the tokens after it show what the
    model does when left to continue (does it write a <|user|> turn itself?).

    mesh, rules: the run's mesh and rules, that decoding is laid out by (lm.sampling.generate).

    Returns {'exact_match', 'stopped', 'writes_user_turn': fractions, 'n', 'replies': [...]}.
    """
    from lm import sampling
    from lm.data import chat

    eot, user = tokenizer.end_of_turn_id, tokenizer.role_ids["user"]
    prompts = [chat.render_prompt(ex["messages"][:-1], tokenizer).tolist() for ex in examples]
    settings = sampling.SamplingConfig(temperature=0.0, max_new_tokens=max_answer_tokens + 1 + continue_tokens)
    outputs = []
    for start in range(0, len(prompts), batch_size):
        outputs += sampling.generate(graphdef, params, prompts[start:start + batch_size], settings, seed=seed,
                                     mesh=mesh, rules=rules)
    replies, exact, stopped, writes_user = [], 0, 0, 0
    for ex, prompt, out in zip(examples, prompts, outputs):
        answer_ids, ended, rest = split_reply(out, eot)
        ended = ended and len(answer_ids) <= max_answer_tokens
        reply = tokenizer.decode(answer_ids, skip_special=False)
        correct = ended and reply == ex["answer"]
        exact += correct
        stopped += ended
        writes_user += ended and user in rest[:continue_tokens]
        replies.append({"prompt": tokenizer.decode(prompt), "reply": reply, "answer": ex["answer"],
                        "correct": bool(correct), "continuation": tokenizer.decode(rest)})
    n = len(examples)
    return {"exact_match": exact / n, "stopped": stopped / n, "writes_user_turn": writes_user / n, "n": n,
            "replies": replies}


def mesh_of(ctx) -> dict:
    """{mesh, rules} of the run (its Setup), for lm.sampling.generate; {} without one."""
    setup = getattr(ctx, "setup", None)
    return {} if setup is None else {"mesh": setup.mesh, "rules": setup.rules}


def evaluate(ctx) -> dict:
    """The evaluator (lm/evals/__init__.py): exact match on config.eval.exact_match.examples held-out
    conversations, printed with a few examples and failures. Returns the summary entries."""
    from lm import data

    config, tokenizer = ctx.config, ctx.tokenizer
    started = time.perf_counter()
    valid = data.build_source(config.data, split="valid", seq_len=config.train.seq_len, seed=config.seed,
                              tokenizer=tokenizer)
    if not hasattr(valid, "example"):  # only synthetic chat sources know their answers
        if jax.process_index() == 0:
            print(f"exact_match: skipped for data.source={config.data.source!r} "
                  "(answers are known only for the synthetic chat sources)")
        return {}
    ec = config.eval.exact_match
    examples = [valid.example(i) for i in range(ec.examples)]
    out = evaluate_answers(ctx.graphdef, ctx.params, tokenizer, examples, max_answer_tokens=ec.max_answer_tokens,
                           continue_tokens=ec.continue_tokens, batch_size=ec.batch_size, seed=config.seed,
                           **mesh_of(ctx))
    summary = {"exact_match": out["exact_match"], "exact_match_n": out["n"], "stopped_at_end_of_turn": out["stopped"],
               "writes_user_turn": out["writes_user_turn"], "eval_seconds": time.perf_counter() - started}
    if jax.process_index() == 0:
        print(f"held-out exact match (greedy): {100 * out['exact_match']:.1f}% of {out['n']} conversations; "
              f"ended the answer with <|end_of_turn|>: {100 * out['stopped']:.1f}%; "
              f"left to continue, wrote a <|user|> turn: {100 * out['writes_user_turn']:.1f}%")
        wrong = [r for r in out["replies"] if not r["correct"]]
        for title, shown in (("examples", out["replies"][: ec.print_examples]),
                             (f"failures ({len(wrong)}, the first {min(2, len(wrong))})", wrong[:2])):
            if shown:
                print(f"{title}:")
            for r in shown:
                print(f"  {r['prompt']}\n    → {r['reply']!r} (expected {r['answer']!r}: "
                      f"{'correct' if r['correct'] else 'WRONG'}); then: {r['continuation']!r}")
    return summary
