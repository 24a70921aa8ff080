"""Per-device memory of a train step, and an early, clear failure when it cannot fit.

Before the first step the trainer compiles the step on abstract inputs (no array exists yet)
and reports, per device:

    parameters       the state's params (and any frozen models') as laid out by the sharding rules
    optimizer state  likewise (Adam: two more copies of the params)
    temporaries      activations, gradients, gathered weights, collectives' buffers:
                     XLA's buffer assignment for the compiled step (memory_analysis)
    total            arguments + outputs − donated (aliased) + temporaries

and raises `DoesNotFit` when the total exceeds `config.mesh.memory_fraction` of the device's
memory: `config.mesh.device_memory_gib`, else what the device reports, else the vendor's table
by device kind or `mesh.slice` (lm/parallel/devices.py). Where none is known (a CPU) the verdict
is "unknown", never "fits".

`python -m lm.train.memory --config=configs/llama_8b.py:v5p-128 --target=tpu` compiles the
config's real train step with the TPU compiler for the slice's topology — deviceless, on any
machine with libtpu (the `tpu` extra) — and prints the report; `--target=cpu` compiles it
against a virtual CPU mesh of the slice's size instead (a subprocess with
--xla_force_host_platform_device_count=N; XLA:CPU fuses and lays out differently, so its
temporaries are an estimate). When it does not fit, "Try:" lists changes whose recompiled step
fits (lm/train/fitting.py). `--help` for the flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax

from lm.data import batch as contract
from lm.parallel import devices
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
    def budget(self) -> int | None:
        return None if self.capacity is None else int(self.fraction * self.capacity)

    @property
    def fits(self) -> bool | None:
        """True / False against `fraction` of the capacity; None when the capacity is unknown."""
        return None if self.capacity is None else self.total <= self.budget

    @property
    def verdict(self) -> str:
        return {True: "fits", False: "DOES NOT FIT", None: "fit unknown: no memory size for this device "
                "(set mesh.device_memory_gib or mesh.slice)"}[self.fits]

    def lines(self) -> list[str]:
        cap = (f"{self.capacity / GiB:.2f} GiB × {self.fraction:g} = {self.budget / GiB:.2f} GiB"
               if self.capacity else "unknown (no check)")
        return [f"memory per device: parameters {_gib(self.params)}, optimizer state {_gib(self.opt_state)}, "
                f"temporaries {_gib(self.temporaries)} (compiled step)",
                f"  total {_gib(self.total)} = arguments {_gib(self.arguments)} + outputs {_gib(self.outputs)} "
                f"- donated {_gib(self.aliased)} + temporaries; available {cap}"]

    def as_json(self, topology: str) -> dict:
        """The --json record: GiB per chip."""
        return {"params_gib": self.params / GiB, "optimizer_gib": self.opt_state / GiB,
                "temp_gib": self.temporaries / GiB, "total_gib": self.total / GiB,
                "hbm_gib": None if self.capacity is None else self.capacity / GiB, "fits": self.fits,
                "topology": topology}


def _gib(n: int) -> str:
    return f"{n / GiB:.3f} GiB" if n >= 0.1 * GiB else f"{n / 2**20:.1f} MiB"


def device_capacity(configured_gib: float = 0.0, device: Any = None, slice_name: str = "") -> int | None:
    """Bytes of memory per device: `configured_gib` if > 0, else the device's `bytes_limit` (TPU and
    GPU report one), else the vendor's table by device kind or slice name (lm/parallel/devices.py),
    else None (a CPU: unknown)."""
    return capacity_and_source(configured_gib, device, slice_name)[0]


def capacity_and_source(configured_gib: float = 0.0, device: Any = None,
                        slice_name: str = "") -> tuple[int | None, str]:
    """(bytes per device or None, where that number came from)."""
    if configured_gib and configured_gib > 0:
        return int(configured_gib * GiB), "mesh.device_memory_gib"
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 — some backends (and deviceless TPU topologies) do not implement it
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"reported by {device.device_kind}"
    table = devices.hbm_bytes(getattr(device, "device_kind", ""), slice_name)
    if table:
        return table, f"vendor table ({device.device_kind if devices.chip_for_kind(device.device_kind) else slice_name})"
    return None, "unknown"


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
    if report.fits is not False:  # fits, or no capacity known (a CPU): nothing to check against
        return
    shape = dict(mesh.shape)
    hints = []
    if report.params + report.opt_state > 0.5 * report.fraction * report.capacity:
        hints.append("split parameters and optimizer state further (a larger mesh.fsdp, or mesh.tensor)")
    if report.temporaries > 0.3 * report.total:
        hints.append(f"cut activations: model.remat='full', more train.micro_batches (now {micro_batches}), "
                     "loss.kind='fused', a smaller train.batch_size or train.seq_len")
    raise DoesNotFit(
        f"the train step needs {_gib(report.total)} per device but {report.fraction:g} × "
        f"{_gib(report.capacity)} = {_gib(int(report.fraction * report.capacity))} is available on mesh "
        f"{shape} (parameters {_gib(report.params)}, optimizer state {_gib(report.opt_state)}, temporaries "
        f"{_gib(report.temporaries)}). Try: {'; '.join(hints) or 'a larger slice'}. "
        "(config.mesh.device_memory_gib / memory_fraction set the budget; `python -m lm.train.memory "
        "--config=...` computes which changes fit.)")


def compile_and_check(jitted_step: Any, setup: Any, config: Any, log: Callable[[str], None] = print,
                      batch_kind: str = "tokens") -> Any:
    """Compile the step on abstract inputs, log the per-device report, raise DoesNotFit if it
    cannot fit; return the compiled step (call it instead of the jitted one: no second compile)."""
    tc, mc = config.train, config.mesh
    compiled = compile_step(jitted_step, setup, tc.batch_size, tc.seq_len, batch_kind)
    report = analyze(compiled, setup, device_capacity(mc.get("device_memory_gib", 0.0), setup.mesh.devices.flat[0],
                                                      mc.get("slice", "")),
                     mc.get("memory_fraction", 0.9))
    for line in report.lines():
        log(line)
    check(report, setup.mesh, tc.micro_batches)
    return compiled


# -- a config's step on a virtual mesh or a TPU topology ---------------------------------------------


def plan_config(config: Any, devices: list | None = None) -> tuple[Any, MemoryReport, dict]:
    """Build `config`'s real train step on `devices` (default: all; TPU topology devices compile
    deviceless), compile it on abstract inputs and report. Returns (compiled, report, info)."""
    from lm import train
    from lm.model import ModelConfig, param_count, platform
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
    with platform.compiling_for(platform.mesh_platform(mesh)):  # kernels for the target, 1-chip meshes too
        compiled = compile_step(step, setup, tc.batch_size, tc.seq_len)
    seconds = time.perf_counter() - t0
    capacity, source = capacity_and_source(config.mesh.device_memory_gib, mesh.devices.flat[0],
                                           config.mesh.get("slice", ""))
    report = analyze(compiled, setup, capacity, config.mesh.memory_fraction)
    info = {"params": param_count(setup.abstract_state.params), "mesh": dict(mesh.shape),
            "compile_s": seconds, "layers": model_cfg.num_layers, "capacity_source": source,
            "platform": mesh.devices.flat[0].platform, "device_kind": mesh.devices.flat[0].device_kind}
    return compiled, report, info


def tpu_devices(config: Any, topology: str = "") -> tuple[list, str]:
    """Deviceless TPU devices for `config` (its mesh.slice's topology, or `topology` such as
    'v5e:2x2'), times the number of slices its dcn_* sizes ask for. Needs libtpu (the `tpu` extra)."""
    from jax.experimental import topologies

    # deviceless compiles touch no chip: let several processes (parallel tests, other users) load libtpu
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if not topology:
        if not config.mesh.get("slice"):
            raise ValueError("--target=tpu needs the config's mesh.slice (e.g. 'v5p-128') or --topology=v5p:4x4x4")
        topology = devices.topology_name(config.mesh.slice)
    slices = math.prod(shd.dcn_shape(config.mesh))
    kwargs = {"num_slices": slices} if slices > 1 else {}
    return topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs).devices, topology


USAGE = """python -m lm.train.memory --config=FILE[:ARG] [--target=cpu|tpu] [--json=PATH] [--config.a.b=v ...]

Compiles the config's real train step on abstract inputs (nothing runs) and prints, per chip:
parameters, optimizer state, temporaries, total, the chip's memory and whether it fits. When it
does not fit, it compiles variants and prints a "Try:" line with those that fit.

  --target=tpu   the TPU compiler (libtpu, the `tpu` extra) for the slice's topology (mesh.slice,
                 or --topology=v5e:2x2); deviceless, on any machine
  --target=cpu   a virtual CPU mesh of the slice's size (an estimate: XLA:CPU fuses differently)
  --layers=L     compile with L layers (same widths): faster; scale the temporaries per layer
  --json=PATH    write {params_gib, optimizer_gib, temp_gib, total_gib, hbm_gib, fits, topology}
  --no_suggest   skip the "Try:" search
Exit status: 0 fits, 1 does not fit, 2 unknown (no memory size for the device)."""


def _main(argv: list[str]) -> int:
    if any(a in ("--help", "-h", "--helpfull", "-help") for a in argv[1:]):
        print(USAGE)
        return 0
    from absl import flags
    from ml_collections import config_flags

    from lm.train import fitting

    config_flags.DEFINE_config_file("config", None, "Config to plan.", lock_config=True)
    flags.DEFINE_enum("target", "cpu", ["cpu", "tpu"], "Compiler: virtual CPU devices or the TPU compiler.")
    flags.DEFINE_string("topology", "", "TPU topology (e.g. v5e:2x2); default: the config's mesh.slice.")
    flags.DEFINE_string("json", "", "Write the per-chip numbers to this JSON file.")
    flags.DEFINE_integer("devices", 0, "Virtual CPU devices to compile for; 0: the mesh's fixed size.")
    flags.DEFINE_integer("layers", 0, "Compile with this many layers (same widths), 0: the config's.")
    flags.DEFINE_boolean("no_suggest", False, "Skip compiling variants when it does not fit (the Try: line).")
    try:
        flags.FLAGS(argv)
    except flags.Error as e:
        print(f"lm.train.memory: {e}\n\n{USAGE}", file=sys.stderr)
        return 2
    config = flags.FLAGS.config
    if config is None:
        print(f"lm.train.memory: --config is required\n\n{USAGE}", file=sys.stderr)
        return 2
    target_devices, topology = None, ""
    if flags.FLAGS.target == "tpu":
        target_devices, topology = tpu_devices(config, flags.FLAGS.topology)
    else:
        sizes = [config.mesh[a] * config.mesh.get(f"dcn_{a}", 1) for a in shd.MESH_AXES]
        n = flags.FLAGS.devices or (math.prod(sizes) if -1 not in sizes else 0)
        if n and os.environ.get("LM_MEMORY_DEVICES") != str(n):  # re-run with n virtual CPUs
            flags_env = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
            env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags_env.strip(), LM_MEMORY_DEVICES=str(n))
            return subprocess.call([sys.executable, "-m", "lm.train.memory", *argv[1:]], env=env)
        if n and jax.device_count() != n:
            raise RuntimeError(f"lm.train.memory: wanted {n} devices, JAX has {jax.device_count()}")
        topology = f"cpu:{jax.device_count()}"
    if flags.FLAGS.layers:
        config.model.num_layers = flags.FLAGS.layers
    config.distributed.auto = False
    _, report, info = plan_config(config, target_devices)
    print(f"{info['params'] / 1e9:.3f}B parameters ({info['layers']} layers), mesh {info['mesh']} on "
          f"{len(target_devices or jax.devices())} {info['device_kind']} ({info['platform']}) devices, "
          f"topology {topology}; compiled in {info['compile_s']:.1f}s")
    for line in report.lines():
        print(line)
    print(f"  memory per chip from: {info['capacity_source']}")
    print(report.verdict)
    if report.fits is False and not flags.FLAGS.no_suggest:
        tries = fitting.suggest(config, target_devices, report, log=print)
        print("Try: " + ("; ".join(tries) if tries else "nothing tried fits: a larger slice (more chips)"))
    if flags.FLAGS.json:
        with open(flags.FLAGS.json, "w") as f:
            json.dump(report.as_json(topology), f, indent=1)
        print(f"wrote {flags.FLAGS.json}")
    return {True: 0, False: 1, None: 2}[report.fits]


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
