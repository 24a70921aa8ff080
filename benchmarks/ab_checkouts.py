"""Paired before/after of two checkouts of lm in ONE process: the bench model's train step and its
batch-1/batch-8 decoding, the two versions alternating (A B, B A, ...), so the speed drift of a
shared VM hits both alike. For refactors: is the new code as fast as the old?

    git worktree add /tmp/before <old commit>
    python benchmarks/ab_checkouts.py --a /tmp/before            # B: this checkout

Checkout A's `lm`, `configs` and benchmarks/bench_train.py are copied to a temporary directory
under the names `lm_a`, `configs_a` and `bench_train_a` (their imports rewritten), so both
versions load side by side. Measured:
* train: bench_train.build("bench") of each checkout (d_model 512, 8 layers, unrolled, T=256,
  B=8): step time and MFU against a float32 matmul peak measured just before each step;
* decode: lm.sampling.generate_batch on the same random bench model (16-token prompts, 256 new
  tokens, temperature 1, top-p 0.95), ms/token per call; whether both produce the same tokens.
  `--decode_layouts default,stacked`: the default layout (per-layer on a CPU) and/or the stacked
  blocks (`unroll_layers=False`, the layout accelerators use);
* tpu_decode (`--what tpu_decode`, needs libtpu): each version's decode loop compiled by the TPU
  compiler for one v5e chip (deviceless), bf16, 8 rows, 32768 cache slots, scanned and unrolled
  layers: per-chip temporaries (memory_analysis) and how many layer-sized cache buffers the
  compiled loop builds outside fused kernels. Deterministic: printed once per version.

Printed: a markdown table of medians (and best) per version and the median of the paired B/A ratios.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def load_renamed(repo: str) -> str:
    """Copy repo's lm/, configs/ and bench_train.py under the suffix _a; returns the directory."""
    out = tempfile.mkdtemp(prefix="ab_checkouts_")
    shutil.copytree(os.path.join(repo, "lm"), os.path.join(out, "lm_a"))
    shutil.copytree(os.path.join(repo, "configs"), os.path.join(out, "configs_a"))
    shutil.copy(os.path.join(repo, "benchmarks", "bench_train.py"), os.path.join(out, "bench_train_a.py"))
    for directory, _, names in os.walk(out):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                with open(path) as f:
                    text = f.read()
                text = re.sub(r"\bfrom lm\b", "from lm_a", text)
                text = re.sub(r"\bimport lm\.", "import lm_a.", text)
                text = re.sub(r"\bfrom configs\b", "from configs_a", text)
                text = re.sub(r"(['\"])lm\.(data|objectives)\.", r"\1lm_a.\2.", text)
                with open(path, "w") as f:
                    f.write(text)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="checkout A (the baseline)")
    ap.add_argument("--pairs", type=int, default=10, help="alternating pairs per measurement")
    ap.add_argument("--what", default="train,decode")
    ap.add_argument("--decode_layouts", default="default", help="default and/or stacked, comma-separated")
    args = ap.parse_args()
    from lm.cli.runtime import tune_malloc

    tune_malloc()
    sys.path[:0] = [load_renamed(os.path.abspath(args.a)), HERE, os.path.dirname(HERE)]
    import importlib

    import jax
    import numpy as np
    from flax import nnx

    from lm.io.metrics import measure_peak_flops

    versions = {"A": "lm_a", "B": "lm"}
    rows = []

    def paired(run_one):  # run_one(version) -> seconds or (seconds, extra)
        times = {"A": [], "B": []}
        for i in range(args.pairs):
            for v in ("A", "B") if i % 2 == 0 else ("B", "A"):
                times[v].append(run_one(v))
        return times

    what = set(args.what.split(","))
    if "train" in what:
        builds = {"A": importlib.import_module("bench_train_a").build("bench", 264, "explicit"),
                  "B": importlib.import_module("bench_train").build("bench", 264, "explicit")}
        states, mfu = {}, {"A": [], "B": []}
        for v, (step, state, gb, _, _) in builds.items():
            states[v], m = step(state, gb)
            jax.block_until_ready(m)

        def train_one(v):
            step, _, gb, _, step_flops = builds[v]
            peak = measure_peak_flops(repeats=2)
            t = time.perf_counter()
            states[v], m = step(states[v], gb)
            jax.block_until_ready(m)
            dt = time.perf_counter() - t
            mfu[v].append(step_flops / dt / peak)
            return 1000 * dt

        times = paired(train_one)
        rows.append(("train step (ms)", times))
        rows.append(("train MFU 6N (%)", {v: [100 * x for x in mfu[v]] for v in mfu}))
    if "decode" in what:
        fields = dict(vocab_size=264, d_model=512, num_layers=8, num_heads=8, num_kv_heads=4, mlp_dim=1376)
        impl = {}
        for v, pkg in versions.items():
            model_mod = importlib.import_module(f"{pkg}.model")
            sampling = importlib.import_module(f"{pkg}.sampling")
            impl[v] = (sampling, nnx.split(model_mod.Transformer(model_mod.ModelConfig(**fields), rngs=nnx.Rngs(0))))
        rng = np.random.default_rng(0)
        for layout, b in [(layout, b) for layout in args.decode_layouts.split(",") for b in (1, 8)]:
            prompts = [rng.integers(0, 264, 16).tolist() for _ in range(b)]
            tokens = {}
            unroll = {"default": None, "stacked": False}[layout]

            def decode_one(v, prompts=prompts, tokens=tokens, unroll=unroll):
                sampling, (g, p) = impl[v]
                sc = sampling.SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=256)
                t = time.perf_counter()
                tokens[v] = sampling.generate_batch(g, p, prompts, sc, seed=0, unroll_layers=unroll).tokens
                return 1000 * (time.perf_counter() - t) / 256

            for v in versions:
                decode_one(v)  # compile
            times = paired(decode_one)
            same = "same tokens" if np.array_equal(tokens["A"], tokens["B"]) else "DIFFERENT tokens"
            rows.append((f"decode {layout} batch {b} (ms/token; {same})", times))
    if "tpu_decode" in what:
        for scan in (True, False):
            got = {v: tpu_decode_temporaries(importlib.import_module(f"{pkg}.model"),
                                             importlib.import_module(f"{pkg}.sampling.decode"), scan)
                   for v, pkg in versions.items()}
            rows.append((f"TPU decode loop temporaries per chip (MB), {'scanned' if scan else 'unrolled'} layers",
                         {v: [t / 1e6] for v, (t, _) in got.items()}))
            rows.append((f"  layer-sized cache buffers built, {'scanned' if scan else 'unrolled'}",
                         {v: [float(n)] for v, (_, n) in got.items()}))
    print(f"\nA = {args.a}, B = this checkout; {args.pairs} alternating pairs in one process\n")
    print("| measurement | A median (best) | B median (best) | median of paired B/A |\n|---|---:|---:|---:|")
    for name, t in rows:
        best = max if "MFU" in name else min
        ratios = [b / a if a else float("nan") for a, b in zip(t["A"], t["B"])]
        print(f"| {name} | {statistics.median(t['A']):.2f} ({best(t['A']):.2f}) | "
              f"{statistics.median(t['B']):.2f} ({best(t['B']):.2f}) | {statistics.median(ratios):.3f} |")


def tpu_decode_temporaries(model_mod, decode_mod, scan: bool, rows: int = 8, slots: int = 32768):
    """(per-chip temporary bytes, layer-sized cache buffers outside fused kernels) of one
    version's decode loop compiled for one v5e chip (deviceless TPU compiler)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    chip = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices[0]
    rep = NamedSharding(Mesh(np.array([chip]).reshape(1, 1, 1), ("data", "fsdp", "tensor")), P())
    cfg = model_mod.ModelConfig(vocab_size=256, d_model=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
                                mlp_dim=512, scan_layers=scan, dtype="bfloat16")
    cpu_mod = importlib.import_module(model_mod.__name__ + ".cpu")
    platform = importlib.import_module(model_mod.__name__ + ".platform")
    with platform.compiling_for("tpu"):
        model = cpu_mod.for_decoding(model_mod.Transformer(cfg, rngs=nnx.Rngs(0)), per_layer=False)
        graphdef, params = nnx.split(model)
        spec = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), tree)  # noqa: E731
        state = {"cache": jax.eval_shape(lambda: model.init_cache(rows, slots)),
                 "tokens": jax.ShapeDtypeStruct((rows, 64), jnp.int32), "done": jax.ShapeDtypeStruct((rows,), bool),
                 "step": jax.ShapeDtypeStruct((), jnp.int32), "lengths": jax.ShapeDtypeStruct((rows,), jnp.int32),
                 "prompt_len": jax.ShapeDtypeStruct((), jnp.int32),
                 "row_keys": jax.eval_shape(lambda: jax.random.split(jax.random.key(0), rows))}
        knobs = {"temperature": jnp.float32(1), "top_k": jnp.int32(0), "top_p": jnp.float32(1), "min_p": jnp.float32(0)}
        compiled = decode_mod._decode_chunk.lower(graphdef, spec(params), spec(state), spec(knobs),
                                                  spec(jnp.zeros((4,), jnp.int32)), spec(jnp.int32(0))).compile()
    hlo = compiled.as_text()
    fused = set(re.findall(r"\bfusion\(.*?calls=%([\w.\-]+)", hlo))
    layer = (f"bf16[{rows},{cfg.num_kv_heads},{cfg.head_dim_},{slots}]", f"bf16[{rows},{cfg.num_kv_heads},{slots},{cfg.head_dim_}]")
    built, current = 0, None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{$", line)
        if header:
            current = header.group(1)
            continue
        m = re.match(r"^\s+(?:ROOT\s+)?%[\w.\-]+\s*=\s*([a-z0-9]+\[[0-9,]*\])\S*\s+([\w\-]+)\(", line)
        if m and current not in fused and m.group(1) in layer and m.group(2) not in (
                "parameter", "get-tuple-element", "bitcast", "tuple"):
            built += 1
    return compiled.memory_analysis().temp_size_in_bytes, built


if __name__ == "__main__":
    main()
