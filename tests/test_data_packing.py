"""Packing: every token and every loss-bearing target conserved, no target crosses a
document boundary, segment ids / positions right, exact resume mid-document."""

import json

import grain
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lm.data.packing import BATCH_KEYS, PackedBatchDataset

PAD = 7


def make_docs(lengths, seed=0):
    """Documents whose tokens are unique, consecutive ids (doc d: base_d, base_d + 1, ...), with
    gaps between documents, so `target == input + 1` holds exactly for in-document pairs.
    Weights are random in {0, 0.5, 1}; one token equals PAD to show it still counts."""
    rng = np.random.default_rng(seed)
    docs, base = [], 1000
    for n in lengths:
        tokens = np.arange(base, base + n, dtype=np.int32)
        weights = rng.choice([0.0, 0.5, 1.0], size=n).astype(np.float32)
        docs.append({'tokens': tokens, 'weights': weights})
        base += n + 1000
    if docs and lengths[0] > 1:
        docs[0]['tokens'][1] = PAD  # a real token equal to the pad id
        docs[0]['tokens'][0] = PAD - 1
    return docs


def pack(docs, batch_size, seq_len, mode, group_size=3):
    """Packed batches of `docs`, which arrive in groups of `group_size` as from the pipeline."""
    groups = [docs[i:i + group_size] for i in range(0, len(docs), group_size)]
    ds = grain.MapDataset.source(groups).to_iter_dataset(grain.ReadOptions(num_threads=0))
    return PackedBatchDataset(ds, batch_size=batch_size, seq_len=seq_len, mode=mode, pad_id=PAD)


def collect(iterator):
    return [{k: b[k] for k in BATCH_KEYS} for b in iterator]


def doc_pairs(docs):
    """(input, target, weight) triples every document contributes."""
    return sorted((int(i), int(t), float(w)) for d in docs
                  for i, t, w in zip(d['tokens'][:-1], d['tokens'][1:], d['weights'][1:]))


def batch_pairs(batches):
    out = []
    for b in batches:
        real = b['segment_ids'] > 0
        out += zip(b['inputs'][real].tolist(), b['targets'][real].tolist(), b['loss_mask'][real].tolist())
    return sorted(out)


def check_structure(batches, batch_size, seq_len):
    for b in batches:
        assert set(b) == set(BATCH_KEYS)
        for key in BATCH_KEYS:
            assert b[key].shape == (batch_size, seq_len)
        assert b['loss_mask'].dtype == np.float32 and b['inputs'].dtype == np.int32
        for row in range(batch_size):
            seg, pos = b['segment_ids'][row], b['positions'][row]
            used = int((seg > 0).sum())
            assert (seg[used:] == 0).all(), 'padding only after the segments'
            assert (b['loss_mask'][row, used:] == 0).all()
            # segments are 1, 2, 3, ... in order, each a contiguous run starting at position 0
            starts = np.flatnonzero(np.diff(np.concatenate([[0], seg[:used]])) != 0)
            assert list(seg[starts]) == list(range(1, len(starts) + 1))
            for s, e in zip(starts, list(starts[1:]) + [used]):
                assert list(pos[s:e]) == list(range(e - s))
                real = (b['inputs'][row, s:e] != PAD) & (b['inputs'][row, s:e] != PAD - 1)
                # no target crosses into another document: targets follow inputs within a document
                assert (b['targets'][row, s:e][real] == b['inputs'][row, s:e][real] + 1).all()


@settings(max_examples=40, deadline=None, derandomize=True)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=25),
       batch_size=st.integers(1, 3), seq_len=st.integers(1, 12),
       mode=st.sampled_from(['concat', 'first_fit']), group_size=st.integers(1, 4))
def test_packing_conserves_pairs_and_structure(lengths, batch_size, seq_len, mode, group_size):
    docs = make_docs(lengths)
    batches = collect(iter(pack(docs, batch_size, seq_len, mode, group_size)))
    assert batch_pairs(batches) == doc_pairs(docs)  # every token, target and weight, once
    check_structure(batches, batch_size, seq_len)
    if mode == 'concat':  # no padding before the end of the stream
        for b in batches[:-1]:
            assert (b['segment_ids'] > 0).all()


def test_concat_keeps_document_order_and_splits_long_documents():
    docs = make_docs([5, 30, 3])
    batches = collect(iter(pack(docs, 2, 8, 'concat')))
    stream = np.concatenate([b['inputs'][b['segment_ids'] > 0] for b in batches])
    expected = np.concatenate([d['tokens'][:-1] for d in docs])
    assert np.array_equal(stream, expected)
    assert len(batches) == 3  # 4 + 29 + 2 = 35 pairs -> 5 rows of 8 -> 3 batches of 2 rows


def test_first_fit_fills_holes_with_later_documents():
    docs = make_docs([7, 7, 3, 3])  # pairs: 6, 6, 2, 2 in rows of 8
    (batch,) = collect(iter(pack(docs, 2, 8, 'first_fit')))
    assert batch['segment_ids'].tolist() == [[1] * 6 + [2] * 2, [1] * 6 + [2] * 2]


def test_pad_valued_token_is_scored():
    docs = [{'tokens': np.array([1, PAD, PAD, 3], np.int32), 'weights': np.ones(4, np.float32)}]
    (batch,) = collect(iter(pack(docs, 1, 4, 'concat')))
    assert batch['targets'][0, :3].tolist() == [PAD, PAD, 3]
    assert batch['loss_mask'][0].tolist() == [1, 1, 1, 0]


def test_error_markers_are_counted_per_batch():
    docs = make_docs([9, 9])
    docs.insert(1, {'error': 2})
    docs.append({'error': 0})
    batches = list(iter(pack(docs, 1, 8, 'concat')))
    assert sum(b['_errors'] for b in batches).tolist()[:3] == [1, 0, 1]


@pytest.mark.parametrize('mode', ['concat', 'first_fit'])
def test_resume_mid_document_gives_identical_batches(mode):
    docs = make_docs(list(np.random.default_rng(1).integers(1, 50, size=40)), seed=1)
    for i in (3, 4, 17):
        docs.insert(i, {'error': 1})
    reference = list(iter(pack(docs, 2, 8, mode)))
    for k in (1, 3, 7, len(reference) - 1):
        first = iter(pack(docs, 2, 8, mode))
        for _ in range(k):
            next(first)
        state = json.loads(json.dumps(first.get_state()))
        resumed = iter(pack(docs, 2, 8, mode))
        resumed.set_state(state)
        rest = list(resumed)
        assert len(rest) == len(reference) - k
        for got, want in zip(rest, reference[k:]):
            for key in BATCH_KEYS + ('_errors',):  # skipped records counted once, in the same batch
                np.testing.assert_array_equal(got[key], want[key])
