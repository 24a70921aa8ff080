"""What a run says on the console, and its copy in the run directory.

    ConsoleLog    copies stdout and stderr to <run dir>/console.log (appended across resumes);
                  text printed before the run directory may be written (validation) is kept in
                  memory and written when `attach` is called, so a run that fails validation
                  writes nothing. A progress bar's carriage-return redraws keep only their last
                  state in the file.
    where_and_on_what(mesh, workdir)   the start-up lines: platform, devices, processes, mesh, run dir
    gpu_without_jax_gpu()              a warning when a GPU is visible but JAX runs on the CPU
    where_outputs_are(workdir)         the end lines: checkpoints, metrics, plot, summary, log
"""

from __future__ import annotations

import glob
import shutil
import sys
import time
from typing import Any

from lm.io import paths

LOG_NAME = "console.log"


class _Tee:
    def __init__(self, stream: Any, sink: "ConsoleLog"):
        self._stream, self._sink = stream, sink

    def write(self, text: str) -> int:
        self._sink.add(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...
        return getattr(self._stream, name)


class ConsoleLog:
    """Copies sys.stdout and sys.stderr (of this process) into console.log once attached."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._pending: list[str] = []  # complete lines not yet written
        self._partial = ""  # the current line, as far as printed
        self._file: paths.AppendFile | None = None
        self._streams = (sys.stdout, sys.stderr)
        if enabled:
            sys.stdout, sys.stderr = _Tee(sys.stdout, self), _Tee(sys.stderr, self)

    def add(self, text: str) -> None:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        self._pending += [line.rsplit("\r", 1)[-1] + "\n" for line in lines]  # a redrawn line: its last state
        self._partial = self._partial.rsplit("\r", 1)[-1]
        if self._file is not None and self._pending:
            self._file.write("".join(self._pending))
            self._pending = []

    def attach(self, workdir: str) -> str:
        """Start writing to <workdir>/console.log (what was printed so far first)."""
        path = paths.run_path(workdir) / LOG_NAME
        if self.enabled and self._file is None:
            self._file = paths.AppendFile(path)
            self._file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
            self.add("")
        return str(path)

    def note(self, text: str) -> None:
        """Write `text` to console.log only (once attached): e.g. the error that ends the run,
        which the excepthook prints after the streams are restored."""
        if self.enabled and self._file is not None:
            self.add("")
            self._file.write(text if text.endswith("\n") else text + "\n")

    def close(self) -> None:
        if not self.enabled:
            return
        sys.stdout, sys.stderr = self._streams
        if self._file is not None:
            if self._partial:
                self._pending.append(self._partial + "\n")
            self._file.write("".join(self._pending))
            self._file.close()
            self._file = None
        self.enabled = False


def gpu_present() -> bool:
    """An NVIDIA GPU is visible to this machine (nvidia-smi on PATH or /dev/nvidia<N>)."""
    return bool(shutil.which("nvidia-smi") or glob.glob("/dev/nvidia[0-9]*"))


def gpu_without_jax_gpu(backend: str) -> str | None:
    if backend == "cpu" and gpu_present():
        return ("WARNING: this machine has an NVIDIA GPU (nvidia-smi or /dev/nvidia*), but JAX runs on the CPU: "
                "its CUDA build is not installed. Install it with  pip install -e '.[gpu]'  (docs/gpu.md), or set "
                "JAX_PLATFORMS=cpu to train on the CPU on purpose.")
    return None


def where_and_on_what(mesh: Any, workdir: str) -> list[str]:
    """Start-up lines: where the run writes and what it runs on."""
    import jax

    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    lines = [f"run directory: {paths.run_path(workdir)}",
             f"platform: {jax.default_backend()}, {len(devices)} × {' / '.join(kinds)} "
             f"({jax.local_device_count()} on this host), {jax.process_count()} process(es); "
             f"mesh {dict(mesh.shape)}"]
    warning = gpu_without_jax_gpu(jax.default_backend())
    if warning:
        lines.append(warning)
    return lines


def where_outputs_are(workdir: str) -> list[str]:
    run = paths.run_path(workdir)
    names = [("checkpoints", "checkpoints/"), ("metrics", "metrics.jsonl"), ("loss plot", "loss.png"),
             ("summary", "summary.json"), ("config", "config.json"), ("console log", LOG_NAME)]
    present = [f"{what} {name}" for what, name in names if (run / name.rstrip("/")).exists()]
    return [f"outputs in {run}: " + ", ".join(present)]
