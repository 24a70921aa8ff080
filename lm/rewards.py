"""Rule rewards for RL: name → a scorer of one completion, combined by a weighted sum.

    config.rl.reward = "exact_match"                    one rule
    config.rl.reward = "exact_match:1.0,format:0.1"     r = Σ_k w_k · r_k(completion)

A rule is registered as a factory `make(options) -> score(completion) -> float` (options:
config.rl.reward_options); a `Completion` is one sampled answer, decoded on the host:

    exact_match     1 if the reply (before <|end_of_turn|>) equals the reference answer and the
                    model ended it with <|end_of_turn|>, else 0 (lm/evals/exact_match.py's rule)
    format          1 if the reply ended with <|end_of_turn|>, is non-empty and has no special
                    token (a role marker, a second turn) before it, else 0
    char_fraction   the fraction of the reply's characters that are in options.chars (a task a
                    tiny model learns in a few steps: tests, smoke runs)
    markov          Σ_t g(x_t) over the reply's characters, g = lm/data/markov_reward.py's
                    symbol_rewards(S, seed=options.markov_seed, scale=options.markov_scale) over
                    data.markov.alphabet; a character outside the alphabet is an error

A rule that raises or returns a non-finite value is never silently scored 0: with
rl.on_reward_error = "raise" the run stops with an error naming the rule, the step and the
prompt; with "skip" the completion is dropped from the loss (mask 0, and its group's advantages
computed without it) and counted (metric rl/reward_skipped).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Completion:
    """One sampled answer to one prompt (host side)."""

    prompt: str  # the prompt, decoded
    reply: str  # the generated text before the first <|end_of_turn|> (all of it if none came)
    ended: bool  # an <|end_of_turn|> (or other stop token) closed the reply
    tokens: tuple[int, ...]  # the generated ids, stop token included
    answer: str  # the reference answer ("" when the task has none)
    has_special: bool = False  # the reply holds a special token id (role marker, bos, …)


Score = Callable[[Completion], float]


def _exact_match(options) -> Score:
    return lambda c: float(c.ended and c.reply == c.answer)


def _format(options) -> Score:
    return lambda c: float(c.ended and bool(c.reply) and not c.has_special)


def _char_fraction(options) -> Score:
    chars = set(options.chars)
    if not chars:
        raise ValueError("rl.reward_options.chars must name at least one character for the char_fraction reward")
    return lambda c: sum(ch in chars for ch in c.reply) / max(len(c.reply), 1)


def _markov(options) -> Score:
    from lm.data.markov_reward import symbol_rewards

    alphabet = options.alphabet
    gains = symbol_rewards(len(alphabet), seed=options.markov_seed, scale=options.markov_scale)
    index = {ch: i for i, ch in enumerate(alphabet)}

    def score(c: Completion) -> float:
        bad = [ch for ch in c.reply if ch not in index]
        if bad:
            raise ValueError(f"character {bad[0]!r} is not in the Markov alphabet {alphabet!r}")
        return float(sum(gains[index[ch]] for ch in c.reply))

    return score


REWARDS: dict[str, Callable[[Any], Score]] = {
    "exact_match": _exact_match, "format": _format, "char_fraction": _char_fraction, "markov": _markov}
ON_ERROR = ("raise", "skip")


def parse(spec: str) -> list[tuple[str, float]]:
    """'exact_match:1,format:0.1' → [('exact_match', 1.0), ('format', 0.1)]; clear errors."""
    terms = []
    for part in str(spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, _, weight = part.partition(":")
        name = name.strip()
        if name not in REWARDS:
            raise ValueError(f"rl.reward: unknown rule {name!r} in {spec!r}; known: {sorted(REWARDS)}")
        try:
            terms.append((name, float(weight) if weight.strip() else 1.0))
        except ValueError:
            raise ValueError(f"rl.reward: the weight of {name!r} in {spec!r} is not a number: {weight!r}") from None
    if not terms:
        raise ValueError(f"rl.reward names no rule: {spec!r}; known: {sorted(REWARDS)}")
    return terms


class RuleReward:
    """The weighted sum of rules of `spec`; `__call__(completions, step)` → (rewards [n] float32,
    valid [n] bool). Invalid entries (on_error='skip') hold NaN-free placeholders (0)."""

    def __init__(self, spec: str, options: Any, on_error: str = "raise"):
        if on_error not in ON_ERROR:
            raise ValueError(f"rl.on_reward_error must be one of {ON_ERROR}, got {on_error!r}")
        self.terms = [(name, weight, REWARDS[name](options)) for name, weight in parse(spec)]
        self.on_error = on_error
        self.skipped = 0  # completions skipped so far (on_error='skip')

    def __call__(self, completions: list[Completion], step: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        rewards = np.zeros(len(completions), np.float32)
        valid = np.ones(len(completions), bool)
        for i, c in enumerate(completions):
            total = 0.0
            for name, weight, score in self.terms:
                try:
                    value = float(score(c))
                    problem = None if math.isfinite(value) else f"returned {value}"
                except Exception as e:  # a broken rule is reported, never scored 0
                    problem = f"raised {type(e).__name__}: {e}"
                if problem is not None:
                    where = f"step {step}, " if step is not None else ""
                    message = (f"reward {name!r} {problem} ({where}completion {i}: prompt {c.prompt[-80:]!r}, "
                               f"reply {c.reply[:80]!r})")
                    if self.on_error == "raise":
                        raise FloatingPointError(message) if "returned" in problem else RuntimeError(message)
                    valid[i] = False
                    self.skipped += 1
                    break
                total += weight * value
            rewards[i] = total if valid[i] else 0.0
        return rewards, valid


def decode_completions(tokenizer: Any, prompts: np.ndarray, prompt_lengths: np.ndarray, tokens: np.ndarray,
                       answers: np.ndarray, answer_lengths: np.ndarray, stop_ids: tuple[int, ...]) -> list[Completion]:
    """Numpy rollout rows → Completions. prompts [n, P] left-padded; tokens [n, N] (−1 after the
    stop); answers [n, A] (−1 padded)."""
    special = set((getattr(tokenizer, "special_ids", None) or {}).values())
    out = []
    for r in range(tokens.shape[0]):
        generated = [int(t) for t in tokens[r] if t >= 0]
        ended = bool(generated) and generated[-1] in stop_ids
        body = generated[:-1] if ended else generated
        prompt = prompts[r, prompts.shape[1] - int(prompt_lengths[r]):]
        out.append(Completion(prompt=tokenizer.decode(prompt.tolist()),
                              reply=tokenizer.decode(body, skip_special=False), ended=ended,
                              tokens=tuple(generated),
                              answer=tokenizer.decode(answers[r, :int(answer_lengths[r])].tolist()),
                              has_special=any(t in special for t in body)))
    return out
