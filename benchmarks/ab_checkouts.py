"""Paired runs of two checkouts of lm: the train step of the bench model and batch-1/batch-8 decoding,
measured alternately (A B, B A, A B, ...) in fresh processes, so the speed drift of a shared VM hits
both alike. For refactors: is the new code as fast as the old?

    git worktree add /tmp/before <old commit>
    python benchmarks/ab_checkouts.py --a /tmp/before --b . --rounds 4

Each process imports lm from its checkout only and measures one thing:
* train: the bench model of benchmarks/bench_train.py (d_model 512, 8 layers, unrolled, T=256,
  B=8), median step time of `--steps` steps after compiling, and MFU against a float32 matmul
  peak measured in the same process (bench_train.build of that checkout);
* decode: lm.sampling.generate_batch on the same bench model (random weights, a 16-token prompt per
  row, 256 new tokens, temperature 1, top-p 0.95), the best of 3 timed calls after a warm-up, as
  ms/token; the first generated tokens are printed so that equal outputs can be checked.

Printed: a markdown table of the medians over rounds and the B/A ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r'''
import json, os, sys, time
repo, what = sys.argv[1], sys.argv[2]
sys.path[:0] = [repo, os.path.join(repo, "benchmarks")]
import jax, numpy as np
out = {}
if what == "train":
    import bench_train
    step, state, gb, flops, step_flops = bench_train.build("bench", 264, "explicit")
    state, m = step(state, gb); jax.block_until_ready(m)
    times = []
    for _ in range(int(sys.argv[3])):
        t = time.perf_counter(); state, m = step(state, gb); jax.block_until_ready(m); times.append(time.perf_counter() - t)
    try:
        from lm.io.metrics import measure_peak_flops
    except ImportError:
        from lm.metrics import measure_peak_flops
    peak = measure_peak_flops()
    med = float(np.median(times))
    out = {"step_ms": 1000 * med, "mfu": step_flops / med / peak}
else:
    from flax import nnx
    from lm import sampling
    from lm.model import ModelConfig, Transformer
    cfg = ModelConfig(vocab_size=264, d_model=512, num_layers=8, num_heads=8, num_kv_heads=4, mlp_dim=1376)
    g, p = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    for b in (1, 8):
        prompts = [rng.integers(0, 264, 16).tolist() for _ in range(b)]
        sc = sampling.SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=256)
        sampling.generate_batch(g, p, prompts, sc, seed=0)
        best = 1e9
        for _ in range(3):
            t = time.perf_counter(); gen = sampling.generate_batch(g, p, prompts, sc, seed=0)
            best = min(best, time.perf_counter() - t)
        out[f"b{b}_ms_per_token"] = 1000 * best / 256
        out[f"b{b}_first_tokens"] = gen.tokens[0, :8].tolist()
print("RESULT " + json.dumps(out))
'''


def run_child(repo: str, what: str, steps: int) -> dict:
    env = dict(os.environ, MALLOC_ARENA_MAX="1", MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(1 << 36),
               PYTHONPATH=os.path.abspath(repo))
    proc = subprocess.run([sys.executable, "-c", CHILD, os.path.abspath(repo), what, str(steps)], env=env,
                          capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{repo} {what} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="checkout A (the baseline)")
    ap.add_argument("--b", default=".", help="checkout B")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8, help="timed train steps per process")
    ap.add_argument("--what", default="train,decode")
    args = ap.parse_args()
    results: dict = {}
    for r in range(args.rounds):
        order = [("A", args.a), ("B", args.b)] if r % 2 == 0 else [("B", args.b), ("A", args.a)]
        for what in args.what.split(","):
            for name, repo in order:
                res = run_child(repo, what, args.steps)
                for key, value in res.items():
                    results.setdefault(key, {}).setdefault(name, []).append(value)
                print(f"round {r + 1} {what} {name}: {res}", flush=True)
    print(f"\nA = {args.a}, B = {args.b}; medians over {args.rounds} rounds (alternating order)\n")
    print("| metric | A | B | B / A |\n|---|---:|---:|---:|")
    for key, by in results.items():
        if key.endswith("first_tokens"):
            same = all(x == by["A"][0] for x in by["A"] + by["B"])
            print(f"| {key} | {by['A'][0]} | {by['B'][0]} | {'same' if same else 'DIFFERENT'} |")
            continue
        a, b = statistics.median(by["A"]), statistics.median(by["B"])
        print(f"| {key} | {a:.4g} | {b:.4g} | {b / a:.3f} |")


if __name__ == "__main__":
    main()
