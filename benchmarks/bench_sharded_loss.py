"""Per-chip memory and FLOPs of whole train steps, compile-only: what the sharded, chunked token
log-probabilities (lm/losses/token_logprobs.py) change. Run it on two checkouts (before / after)
and compare; nothing is executed, so it needs no accelerator.

    # the TPU compiler (libtpu, deviceless): llama_1b on v5p-32 (16 chips, FSDP 16), full depth (its
    # layers under lax.scan), 512 rows × 2048: one pretrain, one DPO (256 pairs) and one GRPO step
    python benchmarks/bench_sharded_loss.py --tpu [--objectives pretrain,dpo,grpo] [--attention dense]
    # XLA:CPU, one device: a DPO step of the default model with a 32k vocabulary
    python benchmarks/bench_sharded_loss.py --cpu
    # speed, paired A/B in one process (checkout A = the baseline, B = this one): the bench model's
    # train step with the fused loss, and the fused loss's value and gradient alone
    python benchmarks/bench_sharded_loss.py --ab /tmp/before --pairs 8

    git worktree add /tmp/before <old commit>
    cd /tmp/before && PYTHONPATH=/tmp/before python <this checkout>/benchmarks/bench_sharded_loss.py --tpu

(run the old checkout from its own directory: its lm.cli.train reads configs/default.py at import.)
`--attention dense` gives today's code the causal-block dense attention the old code had (the
config's 'auto' picks the splash kernel on TPU, a custom call whose FLOPs no count sees).

Printed (Markdown), per chip: the compiled step's arguments, outputs − donated, temporaries and
total (XLA's memory_analysis, as lm.train.memory adds them); matmul FLOPs from the compiled HLO
with every loop body times its trip count (benchmarks/hlo_flops.py); XLA's cost_analysis FLOPs,
which count a loop body once (the layer scan, the loss's chunks); the model FLOPs of the step
from the formula of lm/model/counting.py; the largest all-gather (elements) in the partitioned
HLO; the compile time.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time

if os.environ.get("PYTHONPATH") is None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

GiB = 2**30


def dpo_fields(config):
    """Add DPO's config section (configs/dpo.py's fields) to any config: the reference = the
    frozen start, the sigmoid loss."""
    import ml_collections

    with config.unlocked():
        config.objective = "dpo"
        d = config.dpo = ml_collections.ConfigDict()
        d.beta, d.loss_type, d.label_smoothing, d.reference = 1.0, "sigmoid", 0.0, "model"
        config.train.init_from = None
    return config


def grpo_fields(config):
    """Add GRPO's config section (configs/grpo.py's rl block) to any config: the reference = the
    frozen start, rewards in the batch (the train step's batch: rollouts already scored)."""
    from configs import grpo

    with config.unlocked():
        config.objective = "grpo"
        config.rl = grpo.get_config().rl
        config.train.init_from = None
    return config


def compile_step(config, model_cfg, mesh):
    from lm import objectives, train
    from lm.data import batch as contract
    from lm.parallel import sharding as shd
    from lm.train.optim import make_optimizer

    objective = objectives.get(config.objective)
    opt, sched = make_optimizer(config.optimizer, 100)
    frozen = objectives.frozen_models(objective, config, model_cfg)
    setup = train.plan_state(model_cfg, opt, mesh, config.mesh.rules, 0,
                             frozen={k: f.make_model for k, f in frozen.items()})
    step = train.jit_train_step(train.make_train_step(objective.make_loss_fn(config, setup.graphdef), opt, sched,
                                                      config.train.micro_batches), setup)
    kind = objectives.batch_kind(objective, config)
    rows = config.train.batch_size // (2 if isinstance(kind, str) and kind.startswith("preference") else 1)
    sharding = shd.batch_sharding(mesh)
    batch = contract.spec(kind, rows, config.train.seq_len,
                          make=lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding))
    sds = lambda tree, sh: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)  # noqa: E731
    args = (sds(setup.abstract_state, setup.state_shardings), batch)
    if frozen:
        args += (sds(setup.abstract_frozen, setup.frozen_shardings),)
    started = time.perf_counter()
    try:  # the target platform in context (kernels, attention_impl='auto'); older checkouts have no such context
        from lm.model import platform
        context = platform.compiling_for(platform.mesh_platform(mesh))
    except (ImportError, AttributeError):
        import contextlib
        context = contextlib.nullcontext()
    with context:
        compiled = step.lower(*args).compile()
    return compiled, time.perf_counter() - started


def largest_all_gather(hlo: str) -> int:
    sizes = [math.prod(int(x) for x in m.group(1).split(",") if x)
             for m in re.finditer(r"=\s*\(?[a-z0-9]+\[([0-9,]*)\][^=\n]*?\ball-gather(?:-start)?\(", hlo)]
    return max(sizes, default=0)


def row(name, compiled, seconds):
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    args, temp = mem.argument_size_in_bytes, mem.temp_size_in_bytes
    return (f"| {name} | {args / GiB:.2f} | {temp / GiB:.2f} | {(args + temp) / GiB:.2f} | "
            f"{cost['flops'] / 1e12:.2f} | {largest_all_gather(compiled.as_text()):,} | {seconds:.0f} |")


HEADER = ("| step | arguments GiB | temporaries GiB | sum GiB | TFLOPs per chip | largest all-gather (elements) "
          "| compile s |\n|---|---|---|---|---|---|---|")

TPU_HEADER = ("| step | arguments GiB | outputs − donated GiB | temporaries GiB | total GiB | matmul TFLOPs per chip "
              "(HLO, loops × trips) | XLA cost_analysis TFLOPs (loop bodies once) | model TFLOPs per chip (analytic) "
              "| largest all-gather (elements) | compile s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def model_tflops_per_chip(config, model_cfg, chips: int) -> float:
    """Model FLOPs of one step per chip, as lm/model/counting.py counts them today (written out
    here so that the old checkout gets the same formula): per trained token 6·N + ½·12·L·T·d_attn
    (N: matmul parameters, the output projection once; causal attention), a frozen forward pass a
    third of that (DPO's reference; GRPO's reference log-probs come in the batch)."""
    d, layers = model_cfg.d_model, model_cfg.num_layers
    hd = model_cfg.head_dim or d // model_cfg.num_heads
    n = layers * (d * hd * (2 * model_cfg.num_heads + 2 * model_cfg.num_kv_heads) + 3 * d * model_cfg.mlp_dim)
    n += d * model_cfg.vocab_size
    per_token = 6.0 * n + 0.5 * 12.0 * layers * config.train.seq_len * model_cfg.num_heads * hd
    tokens = config.train.batch_size * config.train.seq_len  # rows (DPO: 2 × pairs) × T
    frozen_passes = 1 if config.objective == "dpo" else 0
    return tokens * per_token * (1 + frozen_passes / 3) / chips / 1e12


def tpu_row(name, compiled, seconds, model_tflops, hlo_path=""):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from hlo_flops import matmul_flops

    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    args, out, alias, temp = (mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
                              mem.temp_size_in_bytes)
    hlo = compiled.as_text()
    if hlo_path:  # the compiled module, for a closer look (gzip)
        import gzip
        with gzip.open(hlo_path, "wt") as f:
            f.write(hlo)
    return (f"| {name} | {args / GiB:.2f} | {(out - alias) / GiB:.2f} | {temp / GiB:.2f} | "
            f"{(args + out - alias + temp) / GiB:.2f} | {matmul_flops(hlo) / 1e12:.1f} | {cost['flops'] / 1e12:.2f} | "
            f"{model_tflops:.1f} | {largest_all_gather(hlo):,} | {seconds:.0f} |")


def tpu(layers: int | None, batch_size: int | None, objectives=("pretrain", "dpo", "grpo"), attention: str = "",
        hlo_dir: str = ""):
    from jax.experimental import topologies
    from jax.sharding import Mesh

    from configs import llama_1b
    from lm.cli.train import build_model_config
    from lm.parallel import sharding as shd

    topology = topologies.get_topology_desc(topology_name="v5p:2x2x4", platform="tpu")
    devices = np.array(topology.devices)
    mesh = Mesh(devices.reshape(1, 16, 1), shd.MESH_AXES)
    print(f"TPU compiler (libtpu, deviceless): {devices.size} × {devices.flat[0].device_kind}, mesh data=1 fsdp=16")
    print(TPU_HEADER)
    for objective in objectives:
        config = llama_1b.get_config("v5p-32")
        if layers:
            config.model.num_layers = layers
        if batch_size:
            config.train.batch_size = batch_size
        if attention and "attention_impl" in config.model:
            config.model.attention_impl = attention
        config.distributed.auto = False
        if objective == "dpo":
            config = dpo_fields(config)
        elif objective == "grpo":
            config = grpo_fields(config)
        model_cfg = build_model_config(config, config.model.vocab_size)
        compiled, seconds = compile_step(config, model_cfg, mesh)
        impl = config.model.get("attention_impl", "causal-block dense")
        print(tpu_row(f"llama_1b {objective} ({config.train.batch_size} rows × {config.train.seq_len}, "
                      f"{config.model.num_layers} layers, attention {impl})", compiled, seconds,
                      model_tflops_per_chip(config, model_cfg, devices.size),
                      os.path.join(hlo_dir, f"{objective}.hlo.gz") if hlo_dir else ""), flush=True)


def cpu():
    from configs import default
    from lm.cli.train import build_model_config
    from lm.parallel import sharding as shd

    config = dpo_fields(default.get_config())
    config.train.batch_size = 32  # pairs: 64 rows × 128 tokens
    config.model.vocab_size = 32768
    model_cfg = build_model_config(config, 32768)
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    print(f"XLA:CPU, one device; DPO step of configs/default.py's model at V=32768, {config.train.batch_size} pairs "
          f"× T={config.train.seq_len}")
    print(HEADER)
    compiled, seconds = compile_step(config, model_cfg, mesh)
    print(row("default-model DPO, V=32768", compiled, seconds))


def ab(checkout: str, pairs: int):
    """Paired, alternating A/B timings (ms, median and paired B/A ratio) on XLA:CPU."""
    import importlib
    import statistics

    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    from ab_checkouts import load_renamed

    sys.path[:0] = [load_renamed(os.path.abspath(checkout)), here]
    import jax.numpy as jnp

    packages = {"A": "lm_a", "B": "lm"}
    cases = {}
    for v, bench in (("A", "bench_train_a"), ("B", "bench_train")):
        step, state, gb, _, _ = importlib.import_module(bench).build("bench", 8192, "fused")
        cases.setdefault("bench model train step, fused loss, V=8192", {})[v] = [step, state, gb]
    k = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(k[0], (4096, 512))
    w = jax.random.normal(k[1], (512, 32768)) * 0.05
    t = jax.random.randint(k[2], (4096,), 0, 32768)
    for v, pkg in packages.items():
        fused = importlib.import_module(f"{pkg}.losses").fused_cross_entropy
        f = jax.jit(jax.value_and_grad(lambda h, w, fused=fused: fused(h, w, t, chunk_size=1024).mean, argnums=(0, 1)))
        cases.setdefault("fused_cross_entropy value+grad, N=4096 D=512 V=32768", {})[v] = [f, h, w]

    def run(entry, name):
        if name.startswith("bench"):
            step, state, gb = entry
            entry[1], m = step(state, gb)
            jax.block_until_ready(m)
        else:
            jax.block_until_ready(entry[0](entry[1], entry[2]))

    print("| measurement | A ms (median) | B ms (median) | B/A (median of pairs) |\n|---|---|---|---|")
    for name, entries in cases.items():
        for v in "AB":
            run(entries[v], name)  # compile and warm up
        times = {"A": [], "B": []}
        for i in range(pairs):
            for v in ("A", "B") if i % 2 == 0 else ("B", "A"):
                started = time.perf_counter()
                run(entries[v], name)
                times[v].append(1000 * (time.perf_counter() - started))
        ratios = [b / a for a, b in zip(times["A"], times["B"])]
        print(f"| {name} | {statistics.median(times['A']):.1f} | {statistics.median(times['B']):.1f} | "
              f"{statistics.median(ratios):.3f} |", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tpu", action="store_true", help="llama_1b on v5p-32 with the TPU compiler")
    ap.add_argument("--cpu", action="store_true", help="a DPO step on XLA:CPU at V=32k")
    ap.add_argument("--layers", type=int, default=None, help="fewer llama_1b layers (compile time)")
    ap.add_argument("--batch_size", type=int, default=None, help="llama_1b rows per step (default 512)")
    ap.add_argument("--objectives", default="pretrain,dpo,grpo", help="--tpu: the train steps compiled")
    ap.add_argument("--attention", default="", help="--tpu: model.attention_impl where the checkout has it "
                    "(dense: the causal blocks the pre-issue-27 code used; '' the config's: splash on TPU)")
    ap.add_argument("--hlo_dir", default="", help="--tpu: write each compiled module there (<objective>.hlo.gz)")
    ap.add_argument("--ab", default=None, help="checkout A: paired speed of the fused loss, A vs this one")
    ap.add_argument("--pairs", type=int, default=8, help="alternating pairs per --ab measurement")
    args = ap.parse_args()
    import lm

    print(f"lm from {os.path.dirname(lm.__file__)}; jax {jax.__version__}")
    if args.tpu:
        tpu(args.layers, args.batch_size, args.objectives.split(","), args.attention, args.hlo_dir)
    if args.cpu:
        cpu()
    if args.ab:
        ab(args.ab, args.pairs)
