"""Per-chip memory of fine-tuning llama_8b (configs/llama_8b.py) on a v5e-8 and a v6e-8 slice:
full fine-tuning, LoRA rank 16 over a bfloat16 base, and QLoRA rank 16 over an NF4 base, from
the real TPU compiler run without a TPU (jax.experimental.topologies: libtpu compiles for the
slice's topology on this CPU machine; nothing runs).

    python benchmarks/lora_memory.py [--layers 2,4] [--slices v5e-8,v6e-8] [--modes full,lora,qlora]

Per mode and slice (FSDP over the 8 chips, 8 rows of 2048 tokens, remat, fused loss):
  parameters, optimizer state   exact: the planned shapes and shardings, all 32 layers
  temporaries                   the compiled step's buffer assignment (memory_analysis) at the
                                --layers depths, extrapolated linearly to 32 layers (the layer
                                scan's saved activations grow with depth, the rest does not);
                                the 32-layer compile takes too long on this machine's shared cores
and whether the total fits 90% of the chip's HBM (v5e 16 GiB, v6e 32 GiB).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu's lockfile

import jax  # noqa: E402
from jax.experimental import topologies  # noqa: E402

GiB = 2**30
SLICES = {"v5e-8": ("v5e:2x4", 16), "v6e-8": ("v6e:2x4", 32)}  # topology, HBM GiB per chip
MODES = {"full": (0, "bfloat16"), "lora": (16, "bfloat16"), "qlora": (16, "nf4")}


def config_of(mode: str, layers: int):
    from configs import llama_8b

    c = llama_8b.get_config("v5p-128")
    c.mesh.update(data=1, fsdp=8, tensor=1)
    c.train.update(batch_size=8, seq_len=2048, micro_batches=1)
    rank, base_dtype = MODES[mode]
    c.lora.update(rank=rank, alpha=2.0 * max(rank, 1), base_dtype=base_dtype, block_size=64, targets="all")
    c.model.num_layers = layers
    return c


def plan(config, devices, compile_step: bool):
    """(params bytes, optimizer-state bytes, temporaries bytes or None) per chip."""
    from lm import train
    from lm.objectives import get as get_objective
    from lm.parallel import sharding as shd
    from lm.train import lora as lora_train
    from lm.train import memory
    from lm.train.optim import make_optimizer
    from lm.model import ModelConfig

    model_cfg = ModelConfig.from_config(config.model)
    optimizer, schedule = make_optimizer(config.optimizer, config.train.steps)
    mesh = shd.make_mesh(config.mesh, devices)
    model, frozen, make_loss, _ = lora_train.adapt(
        config, model_cfg, {}, lambda g: get_objective(config.objective).make_loss_fn(config, g), None)
    setup = train.plan_state(model, optimizer, mesh, config.mesh.rules, config.seed,
                             frozen={n: f.make_model for n, f in frozen.items()})
    sh = setup.state_shardings
    params = shd.per_device_bytes((setup.abstract_state.params, setup.abstract_frozen),
                                  (sh.params, setup.frozen_shardings))
    opt = shd.per_device_bytes(setup.abstract_state.opt_state, sh.opt_state)
    if not compile_step:
        return params, opt, None
    step = train.jit_train_step(train.make_train_step(make_loss(setup.graphdef), optimizer, schedule), setup)
    compiled = memory.compile_step(step, setup, config.train.batch_size, config.train.seq_len)
    return params, opt, int(compiled.memory_analysis().temp_size_in_bytes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", default="2,4", help="two depths compiled for the temporaries ('' : none)")
    p.add_argument("--slices", default="v5e-8,v6e-8")
    p.add_argument("--modes", default="full,lora,qlora")
    a = p.parse_args()
    depths = [int(x) for x in a.layers.split(",") if x]
    rows = []
    for slice_name in a.slices.split(","):
        topology, hbm = SLICES[slice_name]
        devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
        for mode in a.modes.split(","):
            params, opt, _ = plan(config_of(mode, 32), devices, compile_step=False)
            temps = []
            for n in depths:
                t0 = time.perf_counter()
                temps.append(plan(config_of(mode, n), devices, compile_step=True)[2])
                print(f"{slice_name} {mode}: {n} layers compiled in {time.perf_counter() - t0:.0f}s", flush=True)
            temp = None
            if len(depths) == 2:
                per_layer = (temps[1] - temps[0]) / (depths[1] - depths[0])
                temp = temps[0] + per_layer * (32 - depths[0])
            rows.append((slice_name, mode, params, opt, temp, hbm))
    print("\nllama_8b fine-tuning, per chip (FSDP 8, 8 × 2048 tokens, remat, fused loss); TPU compiler, no TPU\n")
    print("| slice | mode | parameters (GiB) | optimizer state (GiB) | temporaries (GiB, extrapolated) "
          "| total (GiB) | fits 90% of HBM |")
    print("|---|---|---:|---:|---:|---:|---|")
    for slice_name, mode, params, opt, temp, hbm in rows:
        total = params + opt + (temp or 0)
        fits = "?" if temp is None else ("yes" if total <= 0.9 * hbm * GiB else "no")
        temp_s = "—" if temp is None else f"{temp / GiB:.2f}"
        print(f"| {slice_name} ({hbm} GiB) | {mode} | {params / GiB:.2f} | {opt / GiB:.2f} | {temp_s} "
              f"| {total / GiB:.2f}{'' if temp is not None else ' + temporaries'} | {fits} |")


if __name__ == "__main__":
    main()
