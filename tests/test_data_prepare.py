"""lm.data.prepare: text -> ArrayRecord shards; training on shards sees what it would on text."""

import json

import numpy as np
import pytest

import lm.data as D
from configs.data import data_config
from lm.data import prepare


@pytest.fixture()
def corpus(tmp_path):
    for i in range(2):
        (tmp_path / f'part{i}.txt').write_text(
            '\n\n'.join(f'document {i}-{j}: ' + '日本語 ' * j for j in range(7)), encoding='utf-8')
    return tmp_path


def valid_batches(cfg):
    cfg.num_valid_batches = 6
    return list(D.build_iterator(cfg, split='valid', batch_size=2, seq_len=24, seed=0))


def test_shards_give_the_same_batches_as_the_text_source(corpus, tmp_path):
    out = tmp_path / 'shards'
    prepare.main(['--files', str(corpus / '*.txt'), '--output_dir', str(out), '--document', 'block',
                  '--records_per_shard', '5'])
    meta = json.loads((out / 'metadata.json').read_text())
    assert meta['num_records'] == 14 and len(meta['shards']) == 3 and meta['dtype'] == '<u2'
    assert meta['tokenizer'] == D.ByteTokenizer().metadata()

    text_cfg = data_config()
    text_cfg.source, text_cfg.text.document = 'text', 'block'
    text_cfg.text.valid_files = str(corpus / '*.txt')
    shard_cfg = data_config()
    shard_cfg.source = 'array_record'
    shard_cfg.array_record.valid_files = str(out)  # a directory: its *.array_record shards
    text, shards = valid_batches(text_cfg), valid_batches(shard_cfg)
    assert sum(int(b['segment_ids'].astype(bool).sum()) for b in text) > 100
    for a, b in zip(text, shards):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert meta['num_tokens'] == sum(len(D.ByteTokenizer().encode(f'document {i}-{j}: ' + '日本語 ' * j)) + 2
                                     for i in range(2) for j in range(7))


def test_prepare_bad_records_raise_or_skip(tmp_path):
    path = tmp_path / 'd.jsonl'
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n{"txt": "x"}\n{"text": "also fine"}\n')
    with pytest.raises(D.DataError, match=r'd\.jsonl:2: invalid_utf8'):
        prepare.prepare(str(path), str(tmp_path / 'a'), fmt='jsonl', progress=False)
    meta = prepare.prepare(str(path), str(tmp_path / 'b'), fmt='jsonl', on_error='skip', progress=False)
    assert meta['num_records'] == 2
    assert meta['skipped']['invalid_utf8'] == 1 and meta['skipped']['missing_field'] == 1
