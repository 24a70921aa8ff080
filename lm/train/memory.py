"""Per-device memory of a train step, and an early, clear failure when it cannot fit.

Before the first step the trainer compiles the step on abstract inputs (no array exists yet)
and reports, per device:

    parameters       the state's params (and any frozen models') as laid out by the sharding rules
    optimizer state  likewise (Adam: two more copies of the params)
    temporaries      activations, gradients, gathered weights, collectives' buffers:
                     XLA's buffer assignment for the compiled step (memory_analysis)
    total            arguments + outputs − donated (aliased) + temporaries

and raises `DoesNotFit` when the total exceeds `config.mesh.memory_fraction` of the device's
memory (`config.mesh.device_memory_gib`, else what the device reports; CPUs report nothing,
so there the check is skipped unless a size is configured).

The same code checks a TPU-sized config on this machine: `python -m lm.train.memory
--config=configs/llama_8b.py:v5p-128` compiles its real train step against a virtual CPU
mesh of the slice's size (a subprocess with --xla_force_host_platform_device_count=N) —
compile only, never run — and prints the report. CPU and TPU compilers fuse and lay out
differently, so the temporaries are an estimate of the TPU's, not its measurement.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax

from lm.data import batch as contract
from lm.parallel import sharding as shd

GiB = 2**30


class DoesNotFit(MemoryError):
    """The compiled step needs more memory per device than the device has."""


@dataclasses.dataclass
class MemoryReport:
    """Bytes per device."""

    params: int
    opt_state: int
    arguments: int  # all inputs of the step: state + batch
    outputs: int
    aliased: int  # outputs written in place of donated inputs (the new state)
    temporaries: int
    capacity: int | None  # the device's memory, None where unknown
    fraction: float = 0.9  # share of `capacity` the step may use

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.total <= self.fraction * self.capacity

    def lines(self) -> list[str]:
        cap = (f"{self.capacity / GiB:.2f} GiB × {self.fraction:g} = {self.fraction * self.capacity / GiB:.2f} GiB"
               if self.capacity else "unknown (no check)")
        return [f"memory per device: parameters {_gib(self.params)}, optimizer state {_gib(self.opt_state)}, "
                f"temporaries {_gib(self.temporaries)} (compiled step)",
                f"  total {_gib(self.total)} = arguments {_gib(self.arguments)} + outputs {_gib(self.outputs)} "
                f"- donated {_gib(self.aliased)} + temporaries; available {cap}"]


def _gib(n: int) -> str:
    return f"{n / GiB:.3f} GiB" if n >= 0.1 * GiB else f"{n / 2**20:.1f} MiB"


def device_capacity(configured_gib: float = 0.0, device: Any = None) -> int | None:
    """Bytes of memory per device: `configured_gib` if > 0, else the device's `bytes_limit`
    (TPU and GPU report one), else None."""
    if configured_gib and configured_gib > 0:
        return int(configured_gib * GiB)
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 — some backends do not implement it
        stats = None
    return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def abstract_batch(mesh: jax.sharding.Mesh, batch_size: int, seq_len: int, kind: str = "tokens") -> dict:
    """ShapeDtypeStructs of a global batch of `kind` (lm/data/batch.py), split over (data, fsdp)."""
    sharding = shd.batch_sharding(mesh)
    return contract.spec(kind, batch_size, seq_len,
                         make=lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding))


def abstract_state(setup: Any) -> Any:
    """The train state as ShapeDtypeStructs carrying their shardings (from train.plan_state)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        setup.abstract_state, setup.state_shardings)


def compile_step(jitted_step: Any, setup: Any, batch_size: int, seq_len: int, batch_kind: str = "tokens") -> Any:
    """`jitted_step.lower(...).compile()` on abstract inputs: nothing is allocated or run.
    The result is callable like the jitted step (same shardings, state donated)."""
    frozen = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          setup.abstract_frozen, setup.frozen_shardings)
    return jitted_step.lower(abstract_state(setup), abstract_batch(setup.mesh, batch_size, seq_len, batch_kind),
                             *((frozen,) if setup.frozen_graphdefs else ())).compile()


def analyze(compiled: Any, setup: Any, capacity: int | None, fraction: float = 0.9) -> MemoryReport:
    """The report of a compiled train step (see the module docstring)."""
    stats = compiled.memory_analysis()
    sh = setup.state_shardings
    return MemoryReport(
        params=shd.per_device_bytes((setup.abstract_state.params, setup.abstract_frozen),
                                    (sh.params, setup.frozen_shardings)),
        opt_state=shd.per_device_bytes(setup.abstract_state.opt_state, sh.opt_state),
        arguments=int(stats.argument_size_in_bytes), outputs=int(stats.output_size_in_bytes),
        aliased=int(stats.alias_size_in_bytes), temporaries=int(stats.temp_size_in_bytes),
        capacity=capacity, fraction=fraction)


def check(report: MemoryReport, mesh: jax.sharding.Mesh, micro_batches: int = 1) -> None:
    """Raise DoesNotFit, saying by how much and what to change, if the step cannot fit."""
    if report.fits:
        return
    shape = dict(mesh.shape)
    hints = []
    if report.params + report.opt_state > 0.5 * report.fraction * report.capacity:
        hints.append("split parameters and optimizer state further (a larger mesh.fsdp, or mesh.tensor)")
    if report.temporaries > 0.3 * report.total:
        hints.append(f"cut activations: model.remat=True, more train.micro_batches (now {micro_batches}), "
                     "loss.kind='fused', a smaller train.batch_size or train.seq_len")
    raise DoesNotFit(
        f"the train step needs {_gib(report.total)} per device but {report.fraction:g} × "
        f"{_gib(report.capacity)} = {_gib(int(report.fraction * report.capacity))} is available on mesh "
        f"{shape} (parameters {_gib(report.params)}, optimizer state {_gib(report.opt_state)}, temporaries "
        f"{_gib(report.temporaries)}). Try: {'; '.join(hints) or 'a larger slice'}. "
        "(config.mesh.device_memory_gib / memory_fraction set the budget.)")


def compile_and_check(jitted_step: Any, setup: Any, config: Any, log: Callable[[str], None] = print,
                      batch_kind: str = "tokens") -> Any:
    """Compile the step on abstract inputs, log the per-device report, raise DoesNotFit if it
    cannot fit; return the compiled step (call it instead of the jitted one: no second compile)."""
    tc, mc = config.train, config.mesh
    compiled = compile_step(jitted_step, setup, tc.batch_size, tc.seq_len, batch_kind)
    report = analyze(compiled, setup, device_capacity(mc.get("device_memory_gib", 0.0)),
                     mc.get("memory_fraction", 0.9))
    for line in report.lines():
        log(line)
    check(report, setup.mesh, tc.micro_batches)
    return compiled


# -- a config's step on a virtual mesh -------------------------------------------------------------


def plan_config(config: Any, devices: list | None = None) -> tuple[Any, MemoryReport, dict]:
    """Build `config`'s real train step on `devices` (default: all), compile it on abstract
    inputs and report. Returns (compiled, report, info)."""
    from lm import train
    from lm.model import ModelConfig, param_count
    from lm.objectives import get as get_objective
    from lm.train.optim import make_optimizer

    model_cfg = ModelConfig.from_config(config.model)  # no tokenizer is read here: model.vocab_size must be set
    tc = config.train
    optimizer, schedule = make_optimizer(config.optimizer, tc.steps)
    mesh = shd.make_mesh(config.mesh, devices)
    t0 = time.perf_counter()
    from lm.train import lora as lora_train

    # config.lora.rank > 0: the adapters are the parameters, the base a frozen model (lm/train/lora.py)
    model, frozen, make_loss, _ = lora_train.adapt(
        config, model_cfg, {}, lambda graphdef: get_objective(config.objective).make_loss_fn(config, graphdef), None)
    setup = train.plan_state(model, optimizer, mesh, config.mesh.rules, config.seed,
                             frozen={name: f.make_model for name, f in frozen.items()})
    loss_fn = make_loss(setup.graphdef)
    step = train.jit_train_step(train.make_train_step(loss_fn, optimizer, schedule, tc.micro_batches), setup)
    compiled = compile_step(step, setup, tc.batch_size, tc.seq_len)
    seconds = time.perf_counter() - t0
    report = analyze(compiled, setup, device_capacity(config.mesh.device_memory_gib),
                     config.mesh.memory_fraction)
    info = {"params": param_count(setup.abstract_state.params), "mesh": dict(mesh.shape),
            "compile_s": seconds, "layers": model_cfg.num_layers}
    return compiled, report, info


def _main(argv: list[str]) -> int:
    """python -m lm.train.memory --config=FILE[:ARG] [--devices=N] [--layers=L] [--config.a.b=v ...]"""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config to plan.", lock_config=True)
    flags.DEFINE_integer("devices", 0, "Virtual CPU devices to compile for; 0: the mesh's fixed size.")
    flags.DEFINE_integer("layers", 0, "Compile with this many layers (same widths), 0: the config's.")
    flags.FLAGS(argv)
    config = flags.FLAGS.config
    sizes = [config.mesh[a] for a in shd.MESH_AXES]
    devices = flags.FLAGS.devices or (math.prod(sizes) if -1 not in sizes else 0)
    if devices and os.environ.get("LM_MEMORY_DEVICES") != str(devices):  # re-run with N virtual CPUs
        flags_env = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags_env.strip(), LM_MEMORY_DEVICES=str(devices))
        return subprocess.call([sys.executable, "-m", "lm.train.memory", *argv[1:]], env=env)
    if devices and jax.device_count() != devices:
        raise RuntimeError(f"lm.train.memory: wanted {devices} devices, JAX has {jax.device_count()}")
    if flags.FLAGS.layers:
        config.model.num_layers = flags.FLAGS.layers
    config.distributed.auto = False
    _, report, info = plan_config(config)
    print(f"{info['params'] / 1e9:.3f}B parameters ({info['layers']} layers), mesh {info['mesh']} on "
          f"{jax.device_count()} {jax.devices()[0].platform} devices; compiled in {info['compile_s']:.1f}s")
    for line in report.lines():
        print(line)
    print("fits" if report.fits else "DOES NOT FIT")
    return 0 if report.fits else 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
