"""Preference data: pairs of answers to one prompt, the first preferred, as [B, T] pair batches.

A *pair document* is ``{'chosen': doc, 'rejected': doc}``, each doc ``{'tokens': [n],
'weights': [n]}`` as in sources.py: the prompt followed by one answer, weights 1 on the answer
(and the token that closes it), 0 on the prompt. A pair batch (lm/data/batch.py, kind
'preference') holds one pair per row, never packed: row b of ``chosen`` and row b of
``rejected`` are the two answers to the same prompt, each right-padded to T (segment id 1 on
the ``n − 1`` real pairs, 0 on padding, positions 0..n−2).

Sources (config ``data.source``; fields in configs/data.py):

  markov_preference   the known-optimum benchmark of lm/data/markov_reward.py: a prompt of
                      ``prompt_len`` characters of the stationary chain (data.markov), two
                      continuations of ``horizon`` characters from the chain itself, labelled by
                      Bradley–Terry with the true reward r(x) = Σ_t g(x_t). A fixed set of
                      ``num_pairs`` train pairs (and ``num_valid_pairs`` valid pairs, disjoint
                      seeds), so that the data budget is a knob. Character i is the byte token
                      ``ord(alphabet[i])``. With ``end_with_eos`` each answer ends with a scored
                      <|eos|>: a reward model reads the hidden state at the last scored token,
                      whose input is then the answer's last character (without it, the score
                      never sees that character). DPO leaves it off (π would get a free,
                      sequence-dependent extra action that the benchmark's J does not have).
  preference_jsonl    JSONL, one pair per line, TRL's field names: ``prompt``, ``chosen``,
                      ``rejected``. Either all three are text (standard format), or ``prompt`` is
                      a list of chat messages and ``chosen`` / ``rejected`` are lists of
                      assistant messages (conversational format); without ``prompt``,
                      ``chosen`` / ``rejected`` are whole conversations whose common leading
                      messages are the prompt (TRL's implicit prompt). Text is rendered with the
                      chat template as one user turn and one assistant turn
                      (``text_format='chat'``) or concatenated as is (``'plain'``: bos, prompt,
                      answer, eos). Only the answer is scored (assistant-only mask, lm/data/chat.py).

Bad rows raise ``BadRecord`` naming ``path:line`` (the pipeline raises ``DataError`` or skips
and counts them, per ``data.on_error``): not JSON, a missing field ('missing_field'), a field of
the wrong type, an empty answer or prompt ('empty_document'), chosen equal to rejected
('identical_answers'), and a pair whose longer side does not fit one row of ``seq_len``
(``conversation_too_long``: answers are never truncated).

The pipeline (`make_pair_dataset`): record indices → this process's shard → (train) a fresh
permutation every epoch → read one pair → `PairBatchDataset` (B pairs per batch, bad records
counted in '_errors'). Deterministic, resumable (the iterator state is the parent's between
batches) and sharded like the token pipeline (pipeline.py).
"""

from __future__ import annotations

import json
from typing import Any

import grain
import numpy as np

from lm.data import batch as contract
from lm.data import chat
from lm.data.errors import ERROR_INDEX, BadRecord, DataError, zero_counts
from lm.data.markov import MarkovSource
from lm.data.markov_reward import MarkovReward, state_of
from lm.data.sources import FileSource

TEXT_FORMATS = ('chat', 'plain')
IDENTICAL = 'identical_answers'


# -- rows and batches ---------------------------------------------------------------------------------


def pair_row(doc: dict, seq_len: int, pad_id: int) -> dict:
    """One document ({'tokens' [n], 'weights' [n]}, n − 1 <= seq_len) → one right-padded row of
    the batch contract: dict of [T] arrays."""
    tokens, weights = doc['tokens'], doc['weights']
    n = len(tokens) - 1
    fields = {**contract.FIELDS, **(contract.REFERENCE_FIELD if 'ref_logprobs' in doc else {})}
    row = {key: np.zeros(seq_len, dtype) for key, dtype in fields.items()}
    if 'ref_logprobs' in doc:  # log π_ref of each token given the ones before it: aligned with targets
        row['ref_logprobs'][:n] = doc['ref_logprobs'][1:]
    row['inputs'][:] = row['targets'][:] = pad_id
    row['inputs'][:n], row['targets'][:n] = tokens[:-1], tokens[1:]
    row['loss_mask'][:n] = weights[1:]
    row['segment_ids'][:n] = 1
    row['positions'][:n] = np.arange(n)
    return row


def empty_pair_batch(batch_size: int, seq_len: int, pad_id: int, kind: str = 'preference') -> dict:
    """All-padding pair batch of `kind` (loss_mask 0, segment_ids 0): [B, T] leaves."""
    out = contract.spec(kind, batch_size, seq_len)
    for side in contract.PAIR:
        out[side]['inputs'][:] = out[side]['targets'][:] = pad_id
    return out


def check_pair(pair: dict, where: str, max_tokens: int | None) -> dict:
    """BadRecord for identical answers or a side longer than `max_tokens` tokens; else `pair`."""
    c, r = pair['chosen'], pair['rejected']
    if len(c['tokens']) == len(r['tokens']) and np.array_equal(c['tokens'], r['tokens']):
        raise BadRecord(IDENTICAL, where, 'chosen and rejected are the same answer: nothing to prefer')
    longest = max(len(c['tokens']), len(r['tokens']))
    if max_tokens is not None and longest > max_tokens:
        raise BadRecord('conversation_too_long', where, f'{longest} tokens do not fit a row of {max_tokens} '
                        '(seq_len + 1); preference answers are never truncated')
    return pair


class PairBatchIterator(grain.DatasetIterator):
    """B pairs per batch from a parent yielding pair documents or {'error': kind_index} markers.
    A finite parent ends with a padded partial batch. State: the parent's (between batches)."""

    def __init__(self, parent, *, batch_size: int, seq_len: int, pad_id: int, kind: str = 'preference'):
        super().__init__(parent)
        self._b, self._t, self._pad, self._kind = batch_size, seq_len, pad_id, kind
        self._exhausted = False

    def __next__(self) -> dict:
        if self._exhausted:
            raise StopIteration
        out = empty_pair_batch(self._b, self._t, self._pad, self._kind)
        errors, row = zero_counts(), 0
        while row < self._b:
            try:
                item = next(self._parent)
            except StopIteration:
                self._exhausted = True
                if row == 0 and not errors.any():
                    raise
                break
            if 'error' in item:
                errors[item['error']] += 1
                continue
            for side in contract.PAIR:
                for key, value in pair_row(item[side], self._t, self._pad).items():
                    out[side][key][row] = value
            row += 1
        out['_errors'] = errors
        return out

    def get_state(self) -> dict:
        return {'parent': self._parent.get_state(), 'exhausted': self._exhausted}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state['parent'])
        self._exhausted = bool(state['exhausted'])


class PairBatchDataset(grain.IterDataset):
    def __init__(self, parent, **kwargs):
        super().__init__(parent)
        self._kwargs = kwargs

    def __iter__(self):
        return PairBatchIterator(self._parent.__iter__(), **self._kwargs)


def _load_pair(source, on_error: str, index) -> dict:
    try:
        return source.document(int(index))
    except BadRecord as e:
        if on_error == 'raise':
            raise DataError(f"{e} (set data.on_error='skip' to skip and count such records)") from None
        return {'error': ERROR_INDEX[e.kind]}


def make_pair_dataset(source, *, split: str, batch_size: int, seq_len: int, seed: int, process_index: int,
                      process_count: int, on_error: str, pad_id: int, **_) -> grain.IterDataset:
    """grain IterDataset of pair batches ({'chosen', 'rejected'} of [B, T] plus '_errors')."""
    from lm.data.pipeline import EpochShuffleMapDataset

    ds = grain.MapDataset.range(len(source))[process_index::process_count]
    if len(source) == 0 or (len(ds) == 0 and split == 'train'):
        raise ValueError(f'the {split!r} split has no preference pairs for process {process_index} of '
                         f'{process_count} ({len(source)} in all)')
    if split == 'train':
        ds = EpochShuffleMapDataset(ds, seed)
    ds = ds.map(lambda i: _load_pair(source, on_error, i))
    return PairBatchDataset(ds.to_iter_dataset(), batch_size=batch_size, seq_len=seq_len, pad_id=pad_id,
                            kind=batch_kind(source))


def batch_kind(source) -> str:
    """'preference_ref' for a source whose documents carry reference log-probabilities, else 'preference'."""
    return 'preference_ref' if getattr(source, 'ref_logprobs', False) else 'preference'


# -- the Markov benchmark ---------------------------------------------------------------------------


def markov_benchmark(data_cfg) -> tuple[MarkovSource, MarkovReward]:
    """The chain of data.markov and the reward benchmark of data.markov_preference on it."""
    m, p = data_cfg.markov, data_cfg.markov_preference
    chain = MarkovSource(alphabet=m.alphabet, order=m.order, concentration=m.concentration, seed=m.seed)
    return chain, MarkovReward.from_source(chain, horizon=p.horizon, reward_scale=p.reward_scale, seed=p.reward_seed)


def markov_prompts(chain: MarkovSource, num: int, length: int, *, seed) -> np.ndarray:
    """[num, length] character indices: windows of the stationary chain (first `order` from π)."""
    rng = np.random.default_rng(seed)
    s, k = chain.num_symbols, chain.order
    state = rng.choice(chain.num_states, size=num, p=chain.stationary)
    out = np.empty((num, length), np.int64)
    for j in range(k):
        out[:, j] = (state // s ** (k - 1 - j)) % s
    cum = np.cumsum(chain.transitions, axis=1)
    for t in range(k, length):
        sym = np.minimum((cum[state] <= rng.random(num)[:, None]).sum(axis=1), s - 1)
        out[:, t], state = sym, (state * s + sym) % chain.num_states
    return out


class MarkovPreference:
    """Pairs of the Markov reward benchmark (module docstring): a fixed, finite set per split.

    Attributes (numpy): prompts [M, P], start_states [M], pairs (markov_reward.PreferencePairs).
    """

    unbounded = False

    def __init__(self, cfg, split: str, tokenizer, *, seq_len: int, markov=None, **_):
        if tokenizer.kind != 'byte':
            raise ValueError("data.source='markov_preference' lays one character per token; it needs "
                             f"data.tokenizer='byte', got {tokenizer.kind!r}")
        self.chain = MarkovSource(alphabet=markov.alphabet, order=markov.order,
                                  concentration=markov.concentration, seed=markov.seed)
        self.bench = MarkovReward.from_source(self.chain, horizon=cfg.horizon, reward_scale=cfg.reward_scale,
                                              seed=cfg.reward_seed)
        if cfg.prompt_len < self.chain.order:
            raise ValueError(f'data.markov_preference.prompt_len={cfg.prompt_len} must be >= the chain order '
                             f'{self.chain.order} (the prompt fixes the start state)')
        self.end = [tokenizer.eos_id] if cfg.end_with_eos else []
        row = cfg.prompt_len + cfg.horizon + len(self.end) - 1
        if row > seq_len:
            raise ValueError(f'a Markov preference row needs prompt_len + horizon (+ 1 with end_with_eos) - 1 = '
                             f'{row} <= seq_len={seq_len}')
        num = cfg.num_pairs if split == 'train' else cfg.num_valid_pairs
        data_seed = [int(cfg.pair_seed), 0 if split == 'train' else 1]
        self.prompts = markov_prompts(self.chain, num, cfg.prompt_len, seed=data_seed + [0])
        k, s = self.chain.order, self.chain.num_symbols
        self.start_states = np.array([state_of(p, order=k, num_symbols=s) for p in self.prompts], np.int64)
        self.pairs = self.bench.preference_pairs(self.start_states, seed=data_seed + [1])
        self.alphabet_ids = tokenizer.encode_array(markov.alphabet).astype(np.int32)
        self.ref_logprobs = bool(cfg.ref_logprobs)
        if self.ref_logprobs and cfg.end_with_eos:
            raise ValueError('data.markov_preference.ref_logprobs: the chain gives no probability to <|eos|>; '
                             'turn end_with_eos off')
        self._chosen, self._rejected = self.pairs.chosen, self.pairs.rejected
        self._weights = np.concatenate([np.zeros(cfg.prompt_len), np.ones(cfg.horizon + len(self.end))]).astype(np.float32)

    def __len__(self) -> int:
        return len(self.prompts)

    def tokens(self, prompts: np.ndarray, answers: np.ndarray) -> np.ndarray:
        """[M, P] and [M, N] character indices → [M, P + N] token ids (+ <|eos|> with end_with_eos)."""
        tokens = self.alphabet_ids[np.concatenate([prompts, answers], axis=1)]
        return np.concatenate([tokens, np.full((len(tokens), len(self.end)), self.end, np.int32)], axis=1)

    def document(self, i: int) -> dict:
        prompt = self.prompts[i:i + 1]
        out = {side: {'tokens': self.tokens(prompt, answers[i:i + 1])[0], 'weights': self._weights}
               for side, answers in (('chosen', self._chosen), ('rejected', self._rejected))}
        if self.ref_logprobs:  # the chain's log P(x_t | state) of each answer character, 0 on the prompt
            for side, answers in (('chosen', self._chosen), ('rejected', self._rejected)):
                out[side]['ref_logprobs'] = np.concatenate([np.zeros(self.prompts.shape[1]), self.bench.token_logprobs(
                    answers[i:i + 1], self.start_states[i:i + 1])[0]]).astype(np.float32)
        return out


# -- JSONL ------------------------------------------------------------------------------------------


def _messages(value: Any, field: str, where: str) -> list[dict]:
    if not isinstance(value, list):
        raise BadRecord('wrong_type', where, f'{field!r} must be a list of messages here, got {type(value).__name__}')
    return value


def _text(record: dict, field: str, where: str) -> str:
    value = record[field]
    if not isinstance(value, str):
        raise BadRecord('wrong_type', where, f'{field!r} must be a string or a list of messages, '
                        f'got {type(value).__name__}')
    if not value.strip():
        raise BadRecord('empty_document', where, f'{field!r} is empty')
    return value


class PreferenceJsonl(FileSource):
    """JSONL pairs with TRL's field names (module docstring)."""

    unit = 'jsonl'

    def __init__(self, cfg, split, tokenizer, *, seq_len: int | None = None, **kw):
        if cfg.text_format not in TEXT_FORMATS:
            raise ValueError(f'data.preference_jsonl.text_format must be one of {TEXT_FORMATS}, '
                             f'got {cfg.text_format!r}')
        self.fields = (cfg.prompt_field, cfg.chosen_field, cfg.rejected_field)
        self.text_format = cfg.text_format
        self.max_tokens = None if seq_len is None else seq_len + 1
        super().__init__(cfg, split, tokenizer, **kw)

    def _parse(self, raw: bytes, where: str) -> dict:
        record = self._json(raw, where)
        prompt_f, chosen_f, rejected_f = self.fields
        for field in (chosen_f, rejected_f):
            if field not in record:
                raise BadRecord('missing_field', where, f'no {field!r} field (fields: {sorted(record)[:8]})')
        conversational = isinstance(record[chosen_f], list)
        if conversational:
            chosen, rejected = (_messages(record[f], f, where) for f in (chosen_f, rejected_f))
            if prompt_f in record:
                prompt = _messages(record[prompt_f], prompt_f, where)
            else:  # implicit prompt: the leading messages both conversations share
                n = 0
                while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
                    n += 1
                prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
            pair = {side: self._render_chat(prompt, answer, f, where)
                    for side, answer, f in (('chosen', chosen, chosen_f), ('rejected', rejected, rejected_f))}
        else:
            if prompt_f not in record:
                raise BadRecord('missing_field', where, f'no {prompt_f!r} field (fields: {sorted(record)[:8]})')
            prompt = _text(record, prompt_f, where)
            pair = {side: self._render_text(prompt, _text(record, f, where), where)
                    for side, f in (('chosen', chosen_f), ('rejected', rejected_f))}
        return check_pair(pair, where, self.max_tokens)

    def _render_chat(self, prompt: list, answer: list, field: str, where: str) -> dict:
        if not answer:
            raise BadRecord('empty_document', where, f'{field!r} has no answer messages')
        if any(not isinstance(m, dict) or m.get('role') != 'assistant' for m in answer):
            raise BadRecord('wrong_type', where, f'{field!r} must hold assistant messages after the prompt')
        if not prompt:
            raise BadRecord('empty_document', where, 'no prompt: give a "prompt" field or conversations '
                            'that share their leading messages')
        out = chat.render_conversation(list(prompt) + list(answer), self.tokenizer, loss_policy='assistant_only',
                                       add_bos=self.add_bos, where=where)
        weights = out.weights.copy()
        weights[:chat_prefix_length(prompt, self.tokenizer, self.add_bos)] = 0.0  # prompt answers are context
        return {'tokens': out.tokens, 'weights': weights}

    def _render_text(self, prompt: str, answer: str, where: str) -> dict:
        if self.text_format == 'chat':
            return self._render_chat([{'role': 'user', 'content': prompt}],
                                     [{'role': 'assistant', 'content': answer}], 'answer', where)
        tok = self.tokenizer
        head = ([tok.bos_id] if self.add_bos else []) + list(tok.encode(prompt))
        tail = list(tok.encode(answer)) + ([tok.eos_id] if self.add_eos else [])
        tokens = np.array(head + tail, np.int32)
        weights = np.concatenate([np.zeros(len(head)), np.ones(len(tail))]).astype(np.float32)
        return {'tokens': tokens, 'weights': weights}


def chat_prefix_length(prompt: list, tokenizer, add_bos: bool) -> int:
    """Tokens of the rendered prompt messages (bos included)."""
    return len(chat.render_conversation(prompt, tokenizer, loss_policy='all', add_bos=add_bos).tokens)
