"""Bad input: what went wrong, where, and how it is counted.

A source that meets a bad record raises `BadRecord(kind, where, detail)`. The
pipeline then applies `data.on_error`:

  'raise' -> `DataError("path:line: kind: detail")` stops the run;
  'skip'  -> the record is dropped and counted under `kind`; the counts travel
             with the batches (an int64 vector `[len(ERROR_KINDS)]` per batch)
             and add up in `DataIterator.error_counts()`.

Nothing is lost silently: every dropped record is either an error or a count.
"""

from __future__ import annotations

import numpy as np

# Fixed order: position i of a per-batch count vector counts ERROR_KINDS[i].
ERROR_KINDS = (
    'malformed_json',       # a JSONL line that does not parse
    'missing_field',        # a required key (text field, messages, role, content) is absent
    'wrong_type',           # a field has the wrong JSON type (e.g. text is a number)
    'invalid_utf8',         # bytes that are not UTF-8
    'empty_document',       # a record with no text / no messages / no tokens
    'unknown_role',         # a chat message whose role is not system/user/assistant
    'token_out_of_vocab',   # a pre-tokenized id outside [0, vocab_size)
    'malformed_record',     # a pre-tokenized record whose bytes are not whole tokens
    'conversation_too_long',  # a chat that cannot fit one row (data.chat_overflow='drop', or its last answer alone)
    'history_truncated',    # NOT skipped: a chat kept with its oldest turns cut to fit a row (counted always)
    'identical_answers',    # a preference pair whose chosen and rejected answers are the same
)
ERROR_INDEX = {kind: i for i, kind in enumerate(ERROR_KINDS)}
ON_ERROR_POLICIES = ('raise', 'skip')


class DataError(ValueError):
    """A bad record under on_error='raise'. The message names file:line and the problem."""


class BadRecord(Exception):
    """Raised by a source for one bad record; the pipeline turns it into an error or a count.

    Attributes:
      kind: one of ERROR_KINDS.
      where: 'path:line' (text, JSONL) or 'path#record' (ArrayRecord) or a synthetic key.
      detail: human-readable description of the problem.
    """

    def __init__(self, kind: str, where: str, detail: str):
        if kind not in ERROR_INDEX:
            raise ValueError(f'unknown error kind {kind!r}; expected one of {ERROR_KINDS}')
        super().__init__(f'{where}: {kind}: {detail}')
        self.kind = kind
        self.where = where
        self.detail = detail


def zero_counts() -> np.ndarray:
    """[len(ERROR_KINDS)] int64 zeros."""
    return np.zeros(len(ERROR_KINDS), np.int64)


def counts_to_dict(counts) -> dict[str, int]:
    """Count vector -> {kind: count} with every kind present (0 included)."""
    return {kind: int(counts[i]) for i, kind in enumerate(ERROR_KINDS)}


def check_policy(on_error: str) -> str:
    if on_error not in ON_ERROR_POLICIES:
        raise ValueError(f'data.on_error must be one of {ON_ERROR_POLICIES}, got {on_error!r}')
    return on_error
