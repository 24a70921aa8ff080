"""File sources: plain text, JSONL text, JSONL chat, pre-tokenized ArrayRecord shards.

Every source (these and the synthetic ones in synthetic.py) has the same interface:

  len(source)           number of documents in this split (huge for synthetic sources)
  source.unbounded      True for synthetic sources (no shuffle, no epochs needed)
  source.document(i)    -> {'tokens': int32 [n], 'weights': float32 [n]} for document i,
                           or raises BadRecord(kind, 'path:line', detail)

weights[j] is the loss weight of predicting tokens[j] from tokens[:j] (chat.py). Files are
indexed once at start-up (byte ranges of every record); records are read lazily with
os.pread, so a source is cheap to pickle into grain worker processes.

Train/valid split: `valid_files` when given; otherwise the records of `train_files` whose
hashed index falls below `valid_fraction` form the valid split (fixed, seed-independent).
"""

from __future__ import annotations

import json
import os

import numpy as np

from lm.data import chat
from lm.data.errors import BadRecord
from lm.data.tokenizer import Tokenizer, check_metadata, expand_files

DOCUMENT_UNITS = ('file', 'block', 'line')
TOKENS_METADATA = 'metadata.json'  # written by lm.data.prepare next to its shards
_MAX_OPEN_FILES = 64  # per source and process; past it, open files are closed and reopened


def holdout_mask(n: int, fraction: float) -> np.ndarray:
    """[n] bool, True for the ~fraction of indices held out for validation (splitmix64 hash)."""
    x = np.arange(n, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def split_mask(n: int, split: str, has_valid_files: bool, valid_fraction: float):
    """[n] bool records of `split` among n records of the configured files, or None for all."""
    if has_valid_files:
        return None  # train_files and valid_files are separate: each split takes its files whole
    if split == 'train' and not valid_fraction:
        return None
    held = holdout_mask(n, valid_fraction)
    return held if split == 'valid' else ~held


def _line_ranges(data: np.ndarray):
    """Byte ranges [start, stop) of the lines of `data` (no '\\n'), and their non-blank flags."""
    newlines = np.flatnonzero(data == 10)
    starts = np.concatenate([[0], newlines + 1])
    stops = np.concatenate([newlines, [len(data)]])
    if len(data) == 0 or data[-1] == 10:  # nothing after the final newline: not a line
        starts, stops = starts[:-1], stops[:-1]
    non_ws = np.concatenate([[0], np.cumsum(~np.isin(data, (9, 10, 11, 12, 13, 32)))])
    nonblank = non_ws[stops] - non_ws[starts] > 0
    return starts, stops, nonblank


def index_file(path: str, unit: str):
    """Records of one file -> (starts, stops, line numbers), int64 arrays.

    unit: 'file' (the whole file), 'block' (runs of non-blank lines), 'line' (every line,
    blank ones included: they are empty documents), 'jsonl' (every non-blank line).
    """
    if unit == 'file':
        return np.array([0]), np.array([os.path.getsize(path)]), np.array([1])
    data = np.fromfile(path, np.uint8)
    starts, stops, nonblank = _line_ranges(data)
    lines = np.arange(1, len(starts) + 1)
    if unit == 'line':
        return starts, stops, lines
    if unit == 'jsonl':
        return starts[nonblank], stops[nonblank], lines[nonblank]
    if unit == 'block':
        prev = np.concatenate([[False], nonblank[:-1]])
        nxt = np.concatenate([nonblank[1:], [False]])
        first, last = nonblank & ~prev, nonblank & ~nxt
        return starts[first], stops[last], lines[first]
    raise ValueError(f'document unit must be one of {DOCUMENT_UNITS}, got {unit!r}')


class FileSource:
    """Records = byte ranges of files. Subclasses define `_text(raw, where) -> str` (text
    documents, tokenized in bulk) or `_parse(raw, where) -> dict` (anything else)."""

    unbounded = False
    unit = 'file'

    def __init__(self, cfg, split: str, tokenizer: Tokenizer, *, add_bos: bool, add_eos: bool,
                 valid_fraction: float, **_):
        self.tokenizer, self.add_bos, self.add_eos = tokenizer, add_bos, add_eos
        patterns = cfg.valid_files if (split == 'valid' and cfg.valid_files) else cfg.train_files
        if not patterns:
            raise ValueError(f'{type(self).__name__}: no files configured (set train_files)')
        self.paths = expand_files(patterns)
        parts = [index_file(p, self.unit) for p in self.paths]
        self._file = np.concatenate([np.full(len(s), i, np.int32) for i, (s, _, _) in enumerate(parts)])
        self._start = np.concatenate([s for s, _, _ in parts]).astype(np.int64)
        self._stop = np.concatenate([e for _, e, _ in parts]).astype(np.int64)
        self._line = np.concatenate([l for _, _, l in parts]).astype(np.int64)
        keep = split_mask(len(self._start), split, bool(cfg.valid_files), valid_fraction)
        if keep is not None:
            self._file, self._start = self._file[keep], self._start[keep]
            self._stop, self._line = self._stop[keep], self._line[keep]
        self._fds = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state['_fds'] = {}
        return state

    def __len__(self) -> int:
        return len(self._start)

    def where(self, i: int) -> str:
        return f'{self.paths[self._file[i]]}:{self._line[i]}'

    def raw(self, i: int) -> bytes:
        file_id = int(self._file[i])
        fd = self._fds.get(file_id)
        if fd is None:
            if len(self._fds) >= _MAX_OPEN_FILES:
                for open_fd in self._fds.values():
                    os.close(open_fd)
                self._fds.clear()
            fd = self._fds[file_id] = os.open(self.paths[file_id], os.O_RDONLY)
        return os.pread(fd, int(self._stop[i] - self._start[i]), int(self._start[i]))

    def document(self, i: int) -> dict:
        return self._parse(self.raw(i), self.where(i))

    def documents(self, indices: list[int]) -> list:
        """Documents for `indices` (BadRecord instances for bad records); text sources tokenize
        the whole group in one tokenizer call."""
        if not hasattr(self, '_text'):
            out = []
            for i in indices:
                try:
                    out.append(self.document(i))
                except BadRecord as e:
                    out.append(e)
            return out
        texts, out = [], []
        for i in indices:
            try:
                texts.append(self._text(self.raw(i), self.where(i)))
                out.append(None)
            except BadRecord as e:
                out.append(e)
        bodies = iter(self.tokenizer.encode_batch(texts) if texts else [])
        return [self._wrap(next(bodies)) if r is None else r for r in out]

    def _parse(self, raw: bytes, where: str) -> dict:
        return self._wrap(self.tokenizer.encode_array(self._text(raw, where)))

    def _decode(self, raw: bytes, where: str) -> str:
        try:
            return raw.decode('utf-8')
        except UnicodeDecodeError as e:
            path, line = where.rsplit(':', 1)  # name the line holding the bad byte
            where = f'{path}:{int(line) + raw[:e.start].count(10)}'
            raise BadRecord('invalid_utf8', where, f'byte 0x{raw[e.start]:02x} at offset {e.start} '
                            'of the document is not valid UTF-8') from None

    def _wrap(self, body: np.ndarray) -> dict:
        """Token ids of a text -> document with bos/eos as configured, every token scored."""
        parts = ([[self.tokenizer.bos_id]] if self.add_bos else []) + [body] + (
            [[self.tokenizer.eos_id]] if self.add_eos else [])
        tokens = np.concatenate(parts).astype(np.int32)
        return {'tokens': tokens, 'weights': np.ones(len(tokens), np.float32)}

    def _json(self, raw: bytes, where: str) -> dict:
        text = self._decode(raw, where)
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadRecord('malformed_json', where, f'{e.msg} at column {e.colno}') from None
        if not isinstance(value, dict):
            raise BadRecord('wrong_type', where, f'expected a JSON object, got {type(value).__name__}')
        return value


class TextSource(FileSource):
    """Plain text; a document per file, per blank-line-separated block, or per line."""

    def __init__(self, cfg, split, tokenizer, **kw):
        if cfg.document not in DOCUMENT_UNITS:
            raise ValueError(f'data.text.document must be one of {DOCUMENT_UNITS}, got {cfg.document!r}')
        self.unit = cfg.document
        super().__init__(cfg, split, tokenizer, **kw)

    def _text(self, raw: bytes, where: str) -> str:
        text = self._decode(raw, where)
        if self.unit != 'file' and text.endswith('\r'):  # CRLF line ends
            text = text[:-1]
        if not text:
            raise BadRecord('empty_document', where, 'document has no text')
        return text


class JsonlSource(FileSource):
    """JSONL, one document per non-blank line, text in `cfg.text_field`."""

    unit = 'jsonl'

    def __init__(self, cfg, split, tokenizer, **kw):
        self.text_field = cfg.text_field
        super().__init__(cfg, split, tokenizer, **kw)

    def _text(self, raw: bytes, where: str) -> str:
        record = self._json(raw, where)
        if self.text_field not in record:
            raise BadRecord('missing_field', where, f'no {self.text_field!r} field '
                            f'(fields: {sorted(record)[:8]})')
        text = record[self.text_field]
        if not isinstance(text, str):
            raise BadRecord('wrong_type', where, f'{self.text_field!r} must be a string, '
                            f'got {type(text).__name__}')
        if not text:
            raise BadRecord('empty_document', where, 'document has no text')
        return text


class ChatJsonlSource(FileSource):
    """JSONL chat: {"messages": [{"role": ..., "content": ...}, ...]} per line."""

    unit = 'jsonl'

    def __init__(self, cfg, split, tokenizer, *, loss_policy: str, seq_len: int | None = None,
                 chat_overflow: str = 'none', **kw):
        self.messages_field, self.loss_policy = cfg.messages_field, loss_policy
        self.max_tokens = None if seq_len is None else seq_len + 1  # one packed row
        self.overflow = chat_overflow
        super().__init__(cfg, split, tokenizer, **kw)

    def _parse(self, raw: bytes, where: str) -> dict:
        record = self._json(raw, where)
        if self.messages_field not in record:
            raise BadRecord('missing_field', where, f'no {self.messages_field!r} field')
        messages = chat.validate_messages(record[self.messages_field], where)
        out = chat.render_conversation(messages, self.tokenizer, loss_policy=self.loss_policy,
                                       add_bos=self.add_bos, max_tokens=self.max_tokens,
                                       overflow=self.overflow, where=where)
        return {'tokens': out.tokens, 'weights': out.weights, 'dropped_messages': out.dropped_messages}


class ArrayRecordSource:
    """Pre-tokenized shards written by `python -m lm.data.prepare`: one record = one document's
    token ids (dtype from the shard directory's metadata.json), scored everywhere."""

    unbounded = False

    def __init__(self, cfg, split, tokenizer: Tokenizer, *, valid_fraction: float, **_):
        patterns = cfg.valid_files if (split == 'valid' and cfg.valid_files) else cfg.train_files
        if not patterns:
            raise ValueError('ArrayRecordSource: no files configured (set data.array_record.train_files)')
        if isinstance(patterns, str):
            patterns = [p for p in patterns.split(',') if p.strip()]
        patterns = [os.path.join(p, '*.array_record') if os.path.isdir(p) else p for p in patterns]
        self.paths = [p for p in expand_files(patterns) if p.endswith('.array_record')]
        if not self.paths:
            raise FileNotFoundError(f'no .array_record shard among {patterns}')
        self.vocab_size = tokenizer.vocab_size
        self._dtypes, counts = [], []
        for path in self.paths:
            meta_path = os.path.join(os.path.dirname(path), TOKENS_METADATA)
            if not os.path.exists(meta_path):
                raise FileNotFoundError(f'{path}: no {TOKENS_METADATA} beside the shard; '
                                        'write shards with `python -m lm.data.prepare`')
            with open(meta_path) as f:
                meta = json.load(f)
            check_metadata(meta['tokenizer'], tokenizer.metadata(), expected_name=meta_path,
                           actual_name='data.tokenizer')
            self._dtypes.append(np.dtype(meta['dtype']))
            counts.append(self._reader_for(path).num_records())
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        keys = np.arange(self._offsets[-1])
        keep = split_mask(len(keys), split, bool(cfg.valid_files), valid_fraction)
        if keep is not None:
            keys = keys[keep]
        self._keys = keys
        self._readers = {}

    @staticmethod
    def _reader_for(path):
        from array_record.python.array_record_module import ArrayRecordReader
        return ArrayRecordReader(path, 'readahead_buffer_size:0')

    def __getstate__(self):
        state = dict(self.__dict__)
        state['_readers'] = {}
        return state

    def __len__(self) -> int:
        return len(self._keys)

    def document(self, i: int) -> dict:
        key = int(self._keys[i])
        shard = int(np.searchsorted(self._offsets, key, side='right') - 1)
        position = key - int(self._offsets[shard])
        reader = self._readers.get(shard)
        if reader is None:
            if len(self._readers) >= _MAX_OPEN_FILES:
                for open_reader in self._readers.values():
                    open_reader.close()
                self._readers.clear()
            reader = self._readers[shard] = self._reader_for(self.paths[shard])
        raw = reader.read([position])[0]
        where, dtype = f'{self.paths[shard]}#{position}', self._dtypes[shard]
        if len(raw) % dtype.itemsize:
            raise BadRecord('malformed_record', where, f'{len(raw)} bytes is not a whole number '
                            f'of {dtype.name} tokens')
        tokens = np.frombuffer(raw, dtype).astype(np.int64)
        if len(tokens) == 0:
            raise BadRecord('empty_document', where, 'record has no tokens')
        bad = np.flatnonzero((tokens < 0) | (tokens >= self.vocab_size))
        if len(bad):
            raise BadRecord('token_out_of_vocab', where, f'token {int(tokens[bad[0]])} at position '
                            f'{int(bad[0])} is outside the vocabulary [0, {self.vocab_size})')
        return {'tokens': tokens.astype(np.int32), 'weights': np.ones(len(tokens), np.float32)}
