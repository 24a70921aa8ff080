"""Run-directory paths through one layer (etils.epath, which orbax uses too), so a run
directory may be local or remote (`--workdir=gs://bucket/runs/x`) for checkpoints, config,
metrics, summary, plots and the console log alike.

    run_path(p)              -> epath.Path: local paths absolute (~ expanded), URLs kept as given
    is_remote(p)             a URL (gs://, s3://, ...) rather than a local path
    write_text / read_text   whole files, creating parent directories on write
    AppendFile(path)         a line log: appended in place locally; on object stores (which cannot
                             append) kept in memory and rewritten whole, at most every `flush_s`
"""

from __future__ import annotations

import os
import time
from typing import Any

from etils import epath


def is_remote(path: Any) -> bool:
    return "://" in os.fspath(path)


def run_path(path: Any) -> epath.Path:
    """`path` as an epath.Path: a local one absolute with ~ expanded, a URL unchanged."""
    text = os.fspath(path)
    if is_remote(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def write_text(path: Any, text: str) -> epath.Path:
    path = run_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_bytes(path: Any, data: bytes) -> epath.Path:
    path = run_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def read_text(path: Any) -> str:
    return run_path(path).read_text()


class AppendFile:
    """A text file that grows by appending (metrics.jsonl, console.log)."""

    def __init__(self, path: Any, *, flush_s: float = 30.0):
        self.path = run_path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.remote = is_remote(self.path)
        self.flush_s = flush_s
        if self.remote:
            self._text = self.path.read_text() if self.path.exists() else ""
            self._written = time.monotonic()
        else:
            self._file = open(self.path, "a")

    def write(self, text: str) -> None:
        if not self.remote:
            self._file.write(text)
            self._file.flush()
            return
        self._text += text
        if time.monotonic() - self._written >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        if self.remote:
            self.path.write_text(self._text)
            self._written = time.monotonic()
        else:
            self._file.flush()

    def close(self) -> None:
        if self.remote:
            self.flush()
        else:
            self._file.close()
