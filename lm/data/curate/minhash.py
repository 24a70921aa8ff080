"""MinHash signatures (datasketch, 'affine32' scheme) of n-gram shingles, and LSH band keys.

A document's shingles are its word n-grams (lower-cased words of letters and digits), or its
character n-grams (spaces removed) when its language label is unspaced (Japanese, Chinese, Thai,
...). A document shorter than n tokens is one shingle. Shingles are hashed with CRC-32 (stable
across processes and machines, unlike Python's hash()). Two documents whose shingle sets have
Jaccard similarity J agree on each signature entry with probability J; LSH with b bands of
r rows makes them candidates with probability 1 - (1 - J^r)^b.
"""

from __future__ import annotations

import re
import zlib

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


def signature(shingle_set: set[bytes], num_perm: int, seed: int) -> np.ndarray:
    """[num_perm] uint32: the MinHash of the set (all 0xffffffff for an empty set)."""
    from datasketch import MinHash

    key = (num_perm, seed)
    if key not in _PERMUTATIONS:
        _PERMUTATIONS[key] = MinHash(num_perm=num_perm, seed=seed).permutations
    m = MinHash(num_perm=num_perm, seed=seed, hashfunc=zlib.crc32, permutations=_PERMUTATIONS[key],
                scheme='affine32')
    m.update_batch(sorted(shingle_set))
    return np.asarray(m.hashvalues, dtype=np.uint32)


def band_keys(sig: np.ndarray, bands: int, rows: int) -> list[bytes]:
    """One key per band: the band's index and its rows' hash values."""
    return [b.to_bytes(2, 'little') + sig[b * rows:(b + 1) * rows].tobytes() for b in range(bands)]


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


def jaccard(a: set, b: set) -> float:
    """The exact Jaccard similarity |a & b| / |a | b| (1 for two empty sets)."""
    return len(a & b) / len(a | b) if a or b else 1.0
