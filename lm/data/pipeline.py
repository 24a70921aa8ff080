"""The grain pipeline: source -> shard -> seeded shuffle -> read+tokenize -> pack -> batches.

    MapDataset.range(len(source))            record indices of this split
      [process_index::process_count]         disjoint per JAX process, union = all
      shuffle, repeat                        train, finite sources: every epoch reshuffled,
                                             epoch e by a permutation drawn from (seed, e)
      .batch(group_size).map(load_group)     read + tokenize documents in groups (bulk
                                             tokenizers); bad records -> error or count
      .to_iter_dataset(ReadOptions)          optional reader threads
    PackedBatchDataset                       [B, T] batches (packing.py)
      .mp_prefetch(num_workers)              optional worker processes

`DataIterator` (train) is the checkpointable iterator the trainer holds; `EvalBatches`
(valid) is a re-iterable, finite, deterministic sequence of batches.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any, Callable

import grain
import numpy as np

from lm.data.errors import BadRecord, DataError, ERROR_INDEX, counts_to_dict, zero_counts
from lm.data.packing import BATCH_KEYS, PackedBatchDataset, empty_batch

_log = logging.getLogger(__name__)
_MAX_SKIP_LOGS = 20  # per process; every skip is counted regardless
_skip_logs = [0]
_PERMUTATION_LIMIT = 1 << 25  # larger splits use grain's index_shuffle (no O(n) permutation)


class EpochShuffleMapDataset(grain.MapDataset):
    """Endless stream of epochs; epoch e is the parent in the order of a permutation drawn
    from (seed, e). Used up to 2**25 records instead of grain's shuffle, whose index_shuffle
    costs milliseconds per index on datasets of tens of records. Memory: one int64 [n]."""

    def __init__(self, parent: grain.MapDataset, seed: int):
        super().__init__(parent)
        self._seed, self._n = seed, len(parent)
        self._cache = (None, None)  # (epoch, permutation)

    def __len__(self) -> int:
        return sys.maxsize

    def _permutation(self, epoch: int) -> np.ndarray:
        cached_epoch, permutation = self._cache
        if cached_epoch != epoch:
            permutation = np.random.default_rng([self._seed, epoch]).permutation(self._n)
            self._cache = (epoch, permutation)
        return permutation

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(index, self._n)
        return self._parent[int(self._permutation(epoch)[position])]

    def __getstate__(self):
        state = dict(self.__dict__)
        state['_cache'] = (None, None)
        return state

    def __str__(self) -> str:
        return f'EpochShuffleMapDataset(seed={self._seed})'


def _read(source, indices: list[int]) -> list:
    """source.documents(indices) when the source reads in bulk, else one by one; BadRecord
    instances stand in for bad records."""
    if hasattr(source, 'documents'):
        return source.documents(indices)
    out = []
    for i in indices:
        try:
            out.append(source.document(i))
        except BadRecord as e:
            out.append(e)
    return out


def load_group(source, on_error: str, indices) -> list[dict]:
    """Documents for `indices`: {'tokens', 'weights'} each, a bad record raised as DataError
    (on_error='raise') or replaced by the marker {'error': kind_index} (on_error='skip')."""
    out = []
    for result in _read(source, [int(i) for i in indices]):
        if not isinstance(result, BadRecord):
            if result.get('dropped_messages'):  # kept, but with its oldest turns cut: counted
                out.append({'error': ERROR_INDEX['history_truncated']})
            out.append(result)
        elif on_error == 'raise':
            raise DataError(f"{result} (set data.on_error='skip' to skip and count such records)")
        else:
            if _skip_logs[0] < _MAX_SKIP_LOGS:
                _skip_logs[0] += 1
                _log.warning('skipping bad record: %s', result)
            out.append({'error': ERROR_INDEX[result.kind]})
    return out


def make_dataset(source, *, split: str, batch_size: int, seq_len: int, seed: int,
                 process_index: int, process_count: int, packing: str, on_error: str,
                 pad_id: int, group_size: int = 256, read_threads: int = 0, num_workers: int = 0,
                 worker_buffer_size: int = 2) -> grain.IterDataset:
    """grain IterDataset of packed batches (dicts of [B, T] numpy arrays plus '_errors')."""
    ds = grain.MapDataset.range(len(source))[process_index::process_count]
    if len(source) == 0 or (len(ds) == 0 and split == 'train'):
        hint = ('set <source>.valid_files or a larger data.valid_fraction' if split == 'valid'
                else 'check the configured files and data.valid_fraction')
        raise ValueError(f'the {split!r} split has no documents for process {process_index} of '
                         f'{process_count} ({len(source)} in all): {hint}')
    # (a valid shard may be empty on some processes: they yield padding batches in step)
    if split == 'train' and not source.unbounded:
        if len(ds) <= _PERMUTATION_LIMIT:
            ds = EpochShuffleMapDataset(ds, seed)
        else:
            ds = ds.shuffle(seed % 2**32).repeat()
    ds = ds.batch(group_size).map(functools.partial(load_group, source, on_error))
    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * read_threads)
    packed = PackedBatchDataset(ds.to_iter_dataset(read), batch_size=batch_size, seq_len=seq_len,
                                mode=packing, pad_id=pad_id)
    if num_workers > 0:
        from absl import flags  # grain's worker processes read absl flags: use the defaults
        if not flags.FLAGS.is_parsed():  # when the caller did not parse any (no absl.app.run)
            flags.FLAGS.mark_as_parsed()
        packed = packed.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=worker_buffer_size))
    return packed


class DataIterator:
    """Checkpointable iterator of batches: {'inputs', 'targets', 'loss_mask', 'segment_ids',
    'positions'}, each [B, T] numpy (int32, loss_mask float32).

    get_state() -> JSON-serializable dict; set_state(state) makes the following batches
    exactly those an uninterrupted run would have produced (same config, same num_workers).
    error_counts() -> {kind: n} records skipped so far (on_error='skip'); part of the state.
    """

    def __init__(self, dataset: grain.IterDataset):
        self._iterator = iter(dataset)
        self._errors = zero_counts()
        self._batches = 0

    def __iter__(self) -> 'DataIterator':
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        self._errors = self._errors + np.asarray(batch['_errors'], np.int64)
        self._batches += 1
        return {key: value for key, value in batch.items() if key != '_errors'}

    def get_state(self) -> dict[str, Any]:
        return {'pipeline': self._iterator.get_state(), 'batches': self._batches,
                'error_counts': counts_to_dict(self._errors)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._iterator.set_state(state['pipeline'])
        self._batches = int(state['batches'])
        counts = zero_counts()
        for kind, n in state['error_counts'].items():
            counts[ERROR_INDEX[kind]] = n
        self._errors = counts

    def error_counts(self) -> dict[str, int]:
        """{kind: records skipped so far} for every kind in errors.ERROR_KINDS."""
        return counts_to_dict(self._errors)

    def stats(self) -> dict[str, int]:
        """Flat dict for logging: {'batches': n, 'skipped/<kind>': n, 'skipped/total': n}."""
        out = {'batches': self._batches, 'skipped/total': int(self._errors.sum())}
        out.update({f'skipped/{k}': v for k, v in self.error_counts().items()})
        return out

    def close(self) -> None:
        close = getattr(self._iterator, 'close', None)
        if close is not None:
            close()


class EvalBatches:
    """A fixed, finite, deterministic sequence of `num_batches` batches; iterate it again for
    the same batches. When the split runs out early the rest are all-padding batches
    (loss_mask 0), so every process yields the same number of batches."""

    def __init__(self, make_dataset_fn: Callable[[], grain.IterDataset], *, num_batches: int,
                 batch_size: int, seq_len: int, pad_id: int, empty: Callable | None = None):
        if num_batches < 1:
            raise ValueError(f'data.num_valid_batches must be >= 1, got {num_batches}')
        self._make = make_dataset_fn
        self._num_batches, self._shape = num_batches, (batch_size, seq_len, pad_id)
        self._errors = zero_counts()
        self._empty = empty or empty_batch  # (B, T, pad_id) -> an all-padding batch of this kind

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self):
        iterator = DataIterator(self._make())
        for _ in range(self._num_batches):
            batch = next(iterator, None)
            yield batch if batch is not None else self._empty(*self._shape)
        self._errors = iterator._errors  # pylint: disable=protected-access
        iterator.close()

    def error_counts(self) -> dict[str, int]:
        """{kind: records skipped} during the last complete pass."""
        return counts_to_dict(self._errors)
