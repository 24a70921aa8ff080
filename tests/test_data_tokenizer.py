"""Tokenizers: exact round trips (日本語, invalid bytes), fixed special ids, metadata checks."""

import io
import json
import os

import numpy as np
import pytest

from lm.data import tokenizer as T

JAPANESE = '日本語のテキストです。改行も\nタブも\tそのまま。'
MIXED = 'Hello, world! ' + JAPANESE + ' emoji 🙂 and <|user|> typed by a user.'
CORPUS = [('the cat sat on the mat. 猫はマットの上に座った。 ' * 3 + str(i)) for i in range(200)]


@pytest.fixture(scope='module')
def bpe(tmp_path_factory):
    out = tmp_path_factory.mktemp('bpe')
    path = T.train_bpe(None, 320, str(out), texts=CORPUS, show_progress=False)
    return T.load_tokenizer(path)


@pytest.fixture(scope='module')
def sentencepiece_model(tmp_path_factory):
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=300, hard_vocab_limit=False, byte_fallback=True,
        character_coverage=1.0, normalization_rule_name='identity', remove_extra_whitespaces=False,
        minloglevel=2)
    path = tmp_path_factory.mktemp('sp') / 'm.model'
    path.write_bytes(model.getvalue())
    return str(path)


def test_byte_round_trip_japanese_and_ids_are_utf8_bytes():
    tok = T.ByteTokenizer()
    ids = tok.encode(JAPANESE)
    assert ids == list(JAPANESE.encode('utf-8'))
    assert tok.decode(ids) == JAPANESE


def test_byte_invalid_bytes_round_trip():
    tok = T.ByteTokenizer()
    raw = b'ok \xff\xfe \xe6\x97 broken'
    text = tok.decode(list(raw))
    assert tok.encode(text) == list(raw)
    assert tok.decode_bytes(tok.encode(text)) == raw


def test_byte_special_ids_fixed_and_never_produced_by_text():
    tok = T.ByteTokenizer()
    assert tok.vocab_size == 263
    assert tok.special_ids == {'pad': 256, 'bos': 257, 'eos': 258, 'system': 259, 'user': 260,
                               'assistant': 261, 'end_of_turn': 262}
    assert max(tok.encode(MIXED)) < 256
    assert tok.decode([72, tok.eos_id]) == 'H<|eos|>'
    assert tok.decode([72, tok.eos_id], skip_special=True) == 'H'


def test_bpe_round_trip_and_special_ids(bpe):
    assert [bpe.special_ids[n] for n in T.SPECIAL_NAMES] == list(range(7))
    for text in (MIXED, JAPANESE, CORPUS[3]):
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text
        assert min(ids) >= 7, 'plain text must never produce a special id'
    assert len(bpe.encode(CORPUS[0])) < len(CORPUS[0].encode()) / 2, 'BPE merged nothing'


def test_bpe_cli_writes_tokenizer_json_and_metadata(tmp_path):
    corpus = tmp_path / 'c.txt'
    corpus.write_text('\n'.join(CORPUS), encoding='utf-8')
    T.main(['train', '--files', str(tmp_path / '*.txt'), '--vocab_size', '300',
            '--output', str(tmp_path / 'tok')])
    tok = T.load_tokenizer(str(tmp_path / 'tok'))  # a directory holding tokenizer.json
    assert tok.decode(tok.encode(MIXED)) == MIXED
    T.check_metadata(T.load_metadata(str(tmp_path / 'tok')), tok.metadata())


def test_loaded_tokenizer_json_without_specials_gets_them_appended(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    vocab = {chr(c): i for i, c in enumerate(range(97, 123))}
    raw = Tokenizer(models.WordLevel(vocab, unk_token='a'))
    raw.pre_tokenizer = pre_tokenizers.Split('', 'isolated')
    raw.decoder = decoders.Fuse()
    raw.save(str(tmp_path / 'tokenizer.json'))
    tok = T.load_tokenizer(str(tmp_path / 'tokenizer.json'))
    assert tok.vocab_size == 26 + 7
    assert [tok.special_ids[n] for n in T.SPECIAL_NAMES] == list(range(26, 33))
    assert tok.decode(tok.encode('hello')) == 'hello'


def test_sentencepiece_round_trip_and_specials(sentencepiece_model):
    tok = T.load_tokenizer(sentencepiece_model)
    for text in (JAPANESE.replace('\n', ' ').replace('\t', ' '), 'the cat sat'):
        assert tok.decode(tok.encode(text)) == text
    ids = tok.special_ids
    assert len(set(ids.values())) == 7 and max(ids.values()) < tok.vocab_size
    assert tok.decode([tok.bos_id] + tok.encode('the cat') + [tok.end_of_turn_id]) == \
        '<|bos|>the cat<|end_of_turn|>'
    import pickle
    assert pickle.loads(pickle.dumps(tok)).encode('the cat') == tok.encode('the cat')


def test_metadata_saved_and_compared(tmp_path, bpe):
    path = T.ByteTokenizer().save_metadata(str(tmp_path))
    assert os.path.basename(path) == T.METADATA_FILE
    record = json.loads(open(path).read())
    assert record['vocab_size'] == 263 and record['special_ids']['eos'] == 258
    T.check_metadata(record, T.ByteTokenizer().metadata())
    with pytest.raises(T.TokenizerMismatchError) as e:
        T.check_metadata(record, bpe.metadata())
    message = str(e.value)
    assert 'vocab_size' in message and "'eos'" in message and '258' in message


def test_decode_rejects_ids_outside_vocab():
    with pytest.raises(ValueError, match='outside the vocabulary'):
        T.ByteTokenizer().decode([1, 263])


def test_encode_array_matches_encode(bpe):
    assert np.array_equal(bpe.encode_array(MIXED), np.array(bpe.encode(MIXED), np.int32))


def test_bulk_encode_matches_single_encode(bpe):
    texts = [MIXED, '', JAPANESE, 'x <|eos|> y']
    for tok in (bpe, T.ByteTokenizer()):
        assert [a.tolist() for a in tok.encode_batch(texts)] == [tok.encode(t) for t in texts]
