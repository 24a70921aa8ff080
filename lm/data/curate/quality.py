"""Quality heuristics: Gopher (Rae et al. 2021, appendix A) and C4 (Raffel et al. 2020) rules with
their published thresholds, and rules for Japanese text.

Each check returns the name of the first rule a document fails (the removal reason), or None.
Which rules apply is chosen by the language label: 'ja' gets the Japanese rules (character
counts, hiragana / katakana / Japanese-script ratios) instead of the word-based Gopher rules;
every language gets the repetition and C4 rules. Pure functions of (text, config).
"""

from __future__ import annotations

import re
from collections import Counter

from lm.data.curate.config import parse_ngram_thresholds

STOP_WORDS = frozenset(('the', 'be', 'to', 'of', 'and', 'that', 'have', 'with'))  # Gopher's list
BULLETS = ('•', '‣', '◦', '●', '○', '▪', '-', '*', '·')
TERMINAL = ('.', '!', '?', '"', "'", '”', '’', '。', '！', '？', '」', '』', '…')
_PARAGRAPHS = re.compile(r'\n\s*\n')
_NO_LETTER_WORD = re.compile(r'(?<!\S)(?:[^\w\s]|[\d_])+(?!\S)')  # a whitespace-separated word without a letter
_HIRAGANA = re.compile('[\u3041-\u309f]')
_KATAKANA = re.compile('[\u30a0-\u30ff\uff66-\uff9f]')
_KANJI = re.compile('[\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff]')
_PUNCT_STRIP = '.,;:!?"\'()[]<>«»“”‘’…-—–'


class QualityRules:
    """The thresholds of a config's `quality` block, parsed once."""

    def __init__(self, q):
        self.q = q
        self.top_ngram = parse_ngram_thresholds(q.max_top_ngram_chars, 'quality.max_top_ngram_chars')
        self.dup_ngram = parse_ngram_thresholds(q.max_dup_ngram_chars, 'quality.max_dup_ngram_chars')

    def check(self, text: str, lang: str | None) -> str | None:
        """The first failed rule's name, or None when `text` passes (lang: the language label)."""
        if lang is None:
            lang = 'ja' if looks_japanese(text) else None
        reason = self.japanese(text) if lang == 'ja' else self.gopher(text, lang)
        return reason or self.repetition(text, words=lang != 'ja') or self.c4(text)

    def gopher(self, text: str, lang: str | None) -> str | None:
        q = self.q
        words = text.split()
        n = len(words)
        if n < q.min_words:
            return 'gopher_too_few_words'
        if n > q.max_words:
            return 'gopher_too_many_words'
        stripped = [w.strip(_PUNCT_STRIP) for w in words]
        mean_len = sum(map(len, stripped)) / n
        if not q.min_mean_word_length <= mean_len <= q.max_mean_word_length:
            return 'gopher_mean_word_length'
        symbols = text.count('#') + text.count('...') + text.count('…')
        if symbols / n > q.max_symbol_word_ratio:
            return 'gopher_symbol_word_ratio'
        lines = [line for line in text.split('\n') if line.strip()]
        if lines and sum(line.lstrip().startswith(BULLETS) for line in lines) / len(lines) > q.max_bullet_lines:
            return 'gopher_bullet_lines'
        if lines and sum(line.rstrip().endswith(('...', '…')) for line in lines) / len(lines) > q.max_ellipsis_lines:
            return 'gopher_ellipsis_lines'
        if 1 - len(_NO_LETTER_WORD.findall(text)) / n < q.min_alpha_words:
            return 'gopher_alpha_words'
        if lang in (None, 'en') and len(STOP_WORDS.intersection(w.lower() for w in stripped)) < q.min_stop_words:
            return 'gopher_stop_words'
        return None

    def repetition(self, text: str, words: bool = True) -> str | None:
        q = self.q
        for name, parts, max_frac, max_chars in (
                ('lines', [s for s in text.split('\n') if s.strip()], q.max_dup_lines, q.max_dup_line_chars),
                ('paragraphs', [s for s in _PARAGRAPHS.split(text) if s.strip()], q.max_dup_paragraphs,
                 q.max_dup_paragraph_chars)):
            dup, dup_chars = _duplicates(parts)
            total_chars = sum(map(len, parts)) or 1
            if parts and dup / len(parts) > max_frac:
                return f'gopher_dup_{name}'
            if dup_chars / total_chars > max_chars:
                return f'gopher_dup_{name[:-1]}_chars'
        if not words:
            return None
        tokens = text.split()
        total = sum(map(len, tokens)) or 1
        for n, limit in self.top_ngram.items():
            if len(tokens) >= n:
                grams = Counter(zip(*(tokens[i:] for i in range(n))))
                gram, count = grams.most_common(1)[0]
                if count > 1 and count * sum(map(len, gram)) / total > limit:
                    return f'gopher_top_{n}gram_chars'
        for n, limit in sorted(self.dup_ngram.items()):
            dup = _dup_ngram_chars(tokens, n) if len(tokens) >= n else 0
            if dup / total > limit:
                return f'gopher_dup_{n}gram_chars'
            if dup == 0:  # no repeated n-gram: no repeated longer one either
                break
        return None

    def c4(self, text: str) -> str | None:
        q = self.q
        lower = text.lower()
        if q.c4_lorem_ipsum and 'lorem ipsum' in lower:
            return 'c4_lorem_ipsum'
        if q.c4_curly_braces and '{' in text:
            return 'c4_curly_brace'
        lines = [line.rstrip() for line in text.split('\n') if line.strip()]
        if lines and sum(line.endswith(TERMINAL) for line in lines) / len(lines) < q.min_punctuation_lines:
            return 'c4_punctuation_lines'
        return None

    def japanese(self, text: str) -> str | None:
        q = self.q
        chars = ''.join(text.split())
        n = len(chars)
        if n < q.japanese_min_chars:
            return 'ja_too_few_chars'
        if n > q.japanese_max_chars:
            return 'ja_too_many_chars'
        hira, kata = len(_HIRAGANA.findall(chars)), len(_KATAKANA.findall(chars))
        if hira / n < q.japanese_min_hiragana:
            return 'ja_hiragana_ratio'
        if kata / n > q.japanese_max_katakana:
            return 'ja_katakana_ratio'
        if (hira + kata + len(_KANJI.findall(chars))) / n < q.japanese_min_japanese:
            return 'ja_japanese_ratio'
        return None


def looks_japanese(text: str) -> bool:
    """Kana in more than 10% of the non-space characters (a fallback without a language label)."""
    chars = ''.join(text.split()[:400])
    return bool(chars) and (len(_HIRAGANA.findall(chars)) + len(_KATAKANA.findall(chars))) / len(chars) > 0.1


def _duplicates(parts: list[str]) -> tuple[int, int]:
    """(parts equal to an earlier part, their characters)."""
    seen, dup, dup_chars = set(), 0, 0
    for p in parts:
        if p in seen:
            dup += 1
            dup_chars += len(p)
        seen.add(p)
    return dup, dup_chars


def _dup_ngram_chars(tokens: list[str], n: int) -> int:
    """Characters of the words covered by an n-gram that occurs more than once (each word once)."""
    grams = list(zip(*(tokens[i:] for i in range(n))))
    counts = Counter(grams)
    covered = bytearray(len(tokens))
    for i, g in enumerate(grams):
        if counts[g] > 1:
            covered[i:i + n] = b'\x01' * n
    return sum(len(t) for t, c in zip(tokens, covered) if c)
