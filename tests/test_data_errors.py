"""Bad input, every case in both policies: 'raise' names file:line and the problem, 'skip'
drops the record, counts it, and keeps every good record."""

import json
import os

import numpy as np
import pytest

import lm.data as D
from configs.data import data_config
from lm.data import prepare

GOOD = ['alpha one', 'beta two', 'gamma three']


def config(source, files, **sub):
    cfg = data_config()
    cfg.source = source
    block = cfg[source]
    block.train_files = files
    block.valid_files = files
    for k, v in sub.items():
        block[k] = v
    cfg.num_valid_batches = 4
    return cfg


def write_lines(path, lines):
    with open(path, 'wb') as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else line.encode('utf-8'))
            f.write(b'\n')
    return str(path)


def texts_in(batches, tok):
    """Decoded text of every segment (documents are short: one segment each)."""
    out = []
    for b in batches:
        for row in range(b['inputs'].shape[0]):
            seg = b['segment_ids'][row]
            for s in range(1, seg.max() + 1):
                idx = np.flatnonzero(seg == s)
                ids = list(b['inputs'][row, idx]) + [b['targets'][row, idx[-1]]]
                out.append(tok.decode(ids, skip_special=True))
    return out


def run(cfg, on_error):
    cfg.on_error = on_error
    valid = D.build_iterator(cfg, split='valid', batch_size=2, seq_len=64, seed=0)
    batches = list(valid)
    return batches, valid.error_counts()


def jsonl(records):
    return [r if isinstance(r, (str, bytes)) else json.dumps(r, ensure_ascii=False) for r in records]


CASES = {
    # name: (source, file lines with the bad record at line 2, sub-config, kind, detail regex)
    'malformed_json': ('jsonl', jsonl([{'text': GOOD[0]}, '{"text": "unterminated', {'text': GOOD[1]}]),
                       {}, 'malformed_json', 'column'),
    'missing_field': ('jsonl', jsonl([{'text': GOOD[0]}, {'body': 'x'}, {'text': GOOD[1]}]),
                      {}, 'missing_field', "no 'text' field"),
    'wrong_type': ('jsonl', jsonl([{'text': GOOD[0]}, {'text': 5}, {'text': GOOD[1]}]),
                   {}, 'wrong_type', 'must be a string'),
    'invalid_utf8': ('text', [GOOD[0].encode(), b'caf\xe9 latin-1', GOOD[1].encode()],
                     {'document': 'line'}, 'invalid_utf8', '0xe9 at offset 3 of the document'),
    'empty_line': ('text', [GOOD[0], '', GOOD[1]], {'document': 'line'}, 'empty_document', 'no text'),
    'empty_text': ('jsonl', jsonl([{'text': GOOD[0]}, {'text': ''}, {'text': GOOD[1]}]),
                   {}, 'empty_document', 'no text'),
    'unknown_role': ('chat_jsonl', jsonl([
        {'messages': [{'role': 'user', 'content': GOOD[0]}]},
        {'messages': [{'role': 'wizard', 'content': 'x'}]},
        {'messages': [{'role': 'assistant', 'content': GOOD[1]}]}]), {}, 'unknown_role', "'wizard'"),
    'chat_missing_content': ('chat_jsonl', jsonl([
        {'messages': [{'role': 'user', 'content': GOOD[0]}]},
        {'messages': [{'role': 'user'}]},
        {'messages': [{'role': 'assistant', 'content': GOOD[1]}]}]), {}, 'missing_field', "'content'"),
    'chat_empty': ('chat_jsonl', jsonl([
        {'messages': [{'role': 'user', 'content': GOOD[0]}]}, {'messages': []},
        {'messages': [{'role': 'assistant', 'content': GOOD[1]}]}]), {}, 'empty_document', 'no messages'),
}


@pytest.mark.parametrize('name', sorted(CASES))
def test_bad_record_raise_names_file_line_and_problem(tmp_path, name):
    source, lines, sub, kind, detail = CASES[name]
    path = write_lines(tmp_path / 'data.txt', lines)
    with pytest.raises(D.DataError) as e:
        run(config(source, path, **sub), 'raise')
    message = str(e.value)
    assert f'{path}:2: {kind}' in message
    assert __import__('re').search(detail, message), message


@pytest.mark.parametrize('name', sorted(CASES))
def test_bad_record_skip_counts_and_keeps_good_records(tmp_path, name):
    source, lines, sub, kind, _ = CASES[name]
    path = write_lines(tmp_path / 'data.txt', lines)
    batches, counts = run(config(source, path, **sub), 'skip')
    assert counts == {k: int(k == kind) for k in D.ERROR_KINDS}
    texts = ''.join(texts_in(batches, D.ByteTokenizer()))
    assert GOOD[0] in texts and GOOD[1] in texts


def test_invalid_utf8_inside_a_whole_file_document_names_its_line(tmp_path):
    path = tmp_path / 'doc.txt'
    path.write_bytes(b'first line\nsecond line\nthird \xff line\n')
    cfg = config('text', str(path), document='file')
    with pytest.raises(D.DataError, match=f'{path}:3: invalid_utf8: byte 0xff at offset 29'):
        run(cfg, 'raise')


def test_skip_counts_accumulate_in_train_iterator_and_its_state(tmp_path):
    path = write_lines(tmp_path / 'd.jsonl', jsonl([{'text': GOOD[0]}, 'nope', {'text': GOOD[1]}]))
    cfg = config('jsonl', path)
    cfg.on_error = 'skip'
    cfg.valid_fraction = 0.0
    train = D.build_iterator(cfg, split='train', batch_size=1, seq_len=8, seed=0)
    for _ in range(12):  # several epochs of 3 records
        next(train)
    counts = train.error_counts()['malformed_json']
    assert counts >= 3
    assert train.get_state()['error_counts']['malformed_json'] == counts
    assert train.stats()['skipped/total'] == counts


def write_shard(tmp_path, records, tok):
    from array_record.python.array_record_module import ArrayRecordWriter
    writer = ArrayRecordWriter(str(tmp_path / 'shard-00000.array_record'), 'group_size:1')
    for r in records:
        writer.write(r)
    writer.close()
    meta = {'format': prepare.FORMAT, 'dtype': '<u2', 'tokenizer': tok.metadata()}
    (tmp_path / 'metadata.json').write_text(json.dumps(meta))
    return str(tmp_path / '*.array_record')


@pytest.mark.parametrize('kind,bad', [
    ('token_out_of_vocab', np.array([65, 263, 66], '<u2').tobytes()),
    ('malformed_record', b'\x41\x00\x42'),
    ('empty_document', b''),
])
def test_array_record_bad_records_both_policies(tmp_path, kind, bad):
    tok = D.ByteTokenizer()
    good = [np.array([tok.bos_id, *tok.encode(t), tok.eos_id], '<u2').tobytes() for t in GOOD[:2]]
    files = write_shard(tmp_path, [good[0], bad, good[1]], tok)
    cfg = config('array_record', files)
    with pytest.raises(D.DataError, match=f'shard-00000.array_record#1: {kind}'):
        run(cfg, 'raise')
    batches, counts = run(cfg, 'skip')
    assert counts[kind] == 1 and sum(counts.values()) == 1
    texts = texts_in(batches, tok)
    assert GOOD[0] in texts and GOOD[1] in texts


def test_array_record_tokenizer_mismatch_is_a_clear_error(tmp_path, monkeypatch):
    tok = D.ByteTokenizer()
    files = write_shard(tmp_path, [np.array([65, 66], '<u2').tobytes()], tok)
    meta = json.loads((tmp_path / 'metadata.json').read_text())
    meta['tokenizer']['special_ids']['eos'] = 2
    (tmp_path / 'metadata.json').write_text(json.dumps(meta))
    with pytest.raises(D.TokenizerMismatchError, match="special token 'eos'"):
        run(config('array_record', files), 'raise')


def test_unknown_policy_and_source_are_errors(tmp_path):
    cfg = data_config()
    cfg.on_error = 'ignore'
    with pytest.raises(ValueError, match='on_error'):
        D.build_iterator(cfg, split='train', batch_size=1, seq_len=8, seed=0)
    cfg = data_config()
    cfg.source = 'txt'
    with pytest.raises(ValueError, match='data.source'):
        D.build_iterator(cfg, split='train', batch_size=1, seq_len=8, seed=0)
    assert os.path.exists(tmp_path)


@pytest.mark.parametrize('overflow, counted', [('truncate_left', 'history_truncated'), ('drop', 'conversation_too_long')])
def test_chat_longer_than_a_row_is_truncated_or_dropped_and_counted(tmp_path, overflow, counted):
    """A 4-exchange chat that cannot fit a 64-token row: its oldest turns are cut (kept and
    counted) or it is dropped (a bad record, counted under 'skip'); a short chat is untouched."""
    long = {'messages': [m for i in range(4) for m in (
        {'role': 'user', 'content': f'question number {i} is here'},
        {'role': 'assistant', 'content': f'answer {i}'})]}
    short = {'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}]}
    path = write_lines(tmp_path / 'chat.jsonl', jsonl([long, short]))
    cfg = config('chat_jsonl', path)
    cfg.chat_overflow = overflow
    batches, counts = run(cfg, 'skip')
    assert counts == {k: int(k == counted) for k in D.ERROR_KINDS}
    texts = texts_in(batches, D.ByteTokenizer())
    assert any(t.endswith('hiyo') for t in texts)  # the short chat, whole
    if overflow == 'truncate_left':  # the last exchange kept whole, the first cut away
        assert any('answer 3' in t and 'question number 0' not in t for t in texts)
    else:
        assert not any('answer' in t for t in texts)
