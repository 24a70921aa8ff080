"""Tokenizers: byte-level (default), BPE via `tokenizers`, SentencePiece; fixed special tokens.

Every tokenizer exposes the same surface:

  vocab_size                 int, ids are in [0, vocab_size)
  encode(text) -> list[int]  plain text only: text NEVER produces a special id, so a
                             user message containing '<|assistant|>' cannot forge a turn
  encode_array(text)         the same as int32 [n]
  decode(ids) -> str         special ids render as their strings ('<|eos|>') unless skip_special
  special_ids                {name: id} for SPECIAL_NAMES
  bos_id, eos_id, pad_id, end_of_turn_id, role_ids {'system'|'user'|'assistant': id}
  metadata() / save_metadata(dir)   the record kept next to a checkpoint

The special tokens, and their ids per tokenizer kind:

  name         string            byte        trained BPE   loaded tokenizer.json / .model
  pad          <|pad|>           256         0             found by string, else appended
  bos          <|bos|>           257         1             (SentencePiece: its own bos/eos/pad
  eos          <|eos|>           258         2              when the model defines them)
  system       <|system|>        259         3
  user         <|user|>          260         4
  assistant    <|assistant|>     261         5
  end_of_turn  <|end_of_turn|>   262         6

CLI:  python -m lm.data.tokenizer train --files 'corpus/*.txt' --vocab_size 8000 --output tok/
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
from typing import Iterable, Sequence

import numpy as np

SPECIAL_NAMES = ('pad', 'bos', 'eos', 'system', 'user', 'assistant', 'end_of_turn')
SPECIAL_STRINGS = {name: f'<|{name}|>' for name in SPECIAL_NAMES}
ROLES = ('system', 'user', 'assistant')
METADATA_FILE = 'tokenizer_metadata.json'


class TokenizerMismatchError(ValueError):
    """Two tokenizer metadata records disagree (e.g. checkpoint vs current config)."""


class Tokenizer:
    """Base class: subclasses set `kind`, `vocab_size`, `special_ids`, `fingerprint`."""

    kind: str
    vocab_size: int
    special_ids: dict[str, int]
    fingerprint: str  # sha256 of the vocabulary definition (model file bytes), 'byte-v1' for bytes

    @property
    def pad_id(self) -> int:
        return self.special_ids['pad']

    @property
    def bos_id(self) -> int:
        return self.special_ids['bos']

    @property
    def eos_id(self) -> int:
        return self.special_ids['eos']

    @property
    def end_of_turn_id(self) -> int:
        return self.special_ids['end_of_turn']

    @property
    def role_ids(self) -> dict[str, int]:
        return {role: self.special_ids[role] for role in ROLES}

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """[encode_array(t) for t in texts]; `tokenizers` does it in one parallel call."""
        return [self.encode_array(t) for t in texts]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        raise NotImplementedError

    def metadata(self) -> dict:
        """JSON-able record: kind, vocab_size, special_ids, fingerprint."""
        return {
            'kind': self.kind,
            'vocab_size': int(self.vocab_size),
            'special_ids': {k: int(v) for k, v in self.special_ids.items()},
            'fingerprint': self.fingerprint,
        }

    def save_metadata(self, directory: str) -> str:
        """Writes `directory/tokenizer_metadata.json`; returns its path."""
        return save_metadata(self.metadata(), directory)

    def _check_ids(self, ids: np.ndarray) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][0]
            raise ValueError(f'token id {int(bad)} outside the vocabulary [0, {self.vocab_size})')


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are ids 0..255; special tokens are 256..262. Needs no training.

    Round trip is exact for any str, including lone surrogates that stand for invalid
    bytes (Python's 'surrogateescape'): decode(bytes 0xff) == '\\udcff' and
    encode('\\udcff') == [0xff].
    """

    kind = 'byte'
    fingerprint = 'byte-v1'

    def __init__(self):
        self.special_ids = {name: 256 + i for i, name in enumerate(SPECIAL_NAMES)}
        self.vocab_size = 256 + len(SPECIAL_NAMES)

    def encode_array(self, text: str) -> np.ndarray:
        data = text.encode('utf-8', errors='surrogateescape')
        return np.frombuffer(data, np.uint8).astype(np.int32)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Bytes of the non-special ids (specials dropped)."""
        ids = np.asarray(list(ids), np.int64)
        self._check_ids(ids)
        return ids[ids < 256].astype(np.uint8).tobytes()

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        ids = np.asarray(list(ids), np.int64)
        self._check_ids(ids)
        names = {v: k for k, v in self.special_ids.items()}
        out, start = [], 0
        for i in np.flatnonzero(ids >= 256).tolist() + [len(ids)]:
            out.append(ids[start:i].astype(np.uint8).tobytes().decode('utf-8', 'surrogateescape'))
            if i < len(ids) and not skip_special:
                out.append(SPECIAL_STRINGS[names[int(ids[i])]])
            start = i + 1
        return ''.join(out)


class HFTokenizer(Tokenizer):
    """A `tokenizers` tokenizer.json. Missing special tokens are appended (ids >= base vocab)."""

    kind = 'tokenizers'

    def __init__(self, path: str):
        self.path = path
        with open(path, 'rb') as f:
            self._raw = f.read()
        self.fingerprint = hashlib.sha256(self._raw).hexdigest()
        self._build()

    def _build(self):
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as _Tok

        tok = _Tok.from_str(self._raw.decode('utf-8'))
        missing = [s for s in SPECIAL_STRINGS.values() if tok.token_to_id(s) is None]
        if missing:  # appended in SPECIAL_NAMES order: deterministic ids
            tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in missing])
        tok.encode_special_tokens = True  # text is text: '<|user|>' typed by a user is not a marker
        self._tok = tok
        self.special_ids = {name: tok.token_to_id(s) for name, s in SPECIAL_STRINGS.items()}
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def __getstate__(self):
        return {'path': self.path, 'raw': self._raw, 'fingerprint': self.fingerprint}

    def __setstate__(self, state):
        self.path, self._raw, self.fingerprint = state['path'], state['raw'], state['fingerprint']
        self._build()

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encs = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encs]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        self._check_ids(np.asarray(ids, np.int64))
        return self._tok.decode(ids, skip_special_tokens=skip_special)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece .model. Uses the model's own bos/eos/pad when defined (id >= 0) and
    its pieces named like our special strings; every other special id is appended after
    the model's pieces, in SPECIAL_NAMES order."""

    kind = 'sentencepiece'

    def __init__(self, path: str):
        self.path = path
        with open(path, 'rb') as f:
            self._raw = f.read()
        self.fingerprint = hashlib.sha256(self._raw).hexdigest()
        self._build()

    def _build(self):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_proto=self._raw)
        self._sp = sp
        self._base = sp.get_piece_size()
        own = {'pad': sp.pad_id(), 'bos': sp.bos_id(), 'eos': sp.eos_id()}
        ids, next_id = {}, self._base
        for name in SPECIAL_NAMES:
            piece_id = sp.piece_to_id(SPECIAL_STRINGS[name])
            if own.get(name, -1) >= 0:
                ids[name] = own[name]
            elif sp.id_to_piece(piece_id) == SPECIAL_STRINGS[name]:
                ids[name] = piece_id
            else:
                ids[name] = next_id
                next_id += 1
        self.special_ids = ids
        self.vocab_size = next_id
        self._appended = {v: SPECIAL_STRINGS[k] for k, v in ids.items() if v >= self._base}
        self._model_specials = {v: SPECIAL_STRINGS[k] for k, v in ids.items() if v < self._base}

    def __getstate__(self):
        return {'path': self.path, 'raw': self._raw, 'fingerprint': self.fingerprint}

    def __setstate__(self, state):
        self.path, self._raw, self.fingerprint = state['path'], state['raw'], state['fingerprint']
        self._build()

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text, out_type=int), np.int32)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        self._check_ids(np.asarray(ids, np.int64))
        out, run = [], []
        for i in ids:
            special = self._appended.get(i) or self._model_specials.get(i)
            if special is None:
                run.append(i)
                continue
            if run:
                out.append(self._sp.decode(run))
                run = []
            if not skip_special:
                out.append(special)
        if run:
            out.append(self._sp.decode(run))
        return ''.join(out)


def load_tokenizer(spec: str) -> Tokenizer:
    """'byte' | path to tokenizer.json | path to .model | a directory holding tokenizer.json |
    'hf:<directory>': a Hugging Face checkpoint's tokenizer with its own special tokens, EOS and
    chat template, vocabulary unchanged (lm/data/hf_tokenizer.py)."""
    if spec == 'byte':
        return ByteTokenizer()
    if spec.startswith('hf:'):
        from lm.data.hf_tokenizer import HFCheckpointTokenizer

        return HFCheckpointTokenizer(spec[3:])
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        path = os.path.join(path, 'tokenizer.json')
    if not os.path.exists(path):
        raise FileNotFoundError(f"data.tokenizer: no such file {path!r} (expected 'byte', "
                                'a tokenizer.json, or a SentencePiece .model)')
    if path.endswith('.model'):
        return SentencePieceTokenizer(path)
    if path.endswith('.json'):
        return HFTokenizer(path)
    raise ValueError(f'data.tokenizer: cannot tell the kind of {path!r}: expected .json or .model')


# ----------------------------------------------------------------------------- metadata

def save_metadata(metadata: dict, directory: str) -> str:
    """Writes a tokenizer metadata record as `directory/tokenizer_metadata.json`."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, METADATA_FILE)
    with open(path, 'w') as f:
        json.dump(metadata, f, indent=2, sort_keys=True)
    return path


def load_metadata(directory_or_file: str) -> dict:
    path = directory_or_file
    if os.path.isdir(path):
        path = os.path.join(path, METADATA_FILE)
    with open(path) as f:
        return json.load(f)


def check_metadata(expected: dict, actual: dict, *, expected_name: str = 'checkpoint',
                   actual_name: str = 'current tokenizer') -> None:
    """Raises TokenizerMismatchError listing every field where the two records differ."""
    problems = []
    for key in ('kind', 'vocab_size', 'fingerprint'):
        if expected.get(key) != actual.get(key):
            problems.append(f'{key}: {expected_name} has {expected.get(key)!r}, '
                            f'{actual_name} has {actual.get(key)!r}')
    exp_ids, act_ids = expected.get('special_ids', {}), actual.get('special_ids', {})
    for name in sorted(set(exp_ids) | set(act_ids)):
        if exp_ids.get(name) != act_ids.get(name):
            problems.append(f'special token {name!r}: {expected_name} id {exp_ids.get(name)}, '
                            f'{actual_name} id {act_ids.get(name)}')
    if problems:
        raise TokenizerMismatchError('tokenizer mismatch:\n  ' + '\n  '.join(problems))


# ----------------------------------------------------------------------------- training

def train_bpe(files: Sequence[str] | None, vocab_size: int, output_dir: str, *,
              texts: Iterable[str] | None = None, min_frequency: int = 2,
              show_progress: bool = True) -> str:
    """Trains a byte-level BPE on `files` (plain text) or an iterable of `texts`.

    The 7 special tokens take ids 0..6 (SPECIAL_NAMES order). Byte-level pre-tokenization
    means every string (Japanese included) encodes, and decodes back exactly.
    Returns the path of the written `output_dir/tokenizer.json`.
    """
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
        special_tokens=[SPECIAL_STRINGS[n] for n in SPECIAL_NAMES],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    if texts is not None:
        tok.train_from_iterator(texts, trainer)
    else:
        if not files:
            raise ValueError('train_bpe: no input files')
        tok.train(list(files), trainer)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, 'tokenizer.json')
    tok.save(path)
    return path


def expand_files(patterns) -> list[str]:
    """Comma-separated string or list of globs -> sorted unique paths; a pattern matching
    nothing is an error (a typo must not silently train on less data)."""
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(',') if p.strip()]
    paths = []
    for pattern in patterns:
        matched = sorted(glob.glob(os.path.expanduser(pattern.strip()), recursive=True))
        if not matched:
            raise FileNotFoundError(f'no file matches {pattern!r}')
        paths.extend(p for p in matched if os.path.isfile(p))
    return list(dict.fromkeys(paths))


def _jsonl_texts(paths, field):
    for path in paths:
        with open(path, encoding='utf-8') as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)[field]


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m lm.data.tokenizer')
    sub = parser.add_subparsers(dest='command', required=True)
    train = sub.add_parser('train', help='train a byte-level BPE, write tokenizer.json')
    train.add_argument('--files', required=True, nargs='+', help='globs of training files')
    train.add_argument('--vocab_size', required=True, type=int)
    train.add_argument('--output', required=True, help='output directory')
    train.add_argument('--text_field', default='', help='read files as JSONL, this field')
    train.add_argument('--min_frequency', type=int, default=2)
    args = parser.parse_args(argv)
    paths = expand_files(args.files)
    texts = _jsonl_texts(paths, args.text_field) if args.text_field else None
    path = train_bpe(None if args.text_field else paths, args.vocab_size, args.output, texts=texts,
                     min_frequency=args.min_frequency)
    tok = HFTokenizer(path)
    tok.save_metadata(args.output)
    print(f'wrote {path} (vocab_size={tok.vocab_size}, special_ids={tok.special_ids})')


if __name__ == '__main__':
    main()
