"""MinHash signatures (datasketch, 'affine32' scheme) of n-gram shingles, and LSH band keys.

A document's shingles are its word n-grams (lower-cased words of letters and digits), or its
character n-grams (spaces removed) when its language label is unspaced (Japanese, Chinese, Thai,
...). A document shorter than n tokens is one shingle. Each shingle is hashed to 32 bits by
hashing its tokens (a polynomial hash of a word's UTF-8 bytes, the code point of a character) and
combining the n token hashes with fixed odd multipliers, vectorized over the document in numpy: stable across
processes and machines (unlike Python's hash()), and no Python work per shingle. Two documents
whose shingle sets have Jaccard similarity J agree on each signature entry with probability J;
LSH with b bands of r rows makes them candidates with probability 1 - (1 - J^r)^b.
"""

from __future__ import annotations

import re

import numpy as np

_WORDS = re.compile(r'\w+')
_PERMUTATIONS = {}


def shingles(text: str, ngram: int, char_ngram: int, unspaced: bool) -> set[bytes]:
    if unspaced:
        chars = ''.join(text.split()).lower()
        n = char_ngram
        grams = {chars[i:i + n] for i in range(max(1, len(chars) - n + 1))}
    else:
        words = _WORDS.findall(text.lower())
        n = ngram
        grams = {' '.join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}
    return {g.encode('utf-8') for g in grams}


# ASCII bytes that are not \w (letters, digits, '_') -> space: for ASCII text the runs of other
# bytes are then exactly its \w+ words
_NOT_WORD = bytes(b if chr(b).isalnum() or b == ord('_') else 32 for b in range(128)) + bytes(range(128, 256))
_BASE = 0x100000001B3  # odd, so invertible modulo 2^64
_POWERS = [np.ones(1, np.uint64), np.ones(1, np.uint64)]  # BASE^i and BASE^-i (mod 2^64), grown on demand


def words_bytes(text: str) -> bytes:
    r"""The lower-cased \w+ words of `text` in UTF-8, separated by spaces (a fast path for ASCII)."""
    if text.isascii():
        return text.encode('ascii').lower().translate(_NOT_WORD)
    return b' '.join(w.encode('utf-8') for w in _WORDS.findall(text.lower()))


def words_utf8(text: str) -> list[bytes]:
    return words_bytes(text).split()


def _powers(n: int):
    if len(_POWERS[0]) < n:
        size = max(n, 2 * len(_POWERS[0]), 4096)
        with np.errstate(over='ignore'):
            one = np.ones(1, np.uint64)
            _POWERS[0] = np.concatenate((one, np.cumprod(np.full(size - 1, _BASE, np.uint64), dtype=np.uint64)))
            inverse = np.uint64(pow(_BASE, -1, 1 << 64))
            _POWERS[1] = np.concatenate((one, np.cumprod(np.full(size - 1, inverse, np.uint64), dtype=np.uint64)))
    return _POWERS[0], _POWERS[1]


def word_hashes(buf: bytes) -> np.ndarray:
    """[words] uint64: sum_i (byte_i + 1) * BASE^i over each space-separated word of `buf`, for all
    words at once (prefix sums of byte * BASE^position, shifted back by BASE^-start)."""
    a = np.frombuffer(buf, np.uint8)
    edges = np.diff(np.concatenate(([0], (a != 32).view(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    power, inverse = _powers(len(a) + 1)
    with np.errstate(over='ignore'):
        prefix = np.concatenate((np.zeros(1, np.uint64),
                                 np.cumsum((a.astype(np.uint64) + np.uint64(1)) * power[:len(a)], dtype=np.uint64)))
        return (prefix[ends] - prefix[starts]) * inverse[starts]


_MULTIPLIERS = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                         0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9],
                        dtype=np.uint64)


def shingle_hashes(text: str, ngram: int, char_ngram: int, unspaced: bool) -> np.ndarray:
    """[shingles] uint32: one hash per n-gram of `text` (the n-grams of `shingles`, repeats kept)."""
    if unspaced:
        tokens = np.frombuffer(''.join(text.split()).lower().encode('utf-32-le'), dtype=np.uint32)
        n = char_ngram
    else:
        tokens = word_hashes(words_bytes(text))
        n = ngram
    if len(tokens) == 0:
        return np.zeros(1, np.uint32)
    n = min(n, len(tokens))
    x = tokens.astype(np.uint64)
    count = len(x) - n + 1
    h = np.zeros(count, np.uint64)
    with np.errstate(over='ignore'):
        for k in range(n):  # sum_k token[i + k] * M_k  (mod 2^64), then fold to 32 bits
            h += x[k:k + count] * _MULTIPLIERS[k % len(_MULTIPLIERS)] + np.uint64(k + 1)
    return ((h >> np.uint64(32)) ^ h).astype(np.uint32)


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's affine32 permutation parameters (a odd, b) for (num_perm, seed), cached."""
    key = (num_perm, seed)
    if key not in _PERMUTATIONS:
        from datasketch import MinHash

        a, b = MinHash(num_perm=num_perm, seed=seed, scheme='affine32').permutations
        _PERMUTATIONS[key] = (np.asarray(a, np.uint32), np.asarray(b, np.uint32))
    return _PERMUTATIONS[key]


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (datasketch's pre-mix of every input hash)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def signature(hashes: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """[num_perm] uint32: the MinHash of the set of shingle hashes, exactly what datasketch's
    MinHash(scheme='affine32').update_batch gives (a test checks), vectorized over the document:
    min over shingles of a * fmix32(h) + b (mod 2^32)."""
    a, b = permutations(num_perm, seed)
    with np.errstate(over='ignore'):
        return (_fmix32(np.unique(hashes))[:, None] * a + b).min(axis=0)


def band_keys(sig: np.ndarray, bands: int, rows: int) -> list[bytes]:
    """One key per band: the band's index and its rows' hash values."""
    return [b.to_bytes(2, 'little') + sig[b * rows:(b + 1) * rows].tobytes() for b in range(bands)]


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


def jaccard(a: set, b: set) -> float:
    """The exact Jaccard similarity |a & b| / |a | b| (1 for two empty sets)."""
    return len(a & b) / len(a | b) if a or b else 1.0
