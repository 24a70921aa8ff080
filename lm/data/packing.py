"""Packing documents into fixed [B, T] batches: a grain IterDataset with exact resume.

A document of n tokens (tokens [n], weights [n]) becomes n - 1 (input, target, weight)
pairs *before* packing: inputs = tokens[:-1], targets = tokens[1:], loss_mask =
weights[1:]. So no target ever crosses from one document into the next: the pair that
would (last token of a document -> first token of the next) is never formed.

A piece of a document placed in a row is one segment: segment ids count 1, 2, 3, ... within
the row (0 = padding), positions restart at 0 in every segment. A document longer than
what fits is split across rows (and batches), never dropped; a continuation piece starts
at position 0, since the model cannot attend back into the previous row anyway.

  'concat'    rows are filled in order; a document that does not fit the rest of the row
              continues at the start of the next row. No padding except at the end of a
              finite stream.
  'first_fit' a document is cut into chunks of at most T pairs; each chunk goes whole into
              the first row with room for it; when a chunk fits nowhere, the batch is
              emitted (padded) and the chunk opens the next batch. Fewer split documents,
              some padding.

Output element: the batch contract ({'inputs', 'targets', 'loss_mask', 'segment_ids',
'positions'}, [B, T]) plus '_errors' [len(ERROR_KINDS)] int64: records skipped while
this batch was built (popped by DataIterator).

Documents arrive in groups (lists; a source reads and tokenizes many at once). Resume: the
iterator state is the parent's state *before* the group being consumed, the index of the
current document in it, and how many of its pairs are already emitted; set_state re-reads
that group and skips to there. Batches after a restore equal those of an uninterrupted run.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from lm.data import batch as contract
from lm.data.errors import zero_counts

PACKING_MODES = ('concat', 'first_fit')
BATCH_KEYS = contract.KEYS  # the contract's fields (lm/data/batch.py)


def empty_batch(batch_size: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """All-padding batch: segment_ids 0 and loss_mask 0 everywhere. Arrays [B, T]."""
    out = contract.spec('tokens', batch_size, seq_len)
    out['inputs'][:] = out['targets'][:] = pad_id
    return out


class _BatchBuilder:
    """Mutable [B, T] batch being filled row by row."""

    def __init__(self, batch_size: int, seq_len: int, pad_id: int):
        self.batch = empty_batch(batch_size, seq_len, pad_id)
        self.seq_len = seq_len
        self.fill = np.zeros(batch_size, np.int64)      # pairs used per row
        self.segments = np.zeros(batch_size, np.int64)  # segments opened per row
        self.errors = zero_counts()
        self.row = 0                                    # first row not yet full (concat)
        self.empty = True
        self._arange = np.arange(seq_len, dtype=np.int32)

    def place(self, row: int, tokens: np.ndarray, weights: np.ndarray, offset: int, n: int):
        """Writes pairs offset..offset+n-1 of a document at the end of `row`."""
        b, c = self.batch, int(self.fill[row])
        b['inputs'][row, c:c + n] = tokens[offset:offset + n]
        b['targets'][row, c:c + n] = tokens[offset + 1:offset + 1 + n]
        b['loss_mask'][row, c:c + n] = weights[offset + 1:offset + 1 + n]
        self.segments[row] += 1
        b['segment_ids'][row, c:c + n] = self.segments[row]
        b['positions'][row, c:c + n] = self._arange[:n]
        self.fill[row] += n
        self.empty = False

    def output(self) -> dict[str, Any]:
        out = dict(self.batch)
        out['_errors'] = self.errors
        return out


class PackedBatchIterator(grain.DatasetIterator):
    """Iterator over packed batches. The parent yields *groups*: lists whose items are
    documents {'tokens': [n], 'weights': [n]} or skipped records {'error': kind_index}."""

    def __init__(self, parent: grain.DatasetIterator, *, batch_size: int, seq_len: int,
                 mode: str, pad_id: int):
        super().__init__(parent)
        if mode not in PACKING_MODES:
            raise ValueError(f'data.packing must be one of {PACKING_MODES}, got {mode!r}')
        self._batch_size, self._seq_len, self._mode, self._pad_id = batch_size, seq_len, mode, pad_id
        self._group = None        # group being consumed
        self._group_state = None  # parent state before that group
        self._item = 0            # index of the current item in the group
        self._offset = 0          # pairs of the current document already placed
        self._resume = (0, 0)     # (item, offset) to start the next group at (after set_state)
        self._exhausted = False

    def _current_document(self, builder: _BatchBuilder):
        """The document to place next (counting skipped records on the way); None at the end."""
        while True:
            if self._group is None:
                state = self._parent.get_state()
                try:
                    group = next(self._parent)
                except StopIteration:
                    return None
                self._group, self._group_state = group, state
                (self._item, self._offset), self._resume = self._resume, (0, 0)
            while self._item < len(self._group):
                item = self._group[self._item]
                if 'error' in item:
                    builder.errors[item['error']] += 1
                elif len(item['tokens']) >= 2:  # a 1-token document has no (input, target) pair
                    return item
                self._item += 1
            self._group = None

    def _done_with_document(self):
        self._item += 1
        self._offset = 0
        if self._item == len(self._group):
            self._group = None

    def _place_concat(self, builder: _BatchBuilder, doc: dict) -> bool:
        """Places as much of `doc` as fits; True when the batch is full."""
        tokens, weights = doc['tokens'], doc['weights']
        remaining = len(tokens) - 1 - self._offset
        row = builder.row
        n = min(remaining, self._seq_len - int(builder.fill[row]))
        builder.place(row, tokens, weights, self._offset, n)
        self._offset += n
        if n == remaining:
            self._done_with_document()
        if builder.fill[row] == self._seq_len:
            builder.row += 1
        return builder.row == self._batch_size

    def _place_first_fit(self, builder: _BatchBuilder, doc: dict) -> bool:
        """Places chunks of `doc` first-fit; True when a chunk fits nowhere (emit)."""
        tokens, weights = doc['tokens'], doc['weights']
        total = len(tokens) - 1
        while self._offset < total:
            n = min(self._seq_len, total - self._offset)
            rows = np.flatnonzero(self._seq_len - builder.fill >= n)
            if len(rows) == 0:
                return True
            builder.place(int(rows[0]), tokens, weights, self._offset, n)
            self._offset += n
        self._done_with_document()
        return False

    def __next__(self) -> dict[str, Any]:
        if self._exhausted:
            raise StopIteration
        builder = _BatchBuilder(self._batch_size, self._seq_len, self._pad_id)
        place = self._place_concat if self._mode == 'concat' else self._place_first_fit
        while True:
            doc = self._current_document(builder)
            if doc is None:
                self._exhausted = True
                if builder.empty and not builder.errors.any():
                    raise StopIteration
                return builder.output()  # the last, partly padded batch
            if place(builder, doc):
                return builder.output()

    def get_state(self) -> dict[str, Any]:
        if self._group is not None:
            return {'parent': self._group_state, 'item': int(self._item),
                    'offset': int(self._offset), 'exhausted': False}
        return {'parent': self._parent.get_state(), 'item': int(self._resume[0]),
                'offset': int(self._resume[1]), 'exhausted': self._exhausted}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state['parent'])
        self._group, self._group_state = None, None
        self._item, self._offset = 0, 0
        self._resume = (int(state['item']), int(state['offset']))
        self._exhausted = bool(state['exhausted'])

    def __str__(self) -> str:
        return f'PackedBatchIterator(mode={self._mode}, B={self._batch_size}, T={self._seq_len})'


class PackedBatchDataset(grain.IterDataset):
    """IterDataset of packed [B, T] batches from an IterDataset of groups of documents."""

    def __init__(self, parent: grain.IterDataset, *, batch_size: int, seq_len: int, mode: str,
                 pad_id: int):
        super().__init__(parent)
        self._kwargs = dict(batch_size=batch_size, seq_len=seq_len, mode=mode, pad_id=pad_id)

    def __iter__(self) -> PackedBatchIterator:
        return PackedBatchIterator(self._parent.__iter__(), **self._kwargs)

    def __str__(self) -> str:
        return f'PackedBatchDataset({self._kwargs})'

