"""Per-chip memory of fine-tuning llama_8b (configs/llama_8b.py) on a v5e-8 and a v6e-8 slice:
full fine-tuning, LoRA rank 16 over a bfloat16 base, and QLoRA rank 16 over an NF4 base, from
the real TPU compiler run without a TPU (jax.experimental.topologies: libtpu compiles for the
slice's topology on this CPU machine; nothing runs).

    python benchmarks/lora_memory.py [--layers 32] [--slices v5e-8,v6e-8] [--modes full,lora,qlora]
        [--batch_size 8] [--seq_len 2048]

Per mode and slice (FSDP over the 8 chips, 8 rows of 2048 tokens by default, remat 'full', fused
loss, AdamW; the layers under lax.scan, model.scan_layers, so the full 32-layer step compiles in
about the time of one layer) it compiles the whole train step with `lm.train.memory.plan_config`
(the step `lm.train.memory --target=tpu` compiles) and prints, per chip:

  parameters, optimizer state   the planned shapes and shardings (trained params + frozen base)
  temporaries                   XLA's buffer assignment of the compiled step (memory_analysis)
  total                         arguments + outputs − donated (aliased) + temporaries
  fits                          total ≤ 90% of the chip's HBM (lm/parallel/devices.py's table: v5e
                                16 GB = 14.9 GiB, v6e 32 GB = 29.8 GiB; lm.train.memory's check)

When the step is larger than the chip's HBM the TPU compiler refuses it (RESOURCE_EXHAUSTED); the
row then takes the temporaries from the compiler's message and says so. And, as a cross-check, the earlier estimate: parameters + optimizer state alone (no gradients,
no activations), which is what this script printed before the compile was fast enough here.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu's lockfile

import jax  # noqa: E402
from jax.experimental import topologies  # noqa: E402

GiB = 2**30
SLICES = {"v5e-8": "v5e:2x4", "v6e-8": "v6e:2x4"}  # slice: TPU topology
MODES = {"full": (0, "bfloat16"), "lora": (16, "bfloat16"), "qlora": (16, "nf4")}


def config_of(mode: str, slice_name: str, layers: int, batch_size: int, seq_len: int):
    from configs import llama_8b

    c = llama_8b.get_config("v5p-128")
    c.mesh.update(data=1, fsdp=8, tensor=1, slice=slice_name)
    c.train.update(batch_size=batch_size, seq_len=seq_len, micro_batches=1)
    rank, base_dtype = MODES[mode]
    c.lora.update(rank=rank, alpha=2.0 * max(rank, 1), base_dtype=base_dtype, block_size=64, targets="all")
    c.model.num_layers = layers
    c.model.scan_layers = True
    c.distributed.auto = False
    return c


def refused(error: Exception, config, devices) -> "memory.MemoryReport":
    """The report of a step the TPU compiler refused ("RESOURCE_EXHAUSTED: ... HLO temporaries (18.13G)
    exceeds available HBM (15.75G)"): the temporaries from its message, parameters and optimizer state
    from the planned shardings, `refused_by_compiler` set. Any other error is raised again."""
    from lm import train
    from lm.model import ModelConfig
    from lm.parallel import sharding as shd
    from lm.train import lora as lora_train
    from lm.train import memory
    from lm.train.optim import make_optimizer

    m = re.search(r"HLO temporaries \(([0-9.]+)G\) exceeds available HBM \(([0-9.]+)G\)", str(error))
    if not m:
        raise error
    model, frozen, _, _ = lora_train.adapt(config, ModelConfig.from_config(config.model), {}, lambda g: None, None)
    optimizer, _ = make_optimizer(config.optimizer, config.train.steps)
    setup = train.plan_state(model, optimizer, shd.make_mesh(config.mesh, devices), config.mesh.rules, config.seed,
                             frozen={n: f.make_model for n, f in frozen.items()})
    sh = setup.state_shardings
    params = shd.per_device_bytes((setup.abstract_state.params, setup.abstract_frozen),
                                  (sh.params, setup.frozen_shardings))
    opt = shd.per_device_bytes(setup.abstract_state.opt_state, sh.opt_state)
    temp = int(float(m.group(1)) * GiB)
    report = memory.MemoryReport(params=params, opt_state=opt, arguments=params + opt, outputs=0, aliased=0,
                                 temporaries=temp, capacity=memory.device_capacity(0, devices[0], config.mesh.slice))
    report.refused_by_compiler = f"{m.group(1)} GiB of temporaries > {m.group(2)} GiB available"
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=32, help="layers compiled (32: llama_8b's full depth)")
    p.add_argument("--slices", default="v5e-8,v6e-8")
    p.add_argument("--modes", default="full,lora,qlora")
    p.add_argument("--batch_size", type=int, default=8, help="rows per step (global)")
    p.add_argument("--seq_len", type=int, default=2048, help="tokens per row")
    a = p.parse_args()
    from lm.train import memory

    rows = []
    for slice_name in a.slices.split(","):
        topology = SLICES[slice_name]
        devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
        for mode in a.modes.split(","):
            config = config_of(mode, slice_name, a.layers, a.batch_size, a.seq_len)
            t0 = time.perf_counter()
            try:
                _, report, info = memory.plan_config(config, devices)
            except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a program larger than HBM
                report = refused(e, config, devices)
                info = {"layers": config.model.num_layers, "params": 0}
            seconds = time.perf_counter() - t0
            print(f"{slice_name} {mode}: {info['layers']} layers, {info['params'] / 1e9:.3f}B trained params, "
                  f"compiled in {seconds:.0f}s; " + " ".join(report.lines()), flush=True)
            rows.append((slice_name, mode, report, seconds))
    print(f"\nllama_8b fine-tuning, per chip: FSDP 8, {a.batch_size} × {a.seq_len} tokens, remat full, fused loss, "
          f"{a.layers} layers (scan); the TPU compiler, deviceless\n")
    print("| slice | mode | parameters + frozen base (GiB) | optimizer state (GiB) | temporaries (GiB) "
          "| total (GiB) | fits 90% of HBM | estimate: params + optimizer (GiB) | compile (s) |")
    print("|---|---|---:|---:|---:|---:|---|---:|---:|")
    for slice_name, mode, r, seconds in rows:
        fits = {True: "yes", False: "no", None: "?"}[r.fits]
        refusal = getattr(r, "refused_by_compiler", "")
        if refusal:  # temporaries from the compiler's refusal; the total a lower bound (no batch, no outputs)
            fits = f"no: the compiler refuses it ({refusal})"
        print(f"| {slice_name} ({r.capacity / GiB:.1f} GiB) | {mode} | {r.params / GiB:.2f} | {r.opt_state / GiB:.2f} "
              f"| {r.temporaries / GiB:.2f} | {'≥ ' if refusal else ''}{r.total / GiB:.2f} | {fits} | {(r.params + r.opt_state) / GiB:.2f} "
              f"| {seconds:.0f} |")


if __name__ == "__main__":
    main()
