"""What would make a train step fit: variants of a config, each compiled and measured again.

`suggest` is what `python -m lm.train.memory` prints after "DOES NOT FIT" as its "Try:" line.
Nothing is guessed: every change it names was compiled on the same devices (the TPU compiler
or virtual CPUs) and its per-chip total came out within the budget. It tries, per kind of change,
the smallest step first and stops at the first that fits:

  more fsdp      move a factor 2 of `mesh.data` into `mesh.fsdp` (parameters and optimizer state
                 split further; the batch split stays the same)
  micro-batches  train.micro_batches × 2, × 4, × 8 (activations of a fraction of the batch at a time)
  remat          a policy that keeps less for the backward pass (lm/model/remat.py), the least
                 recompute first: save_dots, save_out_proj, save_qkv_proj, full
  smaller batch  train.batch_size / 2, / 4 (fewer tokens per step: changes the training itself)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lm.model import remat
from lm.parallel import sharding as shd

# model.remat policies from most kept (least recompute) to least kept
REMAT_LADDER = ("none", "save_dots", "save_out_proj", "save_qkv_proj", "full")


def _mesh_sizes(config: Any, num_devices: int) -> dict[str, int]:
    slices = 1
    for s in shd.dcn_shape(config.mesh):
        slices *= s
    return dict(zip(shd.MESH_AXES, shd.mesh_shape(config.mesh, num_devices // slices)))


def candidates(config: Any, num_devices: int) -> list[tuple[str, list[tuple[str, dict]]]]:
    """[(kind, [(description, {dotted key: value}), ...]), ...]: the variants to try, in order."""
    tc = config.train
    sizes = _mesh_sizes(config, num_devices)
    rows_split = sizes["data"] * sizes["fsdp"]
    out = []
    fsdp = []
    data, f = sizes["data"], sizes["fsdp"]
    while data % 2 == 0 and len(fsdp) < 3:
        data, f = data // 2, f * 2
        fsdp.append((f"mesh.data={data} mesh.fsdp={f}", {"mesh.data": data, "mesh.fsdp": f}))
    out.append(("more fsdp", fsdp))
    micro = []
    for k in (2, 4, 8):
        m = tc.micro_batches * k
        if tc.batch_size % (rows_split * m) == 0:
            micro.append((f"train.micro_batches={m}", {"train.micro_batches": m}))
    out.append(("micro-batches", micro))
    current = remat.canonical(config.model.remat)
    start = REMAT_LADDER.index(current) + 1 if current in REMAT_LADDER else len(REMAT_LADDER)
    out.append(("remat", [(f"model.remat='{p}'", {"model.remat": p}) for p in REMAT_LADDER[start:]]))
    smaller = []
    for k in (2, 4):
        b = tc.batch_size // k
        if tc.batch_size % k == 0 and b % (rows_split * tc.micro_batches) == 0:
            smaller.append((f"train.batch_size={b}", {"train.batch_size": b}))
    out.append(("smaller batch", smaller))
    return out


def variant(config: Any, overrides: dict) -> Any:
    """A copy of `config` with `overrides` ({'train.micro_batches': 4, ...}) applied."""
    new = config.copy_and_resolve_references()
    for key, value in overrides.items():
        *path, leaf = key.split(".")
        block = new
        for part in path:
            block = block[part]
        block[leaf] = value
    return new


def suggest(config: Any, devices: list | None, report: Any, log: Callable[[str], None] = print) -> list[str]:
    """The changes (one per kind, the smallest that fits) whose compiled step fits `report`'s budget."""
    import jax

    from lm.train.memory import _gib, plan_config

    budget = report.budget
    num_devices = len(devices) if devices is not None else jax.device_count()
    found = []
    for kind, tries in candidates(config, num_devices):
        for description, overrides in tries:
            _, new, _ = plan_config(variant(config, overrides), devices)
            ok = new.total <= budget
            log(f"  tried {description}: total {_gib(new.total)} per chip "
                f"({'fits' if ok else 'does not fit'} in {_gib(budget)})")
            if ok:
                found.append(f"{description} ({_gib(new.total)})")
                break
    return found
