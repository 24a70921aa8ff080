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

Printed: a markdown table of medians (and best) per version and the median of the paired B/A ratios.
"""

from __future__ import annotations

import argparse
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

    if "train" in args.what:
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
    if "decode" in args.what:
        fields = dict(vocab_size=264, d_model=512, num_layers=8, num_heads=8, num_kv_heads=4, mlp_dim=1376)
        impl = {}
        for v, pkg in versions.items():
            model_mod = importlib.import_module(f"{pkg}.model")
            sampling = importlib.import_module(f"{pkg}.sampling")
            impl[v] = (sampling, nnx.split(model_mod.Transformer(model_mod.ModelConfig(**fields), rngs=nnx.Rngs(0))))
        rng = np.random.default_rng(0)
        for b in (1, 8):
            prompts = [rng.integers(0, 264, 16).tolist() for _ in range(b)]
            tokens = {}

            def decode_one(v, prompts=prompts, tokens=tokens):
                sampling, (g, p) = impl[v]
                sc = sampling.SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=256)
                t = time.perf_counter()
                tokens[v] = sampling.generate_batch(g, p, prompts, sc, seed=0).tokens
                return 1000 * (time.perf_counter() - t) / 256

            for v in versions:
                decode_one(v)  # compile
            times = paired(decode_one)
            same = "same tokens" if np.array_equal(tokens["A"], tokens["B"]) else "DIFFERENT tokens"
            rows.append((f"decode batch {b} (ms/token; {same})", times))
    print(f"\nA = {args.a}, B = this checkout; {args.pairs} alternating pairs in one process\n")
    print("| measurement | A median (best) | B median (best) | median of paired B/A |\n|---|---:|---:|---:|")
    for name, t in rows:
        best = max if "MFU" in name else min
        ratios = [b / a for a, b in zip(t["A"], t["B"])]
        print(f"| {name} | {statistics.median(t['A']):.2f} ({best(t['A']):.2f}) | "
              f"{statistics.median(t['B']):.2f} ({best(t['B']):.2f}) | {statistics.median(ratios):.3f} |")


if __name__ == "__main__":
    main()
