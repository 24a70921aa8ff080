"""The curation config: every stage's switches and thresholds, documented field by field.

    python -m lm.data.curate --input 'raw/*.jsonl.gz' --output curated \\
        --config=lm/data/curate/config.py --config.near_dedup.threshold=0.75

`validate(config)` runs before any pipeline is built: an unknown stage, a threshold outside
[0, 1], bands x rows != num_perm or a missing blocklist file is an error that names the key.
"""

from __future__ import annotations

import os

import ml_collections

STAGES = ('normalize', 'language', 'exact_dedup', 'near_dedup', 'quality', 'content')
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
EXAMPLE_BLOCKLISTS = {  # `--config.content.word_blocklist=example` picks the file shipped here
    'domain_blocklist': os.path.join(PACKAGE_DIR, 'blocklists', 'example_domains.txt'),
    'word_blocklist': os.path.join(PACKAGE_DIR, 'blocklists', 'example_words.txt'),
}


def get_config(arg: str = '') -> ml_collections.ConfigDict:
    """Defaults: what a datatrove / Dolma user expects (Gopher + C4 thresholds as published)."""
    del arg
    c = ml_collections.ConfigDict()
    c.stages = ','.join(STAGES)  # stages run, in this order (comma-separated subset of STAGES)

    c.input = ml_collections.ConfigDict()
    c.input.format = 'auto'      # 'auto' (by extension: .parquet, else JSONL, .gz decompressed) | 'jsonl' | 'parquet'
    c.input.text_field = 'text'  # key of the document text
    c.input.id_field = 'id'      # key of the document id; absent -> '<file relative to the input root>:<line>'
    c.input.url_field = 'url'    # key of the source URL (content.domain_blocklist); absent -> no domain check

    c.output = ml_collections.ConfigDict()
    c.output.num_shards = 4           # part-0000i-of-0000n files (fixed, so reruns give the same files)
    c.output.compression = 'none'     # 'none' (.jsonl, what lm.data.prepare reads) | 'gzip' (.jsonl.gz)
    c.output.samples_per_reason = 5   # removed documents kept in samples/<stage>.<reason>.jsonl (first in input order)
    c.output.write_removed = False    # also write removed/part-*.jsonl: {id, loc, stage, reason} of every removed document
    c.output.metadata_field = 'curate'  # key added to each kept document: {lang, lang_score, pii} ('' = none)

    c.normalize = ml_collections.ConfigDict()
    c.normalize.form = 'NFKC'         # Unicode normal form: 'NFKC' | 'NFC' | 'none'
    c.normalize.bad_utf8 = 'repair'   # invalid UTF-8 bytes: 'repair' (decode them as cp1252, counted) | 'drop' (remove the document)
    c.normalize.min_chars = 1         # documents shorter than this after normalization are removed ('empty')

    c.language = ml_collections.ConfigDict()
    c.language.keep = 'en,ja'         # languages kept (ISO 639 codes of fastText lid.176, comma-separated; '' = all)
    c.language.min_score = 0.65       # minimum fastText probability of the top language
    c.language.max_chars = 2000       # characters of each document the model reads

    c.near_dedup = ml_collections.ConfigDict()
    c.near_dedup.num_perm = 120       # MinHash permutations (= bands * rows)
    c.near_dedup.bands = 20           # LSH bands: documents sharing one band's hashes become candidates
    c.near_dedup.rows = 6             # hashes per band; P(candidate | J) = 1 - (1 - J^rows)^bands
    c.near_dedup.ngram = 5            # word n-gram shingles (spaced languages)
    c.near_dedup.char_ngram = 5       # character n-gram shingles for unspaced languages
    c.near_dedup.unspaced_languages = 'ja,zh,th,lo,km,my,bo'  # language labels shingled by characters
    c.near_dedup.threshold = 0.7      # candidate pairs with estimated Jaccard >= this are duplicates
    c.near_dedup.max_rounds = 6       # connected-component rounds (large-star + small-star each); unconverged nodes are counted
    c.near_dedup.seed = 1             # MinHash permutation seed

    c.quality = ml_collections.ConfigDict()
    c.quality.min_words = 50              # Gopher: words per document
    c.quality.max_words = 100_000         # Gopher
    c.quality.min_mean_word_length = 3.0  # Gopher: mean characters per word
    c.quality.max_mean_word_length = 10.0  # Gopher
    c.quality.max_symbol_word_ratio = 0.1  # Gopher: ('#' + ellipses) / words
    c.quality.max_bullet_lines = 0.9      # Gopher: fraction of lines starting with a bullet
    c.quality.max_ellipsis_lines = 0.3    # Gopher: fraction of lines ending with an ellipsis
    c.quality.min_alpha_words = 0.8       # Gopher: fraction of words with an alphabetic character
    c.quality.min_stop_words = 2          # Gopher: English stop words ('the', 'be', 'to', ...) present (English only)
    c.quality.max_dup_lines = 0.3         # Gopher repetition: fraction of lines that repeat an earlier line
    c.quality.max_dup_line_chars = 0.2    # Gopher repetition: fraction of characters in repeated lines
    c.quality.max_dup_paragraphs = 0.3    # Gopher repetition: same, paragraphs (blank-line separated)
    c.quality.max_dup_paragraph_chars = 0.2  # Gopher repetition
    c.quality.max_top_ngram_chars = '2:0.20,3:0.18,4:0.16'  # Gopher: characters in the most frequent n-gram
    c.quality.max_dup_ngram_chars = '5:0.15,6:0.14,7:0.13,8:0.12,9:0.11,10:0.10'  # Gopher: characters in repeated n-grams
    c.quality.c4_lorem_ipsum = True       # C4: remove documents containing 'lorem ipsum'
    c.quality.c4_curly_braces = True      # C4: remove documents containing '{' (code, templates)
    c.quality.min_punctuation_lines = 0.12  # C4-derived: fraction of lines ending in terminal punctuation
    c.quality.japanese_min_chars = 400    # Japanese (language label 'ja'): characters per document
    c.quality.japanese_max_chars = 100_000  # Japanese
    c.quality.japanese_min_hiragana = 0.2  # Japanese: hiragana / non-space characters
    c.quality.japanese_max_katakana = 0.5  # Japanese: katakana / non-space characters
    c.quality.japanese_min_japanese = 0.5  # Japanese: (hiragana + katakana + kanji) / non-space characters

    c.content = ml_collections.ConfigDict()
    c.content.domain_blocklist = ''   # file, one domain a line ('#' comments); subdomains match too. 'example' = the shipped list
    c.content.word_blocklist = ''     # file, one word or phrase a line, case-insensitive, whole words. 'example' = the shipped list
    c.content.min_blocked_words = 1   # documents with at least this many blocklist hits are removed
    c.content.mask_pii = 'email,phone,ip'  # PII kinds masked in kept documents (comma-separated subset; '' = none)
    c.content.email_mask = '<EMAIL>'  # replacement text per kind
    c.content.phone_mask = '<PHONE>'
    c.content.ip_mask = '<IP>'
    return c


def _in_unit(c, key):
    v = c
    for part in key.split('.'):
        v = v[part]
    if not 0.0 <= float(v) <= 1.0:
        raise ValueError(f'config.{key}={v} is outside [0, 1]')


def parse_ngram_thresholds(spec: str, key: str) -> dict[int, float]:
    """'2:0.20,3:0.18' -> {2: 0.2, 3: 0.18}; a malformed item is an error naming `key`."""
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(','))):
        try:
            n, t = item.split(':')
            out[int(n)] = float(t)
        except ValueError:
            raise ValueError(f"config.{key}: '{item}' is not 'n:fraction' (e.g. '2:0.20')") from None
        if not 0.0 <= out[int(n)] <= 1.0 or int(n) < 1:
            raise ValueError(f"config.{key}: '{item}' needs n >= 1 and a fraction in [0, 1]")
    return out


def stage_list(c) -> list[str]:
    stages = [s.strip() for s in c.stages.split(',') if s.strip()]
    for s in stages:
        if s not in STAGES:
            import difflib
            close = difflib.get_close_matches(s, STAGES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ''
            raise ValueError(f"config.stages: unknown stage '{s}'{hint}; stages are {', '.join(STAGES)}")
    if len(set(stages)) != len(stages):
        raise ValueError(f'config.stages: a stage is listed twice: {c.stages}')
    return stages


def resolve_blocklist(path: str, key: str) -> str:
    path = EXAMPLE_BLOCKLISTS[key] if path == 'example' else path
    if path and not os.path.isfile(path):
        raise ValueError(f"config.content.{key}='{path}' is not a file (one entry a line; 'example' = the shipped list)")
    return path


def validate(c) -> list[str]:
    """Checks `c` before anything runs; returns the stage list."""
    stages = stage_list(c)
    for key in ('language.min_score', 'near_dedup.threshold', 'quality.max_symbol_word_ratio',
                'quality.max_bullet_lines', 'quality.max_ellipsis_lines', 'quality.min_alpha_words',
                'quality.max_dup_lines', 'quality.max_dup_line_chars', 'quality.max_dup_paragraphs',
                'quality.max_dup_paragraph_chars', 'quality.min_punctuation_lines',
                'quality.japanese_min_hiragana', 'quality.japanese_max_katakana', 'quality.japanese_min_japanese'):
        _in_unit(c, key)
    parse_ngram_thresholds(c.quality.max_top_ngram_chars, 'quality.max_top_ngram_chars')
    parse_ngram_thresholds(c.quality.max_dup_ngram_chars, 'quality.max_dup_ngram_chars')
    nd = c.near_dedup
    if nd.bands * nd.rows != nd.num_perm or nd.bands < 1 or nd.rows < 1:
        raise ValueError(f'config.near_dedup: bands ({nd.bands}) x rows ({nd.rows}) must equal num_perm ({nd.num_perm})')
    if nd.ngram < 1 or nd.char_ngram < 1 or nd.max_rounds < 1:
        raise ValueError('config.near_dedup: ngram, char_ngram and max_rounds must be >= 1')
    if c.normalize.bad_utf8 not in ('repair', 'drop'):
        raise ValueError(f"config.normalize.bad_utf8='{c.normalize.bad_utf8}': use 'repair' or 'drop'")
    if c.normalize.form not in ('NFKC', 'NFC', 'none'):
        raise ValueError(f"config.normalize.form='{c.normalize.form}': use 'NFKC', 'NFC' or 'none'")
    if c.input.format not in ('auto', 'jsonl', 'parquet'):
        raise ValueError(f"config.input.format='{c.input.format}': use 'auto', 'jsonl' or 'parquet'")
    if c.output.compression not in ('none', 'gzip'):
        raise ValueError(f"config.output.compression='{c.output.compression}': use 'none' or 'gzip'")
    if c.output.num_shards < 1:
        raise ValueError(f'config.output.num_shards={c.output.num_shards} must be >= 1')
    for kind in filter(None, c.content.mask_pii.split(',')):
        if kind.strip() not in ('email', 'phone', 'ip'):
            raise ValueError(f"config.content.mask_pii: unknown kind '{kind}'; kinds are email, phone, ip")
    for key in ('domain_blocklist', 'word_blocklist'):
        resolve_blocklist(c.content[key], key)
    return stages
