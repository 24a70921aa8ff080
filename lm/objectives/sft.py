"""Supervised fine-tuning (SFT): pretraining's loss under the chat loss mask (seed 004).

    objective = Σ_t loss_mask_t · (−log p_θ(targets_t | inputs_≤t)),   count = Σ_t loss_mask_t

This is exactly pretraining's objective (the same `pretrain.token_loss` over lm.losses, the
same train step); only the mask differs. The chat template (lm/data/chat.py) writes it: with
data.chat_loss='assistant_only' the model reads the whole conversation through the causal
mask but only the assistant's tokens, and the <|end_of_turn|> closing each answer, are
scored ("assistant-only masking = causal masking + selective loss scoring"). Several
conversations are packed per row; `segment_ids` keep them from attending to each other
(lm.masking.attention_mask) and `positions` restart at 0 in each.

Starting point: from scratch, or the params of a pretraining run (config.train.restore_from,
params only); `check_init_checkpoint` refuses a checkpoint whose tokenizer (kind,
vocabulary, special-token ids) differs from the one configured here.

After training, `after_training` decodes greedily on held-out prompts of the built-in
synthetic chat tasks (lm/data/synthetic.py: WordChat, ArithmeticChat) and reports the
exact-match accuracy of the answers, and how often the model, let run past its
<|end_of_turn|>, writes a user turn itself.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np

from lm.objectives import pretrain

CHAT_SOURCES = ("arithmetic_chat", "word_chat", "chat_jsonl")


# -- the loss ---------------------------------------------------------------------------------------


def make_loss_fn(config: Any, graphdef: Any):
    """loss_fn(params, batch, rng) -> (objective_sum, sums): pretraining's, on chat-masked batches."""
    if config.data.source not in CHAT_SOURCES:
        raise ValueError(f"config.objective='sft' needs a chat data source {CHAT_SOURCES} (their loss "
                         f"mask scores the assistant's turns); got data.source={config.data.source!r}")
    check_init_checkpoint(config)
    return pretrain.make_loss_fn(config, graphdef)


# -- starting from a pretrained checkpoint ----------------------------------------------------------


def init_checkpoint_path(config: Any) -> str | None:
    """config.train.restore_from when the config has it and it is set, else None."""
    train_cfg = config.train
    path = train_cfg.get("restore_from") if hasattr(train_cfg, "get") else None
    return path or None


def find_tokenizer_metadata(path: str) -> str:
    """tokenizer_metadata.json of the run that `path` (a run dir, its checkpoints/ dir or one
    checkpoint step inside it) belongs to; FileNotFoundError naming where it looked."""
    from lm.data.tokenizer import METADATA_FILE

    looked = []
    here = os.path.abspath(path)
    for _ in range(4):
        candidate = os.path.join(here, METADATA_FILE)
        looked.append(candidate)
        if os.path.exists(candidate):
            return candidate
        here = os.path.dirname(here)
    raise FileNotFoundError(f"no {METADATA_FILE} for checkpoint {path!r} (looked at {looked}): cannot check "
                            "that its tokenizer matches this run's; lm.cli.train writes it into every run directory")


def before_training(config: Any, tokenizer: Any) -> None:
    """Checks to run before any checkpoint is restored (see the SFT report: lm/cli/train.py hook)."""
    check_init_checkpoint(config, tokenizer)


def check_init_checkpoint(config: Any, tokenizer: Any = None) -> None:
    """Raise TokenizerMismatchError when config.train.restore_from names a run whose tokenizer
    (kind, vocab size, fingerprint, special-token ids) differs from config.data.tokenizer's."""
    path = init_checkpoint_path(config)
    if path is None:
        return
    from lm import data

    tokenizer = tokenizer or data.build_tokenizer(config.data)
    saved = data.load_metadata(find_tokenizer_metadata(path))
    try:
        data.check_metadata(saved, tokenizer.metadata(), expected_name=f"checkpoint {path}",
                            actual_name=f"data.tokenizer={config.data.tokenizer!r}")
    except data.TokenizerMismatchError as e:
        raise data.TokenizerMismatchError(
            f"{e}\nSFT must start from a checkpoint trained with the same tokenizer and special-token ids "
            "(set data.tokenizer to the pretraining run's, or train.restore_from to a matching run)") from None


# -- evaluation: exact match of greedy answers on held-out prompts ----------------------------------


def split_reply(tokens: list[int], end_of_turn: int) -> tuple[list[int], bool, list[int]]:
    """Generated tokens -> (answer tokens before the first end-of-turn, whether it came, the rest)."""
    if end_of_turn in tokens:
        i = tokens.index(end_of_turn)
        return tokens[:i], True, tokens[i + 1:]
    return tokens, False, []


def evaluate_answers(graphdef: Any, params: Any, tokenizer: Any, examples: list[dict], *,
                     max_answer_tokens: int, continue_tokens: int, batch_size: int, seed: int = 0) -> dict:
    """Greedy replies to `examples` ({'messages': [... final assistant message], 'answer'}).

    The prompt is the conversation without its final answer, ending with <|assistant|>. The
    model generates max_answer_tokens + 1 + continue_tokens tokens without stopping: the
    answer is what precedes the first <|end_of_turn|>, and the tokens after it show what the
    model does when left to continue (does it write a <|user|> turn itself?).

    Returns {'exact_match', 'stopped', 'writes_user_turn': fractions, 'n', 'replies': [...]}.
    """
    from lm import sampling
    from lm.data import chat

    eot, user = tokenizer.end_of_turn_id, tokenizer.role_ids["user"]
    prompts = [chat.render_prompt(ex["messages"][:-1], tokenizer).tolist() for ex in examples]
    settings = sampling.SamplingConfig(temperature=0.0, max_new_tokens=max_answer_tokens + 1 + continue_tokens)
    outputs = []
    for start in range(0, len(prompts), batch_size):
        outputs += sampling.generate(graphdef, params, prompts[start:start + batch_size], settings, seed=seed)
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


def _process_seconds() -> tuple[float, float] | None:
    """(wall seconds since this process started, CPU seconds it used: user + system, all threads)."""
    try:
        import psutil

        process = psutil.Process(os.getpid())
        cpu = process.cpu_times()
        return time.time() - process.create_time(), cpu.user + cpu.system
    except Exception:  # noqa: BLE001 -- informative only
        return None


def after_training(config: Any, result: Any, tokenizer: Any, workdir: str) -> dict:
    """Exact match of greedily decoded answers on held-out prompts (synthetic chat sources); printed with
    a few example conversations. Returns the entries added to summary.json."""
    from lm import data

    started = time.perf_counter()
    valid = data.build_source(config.data, split="valid", seq_len=config.train.seq_len, seed=config.seed,
                              tokenizer=tokenizer)
    if not hasattr(valid, "example"):  # only synthetic chat sources know their answers
        if jax.process_index() == 0:
            print(f"sft: no exact-match evaluation for data.source={config.data.source!r} "
                  "(answers are known only for the synthetic chat sources)")
        return {}
    ec = config.sft
    examples = [valid.example(i) for i in range(ec.eval_examples)]
    out = evaluate_answers(result.setup.graphdef, result.state.params, tokenizer, examples,
                           max_answer_tokens=ec.max_answer_tokens, continue_tokens=ec.continue_tokens,
                           batch_size=ec.eval_batch_size, seed=config.seed)
    summary = {"exact_match": out["exact_match"], "exact_match_n": out["n"], "stopped_at_end_of_turn": out["stopped"],
               "writes_user_turn": out["writes_user_turn"], "eval_seconds": time.perf_counter() - started}
    scored = [r["tokens"] for r in result.history if "tokens" in r]
    if scored:
        summary["scored_tokens_per_step"] = float(np.mean(scored))
    times = _process_seconds()
    if times is not None:
        summary["wall_seconds"], summary["cpu_seconds"] = times
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
        if times is not None:
            print(f"time so far: {times[0]:.0f} s wall, {times[1]:.0f} s CPU (evaluation: "
                  f"{summary['eval_seconds']:.0f} s wall)")
    return summary
