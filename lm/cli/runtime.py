"""Process-level settings that must be in place before the process starts.

XLA on the CPU allocates a step's temporaries afresh at every step (1.4 GB for the benchmark
model of benchmarks/bench_train.py). glibc serves blocks that large with mmap and unmaps them
at free, so every step page-faults all of its temporary memory in again: about a second of
kernel time per step there, ~10% of the step. Three glibc settings keep freed memory in the
heap instead (one arena, no mmap, no trimming), after which a step takes no page faults:

    MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736

glibc reads them once at start-up, so `tune_malloc()` re-executes the current command with
them set (same PID, same arguments). Set them yourself to skip the re-exec, or set
LM_TUNE_MALLOC=0 to run with glibc's defaults. The price: the process keeps its peak heap.
"""

from __future__ import annotations

import os
import sys

MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}


def malloc_tuned() -> bool:
    return all(os.environ.get(k) == v for k, v in MALLOC_ENV.items())


def tune_malloc() -> None:
    """Re-exec this command with MALLOC_ENV set (Linux only; no-op if set or LM_TUNE_MALLOC=0)."""
    if (not sys.platform.startswith("linux") or os.environ.get("LM_TUNE_MALLOC") == "0"
            or malloc_tuned() or os.environ.get("_LM_MALLOC_REEXEC")):
        return
    env = dict(os.environ, **MALLOC_ENV, _LM_MALLOC_REEXEC="1")  # the marker stops a loop
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
