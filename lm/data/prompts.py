"""Prompt batches for RL: what the policy is asked, and what a rule reward checks its answer against.

A prompt source has `example(i) -> {'messages': [..., final assistant message], 'answer': str}`
(the synthetic chat sources, lm/data/synthetic.py) or `example(i) -> {'prompt': [token ids],
'answer': str}` (already rendered prompts, e.g. the Markov reward task). The prompt of a chat
example is its conversation without the final answer, ending with <|assistant|>
(chat.render_prompt); the policy's completion is the answer it writes.

A batch (numpy, this process's rows) is

    prompt          [n, P] int32   LEFT-padded with pad id 0 (lm.sampling's layout)
    prompt_lengths  [n]    int32   real tokens per prompt
    answer          [n, A] int32   the reference answer's token ids, −1 after its end
    answer_lengths  [n]    int32

Example indices run 0, 1, 2, … over the global batch, this process taking its block of every
step's rows, so the prompts of a step do not depend on how many processes read them; the state
is the next index (checkpointed with the run, resumed exactly). A prompt longer than P or an
answer longer than A is an error naming the example: an RL config sizes P and A for its task.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lm.data import chat


class PromptIterator:
    """Endless, checkpointable prompt batches of `source` (see the module docstring)."""

    def __init__(self, source: Any, tokenizer: Any, *, batch_size: int, prompt_len: int, answer_len: int,
                 process_index: int = 0, process_count: int = 1, name: str = "prompts"):
        if batch_size < 1 or prompt_len < 1 or answer_len < 1:
            raise ValueError(f"{name}: batch_size, prompt_len and answer_len must be >= 1, got "
                             f"{batch_size}, {prompt_len}, {answer_len}")
        self.source, self.tokenizer, self.name = source, tokenizer, name
        self.batch_size, self.prompt_len, self.answer_len = batch_size, prompt_len, answer_len
        self.process_index, self.process_count = process_index, process_count
        self._next = 0  # first example index of the next global batch

    def __iter__(self) -> "PromptIterator":
        return self

    def prompt_ids(self, example: dict) -> np.ndarray:
        if "prompt" in example:
            return np.asarray(example["prompt"], np.int32)
        return chat.render_prompt(example["messages"][:-1], self.tokenizer)

    def rows(self, indices) -> dict[str, np.ndarray]:
        """The batch of examples `indices` (also used by evaluations)."""
        n = len(indices)
        out = {"prompt": np.zeros((n, self.prompt_len), np.int32), "prompt_lengths": np.zeros((n,), np.int32),
               "answer": np.full((n, self.answer_len), -1, np.int32), "answer_lengths": np.zeros((n,), np.int32)}
        for r, i in enumerate(indices):
            example = self.source.example(int(i))
            prompt = self.prompt_ids(example)
            answer = np.asarray(self.tokenizer.encode(example.get("answer", "")), np.int32)
            if len(prompt) > self.prompt_len:
                raise ValueError(f"{self.name}: example {i} has a {len(prompt)}-token prompt, longer than the "
                                 f"{self.prompt_len} the config allows (train.seq_len − rl.max_new_tokens); "
                                 "raise train.seq_len or use shorter conversations")
            if len(answer) > self.answer_len:
                raise ValueError(f"{self.name}: example {i} has a {len(answer)}-token answer, longer than "
                                 f"rl.max_answer_tokens={self.answer_len}")
            out["prompt"][r, self.prompt_len - len(prompt):] = prompt
            out["prompt_lengths"][r] = len(prompt)
            out["answer"][r, :len(answer)] = answer
            out["answer_lengths"][r] = len(answer)
        return out

    def __next__(self) -> dict[str, np.ndarray]:
        start = self._next + self.process_index * self.batch_size
        self._next += self.batch_size * self.process_count
        return self.rows(range(start, start + self.batch_size))

    def get_state(self) -> dict[str, int]:
        return {"next_index": self._next}

    def set_state(self, state: dict[str, int]) -> None:
        self._next = int(state["next_index"])


class MarkovPrompts:
    """Prompts of the Markov reward task (lm/data/markov_reward.py): example i is the `order`
    characters of a start state drawn from the chain's stationary distribution (seeded by
    (seed, split, i)); the completion continues the chain. `example(i)` → {'prompt': token ids
    (one byte token per character), 'answer': '', 'start_state': s}."""

    def __init__(self, markov_cfg: Any, split: str, *, seed: int):
        from lm.data.markov import MarkovSource

        self.source = MarkovSource(alphabet=markov_cfg.alphabet, order=markov_cfg.order,
                                   concentration=markov_cfg.concentration, seed=markov_cfg.seed)
        self.split_key = {"train": 0, "valid": 1}[split]
        self.seed = seed

    def start_state(self, i: int) -> int:
        from lm.data.markov_reward import draw_start_states

        return int(draw_start_states(self.source.stationary, 1, seed=[self.seed, self.split_key, int(i)])[0])

    def example(self, i: int) -> dict:
        s, k, n = self.start_state(i), self.source.order, self.source.num_symbols
        digits = [(s // n**(k - 1 - j)) % n for j in range(k)]  # base-S digits, oldest first
        return {"prompt": [ord(self.source.alphabet[d]) for d in digits], "answer": "", "start_state": s}
