"""Text normalization: invalid UTF-8 repaired, Unicode normal form, control characters, whitespace.

Input lines are decoded with 'surrogateescape', so a byte that is not UTF-8 survives as a lone
surrogate U+DC80..U+DCFF. `repair_utf8` decodes each run of such bytes as cp1252 (the usual
origin of stray bytes: Latin-1 / Windows text, 'caf\\xe9' -> 'café'); other lone surrogates
(from JSON escapes like "\\ud800") become U+FFFD.
"""

from __future__ import annotations

import re
import unicodedata

_SURROGATES = re.compile('[\ud800-\udfff]+')
_ESCAPED_BYTES = re.compile('[\udc80-\udcff]+')
# control characters (Cc) except tab and newline, plus format characters that hide text
_CONTROL = re.compile('[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u200e\u200f\u2028\u2029\u202a-\u202e\u2060-\u2064\ufeff]')
_SPACES = re.compile(r'[^\S\n]+')       # any whitespace but newline
_BLANK_LINES = re.compile(r'\n{3,}')


def has_invalid_utf8(text: str) -> bool:
    return _SURROGATES.search(text) is not None


def _decode_escaped(run: str) -> str:
    raw = bytes(ord(ch) - 0xDC00 for ch in run)
    return ''.join(bytes([b]).decode('cp1252', errors='replace') if b in (0x81, 0x8D, 0x8F, 0x90, 0x9D)
                   else bytes([b]).decode('cp1252') for b in raw)


def repair_utf8(text: str) -> str:
    """Lone surrogates -> text: escaped bytes decoded as cp1252, others U+FFFD."""
    if not has_invalid_utf8(text):
        return text
    text = _ESCAPED_BYTES.sub(lambda m: _decode_escaped(m.group()), text)
    return _SURROGATES.sub(lambda m: '\ufffd' * len(m.group()), text)


def normalize_text(text: str, form: str = 'NFKC') -> str:
    """Normal form, no control characters, one space between words, at most one blank line,
    no trailing spaces; '\\r\\n' and '\\r' become '\\n'."""
    text = text.replace('\r\n', '\n').replace('\r', '\n')
    if form != 'none':
        text = unicodedata.normalize(form, text)
    text = _CONTROL.sub('', text)
    lines = (_SPACES.sub(' ', line).strip() for line in text.split('\n'))
    return _BLANK_LINES.sub('\n\n', '\n'.join(lines)).strip()
