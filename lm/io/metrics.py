"""Where metrics go: metrics.jsonl in the run directory, wandb (optional), a progress bar.

Only process 0 writes. `metrics.jsonl` holds one JSON object per logged step
(`step` first); on resume, lines at or after the restored step are dropped first,
so the file never holds a step twice.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import jax
import jax.numpy as jnp

from lm.io import paths
from lm.parallel import devices



def peak_source(configured: float = 0.0) -> str:
    """Where `peak_flops(configured)` takes its number from, without measuring anything."""
    kind = jax.devices()[0].device_kind
    if configured:
        return "train.peak_flops"
    if devices.peak_flops(kind):
        return f"vendor bf16 peak of {kind}"
    return f"measured: float32 matmul on {kind}"


def peak_flops(configured: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s per device, where it came from): the config's value, the vendor's dense bf16
    peak of a known accelerator (lm/parallel/devices.py), or (CPU and unknown devices) a matmul
    measured now."""
    source = peak_source(configured)
    if configured:
        return configured, source
    return devices.peak_flops(jax.devices()[0].device_kind) or measure_peak_flops(), source


def measure_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of one device on a jitted float32 [n, n] @ [n, n] matmul (best of `repeats`)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


class MetricsWriter:
    """Appends metrics to `<workdir>/metrics.jsonl` and, if enabled, to wandb."""

    def __init__(self, workdir: str, *, wandb_cfg: Any = None, config: Any = None, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = str(paths.run_path(workdir) / "metrics.jsonl")
        self.wandb = None
        if not self.enabled:
            return
        truncate_after(self.path, resume_step)
        self.file = paths.AppendFile(self.path)
        if wandb_cfg is not None and wandb_cfg.mode != "disabled":
            import wandb

            local = None if paths.is_remote(workdir) else workdir  # wandb's own files stay local
            self.wandb = wandb.init(project=wandb_cfg.project, name=wandb_cfg.name or paths.run_path(workdir).name,
                                    mode=wandb_cfg.mode, dir=local, resume="allow",
                config=config.to_dict() if config is not None else None)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=int(step))

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep them visible as strings
    return v


def truncate_after(path: str, step: int) -> None:
    """Drop lines of a metrics file whose step is > `step` (they are about to be redone)."""
    path = paths.run_path(path)
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)

    def keep(line: str) -> bool:  # a line cut off mid-write (crash, full disk) is dropped, not fatal
        try:
            return line.endswith("\n") and json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            return False

    kept = [line for line in lines if keep(line)]
    if len(kept) != len(lines):
        path.write_text("".join(kept))


def read_metrics(path: str) -> list[dict]:
    return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]
