"""Synthetic sources with known answers, behind the same interface as sources.py.

  MarkovDocs     the known-entropy Markov chain of lm/data/markov.py; one document of
                 seq_len+1 characters per row, nothing added, every target scored.
  CopyDocs       copy / induction: `P = T//2` random characters, a separator, then the
                 prefix again (cyclically, to fill the row). Past the separator every
                 token is predictable, but only by attending back to the prefix.
  ArithmeticChat multi-digit arithmetic as chat: varied phrasings, exact answers; the valid
                 split holds problems (and phrasings) that the train split never shows.

Synthetic sources are unbounded: document i of split s under seed k is a pure function of
(s, k, i). Train documents use key ((k mod 2^31) * 2) * 2^40 + i; valid documents use key
2^40 + i for every seed, so the valid set is the same across runs and disjoint from train.
"""

from __future__ import annotations

import math

import numpy as np

from lm.data import chat
from lm.data.markov import MarkovSource

KEY_BITS = 40
NUM_DOCUMENTS = 1 << KEY_BITS  # documents per split, effectively unbounded


def document_key(split: str, seed: int, index: int) -> int:
    """Unique non-negative int for (split, seed, index); see the module docstring."""
    if split == 'valid':
        return (1 << KEY_BITS) + index
    return (((seed % (1 << 31)) * 2) << KEY_BITS) + index


def _splitmix64(x: int) -> int:
    mask = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def _require_byte(tokenizer, source: str):
    if tokenizer.kind != 'byte':
        raise ValueError(f"data.source={source!r} lays one character per token; it needs "
                         f"data.tokenizer='byte', got a {tokenizer.kind!r} tokenizer")


def markov_symbols(chain: MarkovSource, keys: list[int], length: int) -> np.ndarray:
    """[len(keys), length] int64 symbol indices: row j equals chain.document(keys[j], length)
    (same uniforms, same inverse-CDF comparisons), vectorized across the rows."""
    s, k, n = chain.num_symbols, chain.order, chain.num_states
    u = np.stack([np.random.default_rng([int(key), 0x6D61726B]).random(length + 1) for key in keys])
    cum_stationary = np.cumsum(chain.stationary)
    cum_transitions = np.cumsum(chain.transitions, axis=1)  # [n, S], row-wise as in markov.py
    state = np.minimum(np.searchsorted(cum_stationary, u[:, 0], side='right'), n - 1)
    out = np.empty((len(keys), max(length, k)), np.int64)
    for j in range(k):  # the first k symbols are the base-S digits of the initial state
        out[:, j] = (state // s ** (k - 1 - j)) % s
    for t in range(k, length):
        symbol = np.minimum((cum_transitions[state] <= u[:, t + 1 - k, None]).sum(axis=1), s - 1)
        out[:, t] = symbol
        state = (state * s + symbol) % n
    return out[:, :length]


class MarkovDocs:
    """Rows of the stationary Markov chain: tokens [T+1], weights all 1."""

    unbounded = True

    def __init__(self, cfg, split: str, tokenizer, *, seed: int, seq_len: int, **_):
        _require_byte(tokenizer, 'markov')
        self.chain = MarkovSource(alphabet=cfg.alphabet, order=cfg.order,
                                  concentration=cfg.concentration, seed=cfg.seed)
        self.tokenizer, self.split, self.seed, self.length = tokenizer, split, seed, seq_len + 1
        self.alphabet_ids = tokenizer.encode_array(cfg.alphabet)  # byte tokenizer: ASCII codes

    def __len__(self) -> int:
        return NUM_DOCUMENTS

    def document(self, i: int) -> dict:
        text = self.chain.document(document_key(self.split, self.seed, i), self.length)
        tokens = self.tokenizer.encode_array(text)
        return {'tokens': tokens, 'weights': np.ones(len(tokens), np.float32)}

    def documents(self, indices: list[int]) -> list[dict]:
        """Same documents as `document`, generated together: one numpy step per position for
        the whole group instead of one Python step per character per document."""
        keys = [document_key(self.split, self.seed, i) for i in indices]
        tokens = self.alphabet_ids[markov_symbols(self.chain, keys, self.length)]
        weights = np.ones(self.length, np.float32)
        return [{'tokens': row, 'weights': weights} for row in tokens]

    @staticmethod
    def bayes_optimal_ce(cfg, seq_len: int) -> float:
        """Mean over the T scored targets (tokens 1..T) of H(x_t | x_<t), nats."""
        chain = MarkovSource(alphabet=cfg.alphabet, order=cfg.order,
                             concentration=cfg.concentration, seed=cfg.seed)
        return float(np.mean(chain.target_entropies(seq_len + 1)[1:]))


class CopyDocs:
    """tokens [T+1] = prefix (P = T//2 uniform characters) + separator + copy (T - P)."""

    unbounded = True

    def __init__(self, cfg, split: str, tokenizer, *, seed: int, seq_len: int, **_):
        _require_byte(tokenizer, 'copy')
        if cfg.separator in cfg.alphabet or len(cfg.separator) != 1:
            raise ValueError('data.copy.separator must be one character outside the alphabet')
        if cfg.score not in ('all', 'copy'):
            raise ValueError(f"data.copy.score must be 'all' or 'copy', got {cfg.score!r}")
        if seq_len < 2:
            raise ValueError('the copy task needs seq_len >= 2')
        self.alphabet = np.frombuffer(cfg.alphabet.encode('ascii'), np.uint8).astype(np.int32)
        self.separator = ord(cfg.separator)
        self.score, self.split, self.seed = cfg.score, split, seed
        self.prefix_len = seq_len // 2
        self.length = seq_len + 1

    def __len__(self) -> int:
        return NUM_DOCUMENTS

    def document(self, i: int) -> dict:
        rng = np.random.default_rng([document_key(self.split, self.seed, i), 0xC0B1])
        prefix = self.alphabet[rng.integers(0, len(self.alphabet), self.prefix_len)]
        copy = prefix[np.arange(self.length - self.prefix_len - 1) % self.prefix_len]
        tokens = np.concatenate([prefix, [self.separator], copy]).astype(np.int32)
        weights = np.ones(self.length, np.float32)
        if self.score == 'copy':
            weights[:self.prefix_len + 1] = 0.0
        return {'tokens': tokens, 'weights': weights}

    @staticmethod
    def bayes_optimal_ce(cfg, seq_len: int) -> float:
        """'all': (P - 1) log|A| / T (prefix targets 1..P-1 uniform, the rest determined);
        'copy': 0 (only copied tokens are scored)."""
        if cfg.score == 'copy':
            return 0.0
        return (seq_len // 2 - 1) * math.log(len(cfg.alphabet)) / seq_len


_OPERATIONS = {'+': (lambda a, b: a + b, ('+', 'plus')),
               '-': (lambda a, b: a - b, ('-', 'minus')),
               '*': (lambda a, b: a * b, ('*', 'times', 'x'))}
# The last `num_heldout_templates` appear only in the valid split.
_TEMPLATES = (
    'What is {a} {op} {b}?',
    'Compute {a} {op} {b}.',
    '{a} {op} {b} = ?',
    'Calculate {a} {op} {b}',
    'Please work out {a} {op} {b}.',
    'What do you get for {a} {op} {b}?',
    'Evaluate: {a} {op} {b}',
    'Find the value of {a} {op} {b}.',
    'I need {a} {op} {b}, quickly.',
    'Quick question: {a} {op} {b}?',
    'How much is {a} {op} {b}?',
    'Tell me the result of {a} {op} {b}.',
)
_SYSTEM_PROMPTS = ('You are a calculator. Reply with the number only.',
                   'Answer arithmetic questions with the exact result.')


class _SyntheticChat:
    """What the synthetic chat sources share: rendering settings, size, `document(i)`.
    A subclass sets `name` and defines `example(i) -> {'messages': ...}`."""

    unbounded = True
    name = ''

    def _set_rendering(self, split: str, seed: int, tokenizer, loss_policy: str, add_bos: bool,
                       seq_len: int | None, chat_overflow: str) -> None:
        self.split, self.seed, self.tokenizer = split, seed, tokenizer
        self.loss_policy, self.add_bos, self.overflow = loss_policy, add_bos, chat_overflow
        self.max_tokens = None if seq_len is None else seq_len + 1  # one packed row

    def __len__(self) -> int:
        return NUM_DOCUMENTS

    def document(self, i: int) -> dict:
        """{'tokens', 'weights'} (chat.py) and 'dropped_messages' (history cut to fit a row)."""
        out = chat.render_conversation(self.example(i)['messages'], self.tokenizer,
                                       loss_policy=self.loss_policy, add_bos=self.add_bos,
                                       max_tokens=self.max_tokens, overflow=self.overflow,
                                       where=f'{self.name}:{self.split}:{i}')
        return {'tokens': out.tokens, 'weights': out.weights, 'dropped_messages': out.dropped_messages}


class ArithmeticChat(_SyntheticChat):
    """Chat documents: [system?] then 1..max_turns exchanges, each a user asking `a op b` (in one
    of several phrasings) and the assistant answering the exact number. Every problem of a
    valid conversation is held out (never in train), and so are the last phrasings."""

    name = 'arithmetic_chat'

    def __init__(self, cfg, split: str, tokenizer, *, seed: int, loss_policy: str,
                 add_bos: bool = True, seq_len: int | None = None,
                 chat_overflow: str = 'none', **_):
        unknown = set(cfg.operations) - set(_OPERATIONS)
        if unknown or not cfg.operations:
            raise ValueError(f'data.arithmetic_chat.operations must be from {sorted(_OPERATIONS)}')
        if not 0 < cfg.valid_fraction < 1:
            raise ValueError('data.arithmetic_chat.valid_fraction must be in (0, 1)')
        if not 0 <= cfg.num_heldout_templates < len(_TEMPLATES):
            raise ValueError(f'data.arithmetic_chat.num_heldout_templates must be < {len(_TEMPLATES)}')
        self.max_turns = int(cfg.get('max_turns', 1))
        if self.max_turns < 1:
            raise ValueError(f'data.arithmetic_chat.max_turns must be >= 1, got {self.max_turns}')
        self._set_rendering(split, seed, tokenizer, loss_policy, add_bos, seq_len, chat_overflow)
        self.operations, self.max_digits = str(cfg.operations), int(cfg.max_digits)
        self.valid_fraction, self.system_prompt_prob = cfg.valid_fraction, cfg.system_prompt_prob
        num_train_templates = len(_TEMPLATES) - cfg.num_heldout_templates
        self.templates = _TEMPLATES if split == 'valid' else _TEMPLATES[:num_train_templates]

    def is_heldout(self, op: str, a: int, b: int) -> bool:
        """Whether problem (op, a, b) belongs to the valid split (seed-independent)."""
        scale = 10 ** self.max_digits
        code = ('+-*'.index(op) * scale + a) * scale + b
        return _splitmix64(code) / 2.0**64 < self.valid_fraction

    def _operand(self, u_digits: float, u_value: float) -> int:
        """1..max_digits digits (uniform), then a uniform number with that many digits."""
        digits = 1 + int(u_digits * self.max_digits)
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return low + int(u_value * (10 ** digits - low))

    def _exchange(self, uniform) -> tuple[tuple[str, int, int], str, str, list[float]]:
        """((op, a, b), question, answer, 2 spare uniforms) from a stream of uniforms j -> [0, 1)."""
        want_heldout, j = self.split == 'valid', 0
        for j in range(0, 500_000, 5):  # rejection: a problem of this split
            op = self.operations[int(uniform(j) * len(self.operations))]
            a = self._operand(uniform(j + 1), uniform(j + 2))
            b = self._operand(uniform(j + 3), uniform(j + 4))
            if self.is_heldout(op, a, b) == want_heldout:
                break
        else:
            raise RuntimeError('arithmetic_chat: could not draw a problem for this split')
        u = [uniform(j + 5 + t) for t in range(4)]
        fn, words = _OPERATIONS[op]
        template = self.templates[int(u[0] * len(self.templates))]
        question = template.format(a=a, b=b, op=words[int(u[1] * len(words))])
        return (op, a, b), question, str(fn(a, b)), u[2:]

    def example(self, i: int) -> dict:
        """{'messages': [...], 'answer': str, 'problem': (op, a, b), 'problems': [...]} for
        document i; 'answer' and 'problem' are those of the last exchange."""
        key = document_key(self.split, self.seed, i) * 1_000_003  # uniforms: hash of (key, j)
        stream = (lambda k: (lambda j: _splitmix64(k + j) / 2.0**64))
        uniform = stream(key)
        turns = 1 + int(uniform(999_999) * self.max_turns) if self.max_turns > 1 else 1
        messages, problems = [], []
        for turn in range(turns):  # exchange 0 uses the document's own stream (as with 1 turn)
            turn_uniform = uniform if turn == 0 else stream(_splitmix64(key ^ (turn << 56)))
            problem, question, answer, spare = self._exchange(turn_uniform)
            if turn == 0 and spare[0] < self.system_prompt_prob:
                messages.append({'role': 'system',
                                 'content': _SYSTEM_PROMPTS[int(spare[1] * len(_SYSTEM_PROMPTS))]})
            messages += [{'role': 'user', 'content': question},
                         {'role': 'assistant', 'content': answer}]
            problems.append(problem)
        return {'messages': messages, 'answer': answer, 'problem': problems[-1], 'problems': problems}


_WORD_TASKS = {  # name: (answer function, phrasings). The last `num_heldout_templates` phrasings of
    # each task are valid-only; each of them reuses a frame ('Please ... {w}.', 'I need {w} ...')
    # that training shows with another task, so the request stays recognizable.
    'reverse': (lambda w: w[::-1], (
        'Reverse {w}.', 'Write {w} backwards.', 'What is {w} reversed?', 'Spell {w} backwards.',
        'Reverse the letters of {w}', '{w} reversed, please.', 'Can you write {w} backwards?',
        'I need {w} reversed.', 'Please reverse {w}.')),
    'upper': (lambda w: w.upper(), (
        'Uppercase {w}.', 'Write {w} in capitals.', 'What is {w} in uppercase?', 'Spell {w} in capitals.',
        'Capitalize the letters of {w}', 'I need {w} in uppercase.', 'Please uppercase {w}.',
        'Can you write {w} in capitals?', '{w} in capitals, please.')),
    'dashes': (lambda w: '-'.join(w), (
        'Dash {w}.', 'Write {w} with dashes.', 'Spell {w} with dashes.', 'Put dashes between the letters of {w}',
        '{w} with dashes, please.', 'Can you write {w} with dashes?', 'I need {w} with dashes.',
        'Please dash {w}.', 'What is {w} with dashes?')),
}
_WORD_SYSTEM_PROMPTS = ('You transform words. Reply with the result only.',
                        'Answer with the transformed word and nothing else.')

# The two phrasings of a word-chat answer under data.word_chat.sentence_prob > 0: the bare result
# ('cba') and a sentence around it ('It is cba.'); both are correct. The result of a task is letters
# and dashes only, so a reply reads back unambiguously (`parse_phrasing`).
BARE, SENTENCE = 'bare', 'sentence'
_SENTENCE_HEAD, _SENTENCE_TAIL = 'It is ', '.'


def phrase(result: str, phrasing: str) -> str:
    """The answer text of `result` in `phrasing` (BARE: 'cba'; SENTENCE: 'It is cba.')."""
    if phrasing == BARE:
        return result
    if phrasing == SENTENCE:
        return f'{_SENTENCE_HEAD}{result}{_SENTENCE_TAIL}'
    raise ValueError(f'unknown phrasing {phrasing!r}; known: {BARE!r}, {SENTENCE!r}')


def parse_phrasing(text: str) -> tuple[str, str]:
    """An answer text → (result, phrasing): 'It is cba.' → ('cba', SENTENCE), anything else →
    (text, BARE). The inverse of `phrase` on the results of the word tasks."""
    if (len(text) > len(_SENTENCE_HEAD) + len(_SENTENCE_TAIL) and text.startswith(_SENTENCE_HEAD)
            and text.endswith(_SENTENCE_TAIL)):
        return text[len(_SENTENCE_HEAD):-len(_SENTENCE_TAIL)], SENTENCE
    return text, BARE


class WordChat(_SyntheticChat):
    """Chat documents like ArithmeticChat's, about string transformations of a random word of
    distinct lowercase letters (reverse it, write it in capitals, spell it with dashes):
    [system?] then 1..max_turns exchanges. Every word of a valid conversation is held out of
    training (hashed, seed-independent), and so are the last phrasings of each task.

    With data.word_chat.sentence_prob = q > 0 each answer is written as a sentence ('It is cba.')
    with probability q and bare ('cba') otherwise (`phrase`), an independent coin per exchange:
    two correct phrasings of one result (q = 0.5: equally frequent, experiments/rlhf_nuance.py).
    q = 0 (the default) draws no coin and leaves every document as it was.

    The letters of a word are distinct, so that each letter of the answer can be found in the
    question by what it is (an induction head) rather than by counting positions: a small
    model then learns the task within minutes on a CPU."""

    name = 'word_chat'

    def __init__(self, cfg, split: str, tokenizer, *, seed: int, loss_policy: str,
                 add_bos: bool = True, seq_len: int | None = None, chat_overflow: str = 'none', **_):
        tasks = [t.strip() for t in str(cfg.tasks).split(',') if t.strip()]
        if not tasks or set(tasks) - set(_WORD_TASKS):
            raise ValueError(f'data.word_chat.tasks must be a comma-separated subset of {sorted(_WORD_TASKS)}')
        if not 1 <= cfg.min_letters <= cfg.max_letters <= min(len(set(cfg.alphabet)), 12):
            raise ValueError('data.word_chat needs 1 <= min_letters <= max_letters <= min(12, letters in alphabet)')
        if len(set(cfg.alphabet)) != len(cfg.alphabet):
            raise ValueError('data.word_chat.alphabet must not repeat a letter')
        if not 0 < cfg.valid_fraction < 1:
            raise ValueError('data.word_chat.valid_fraction must be in (0, 1)')
        phrasings = min(len(_WORD_TASKS[t][1]) for t in tasks)
        if not 0 <= cfg.num_heldout_templates < phrasings:
            raise ValueError(f'data.word_chat.num_heldout_templates must be < {phrasings}')
        if cfg.max_turns < 1:
            raise ValueError(f'data.word_chat.max_turns must be >= 1, got {cfg.max_turns}')
        self.sentence_prob = float(cfg.get('sentence_prob', 0.0))
        if not 0.0 <= self.sentence_prob <= 1.0:
            raise ValueError(f'data.word_chat.sentence_prob must be in [0, 1], got {self.sentence_prob}')
        self.tasks = tasks
        self._set_rendering(split, seed, tokenizer, loss_policy, add_bos, seq_len, chat_overflow)
        self.alphabet = str(cfg.alphabet)
        self.min_letters, self.max_letters, self.max_turns = int(cfg.min_letters), int(cfg.max_letters), int(cfg.max_turns)
        self.valid_fraction, self.system_prompt_prob = cfg.valid_fraction, cfg.system_prompt_prob
        self.heldout_templates = int(cfg.num_heldout_templates)

    def is_heldout(self, word: str) -> bool:
        """Whether `word` belongs to the valid split (seed-independent hash of its letters)."""
        code = int.from_bytes(word.encode(), 'little') * 0x100000001B3 + len(word)
        return _splitmix64(code) / 2.0**64 < self.valid_fraction

    def _templates(self, task: str) -> tuple[str, ...]:
        templates = _WORD_TASKS[task][1]
        cut = len(templates) - self.heldout_templates
        return templates if self.split == 'valid' else templates[:cut]

    def _exchange(self, uniform) -> tuple[tuple[str, str], str, str, list[float]]:
        """((task, word), question, answer, 2 spare uniforms) from a stream of uniforms."""
        want_heldout, j = self.split == 'valid', 0
        span = self.max_letters - self.min_letters + 1
        for j in range(0, 500_000, 16):  # rejection: a word of this split
            n = self.min_letters + int(uniform(j) * span)
            letters = list(self.alphabet)  # n distinct letters (a partial Fisher-Yates shuffle)
            for k in range(n):
                pick = k + int(uniform(j + 1 + k) * (len(letters) - k))
                letters[k], letters[pick] = letters[pick], letters[k]
            word = ''.join(letters[:n])
            if self.is_heldout(word) == want_heldout:
                break
        else:
            raise RuntimeError('word_chat: could not draw a word for this split')
        u = [uniform(j + 13 + t) for t in range(5)]
        task = self.tasks[int(u[0] * len(self.tasks))]
        templates = self._templates(task)
        question = templates[int(u[1] * len(templates))].format(w=word)
        answer = _WORD_TASKS[task][0](word)
        if self.sentence_prob > 0:  # u[4] is drawn for nothing else: documents with q = 0 are unchanged
            answer = phrase(answer, SENTENCE if u[4] < self.sentence_prob else BARE)
        return (task, word), question, answer, u[2:4]

    def example(self, i: int) -> dict:
        """{'messages', 'answer', 'problem': (task, word), 'problems'}: as ArithmeticChat.example."""
        key = document_key(self.split, self.seed, i) * 1_000_003
        stream = (lambda k: (lambda j: _splitmix64(k + j) / 2.0**64))
        uniform = stream(key)
        turns = 1 + int(uniform(999_999) * self.max_turns) if self.max_turns > 1 else 1
        messages, problems = [], []
        for turn in range(turns):
            turn_uniform = uniform if turn == 0 else stream(_splitmix64(key ^ (turn << 56)))
            problem, question, answer, spare = self._exchange(turn_uniform)
            if turn == 0 and spare[0] < self.system_prompt_prob:
                messages.append({'role': 'system',
                                 'content': _WORD_SYSTEM_PROMPTS[int(spare[1] * len(_WORD_SYSTEM_PROMPTS))]})
            messages += [{'role': 'user', 'content': question}, {'role': 'assistant', 'content': answer}]
            problems.append(problem)
        return {'messages': messages, 'answer': answer, 'problem': problems[-1], 'problems': problems}
