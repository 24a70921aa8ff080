"""Attention implementations on this machine's CPU: step time (forward + backward) and compiled
temporary memory, per implementation and row length T.

For q [B, T, H, hd], k, v [B, T, K, hd] (float32, one packed row of 3 documents per batch row) it
compiles `jax.value_and_grad` of Σ out·w through `lm.model.attention_ops.causal_attention` and
prints:

* temp MiB: XLA's `memory_analysis().temp_size_in_bytes` (scratch beyond arguments and outputs),
* ms: the median wall time of the compiled step over `--repeats` runs after one warm-up, the
  implementations alternating run by run (the cores are shared: drift hits all alike),
* ratio: time against `dense/64` (the CPU default: dense in causal query blocks of 64) at the
  same T, in the same run.

A step whose temporaries exceed `--run-limit-gib` is compiled (its memory reported) but not run.

    python benchmarks/bench_attention.py                          # T = 1k, 4k, 16k
    python benchmarks/bench_attention.py --seq-lens 2048,8192 --repeats 3
    python benchmarks/bench_attention.py --memory-only

Implementations: `dense/0` (one T×T block), `dense/c` (causal blocks of c), `blockwise/c` (flash
in XLA with blocks of c). splash and pallas_gpu run here only in Pallas interpret mode (a
correctness tool, timed it says nothing); cudnn needs a GPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lm.model import attention_ops as ops  # noqa: E402

MiB = 2**20


def inputs(b: int, t: int, h: int, kv: int, hd: int):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(b, t, h, hd)) / np.sqrt(hd), jnp.float32)
    k, v = (jnp.asarray(x, jnp.float32) for x in rng.normal(size=(2, b, t, kv, hd)))
    seg = np.ones((b, t), np.int32)
    seg[:, t // 3:], seg[:, 2 * t // 3:] = 2, 3  # 3 packed documents per row
    return q, k, v, jnp.asarray(seg)


def compile_step(impl: str, block: int, q, k, v, seg):
    w = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)

    def loss(q, k, v):
        return jnp.sum(ops.causal_attention(q, k, v, seg, impl, block=block) * w)

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    return compiled, compiled.memory_analysis().temp_size_in_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", default="1024,4096,16384")
    ap.add_argument("--impls", default="dense/0,dense/64,dense/512,blockwise/256,blockwise/512,blockwise/1024")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--run-limit-gib", type=float, default=6.0, help="compile but do not run steps above this")
    ap.add_argument("--memory-only", action="store_true")
    args = ap.parse_args()
    impls = [(name.split("/")[0], int(name.split("/")[1])) for name in args.impls.split(",")]
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, "
          f"B={args.batch} H={args.heads} K={args.kv_heads} hd={args.head_dim}, float32, fwd+bwd")
    print("| T | impl | temp MiB | ms (median) | ms (best) | ratio vs dense/64 |")
    print("|---:|---|---:|---:|---:|---:|")
    for t in (int(x) for x in args.seq_lens.split(",")):
        q, k, v, seg = inputs(args.batch, t, args.heads, args.kv_heads, args.head_dim)
        steps, temps, times = {}, {}, {}
        for impl, block in impls:
            compiled, temp = compile_step(impl, block, q, k, v, seg)
            temps[(impl, block)] = temp
            if not args.memory_only and temp <= args.run_limit_gib * 2**30:
                steps[(impl, block)] = compiled
                jax.block_until_ready(compiled(q, k, v))  # warm-up
                times[(impl, block)] = []
        for _ in range(args.repeats if steps else 0):
            for key, compiled in steps.items():
                start = time.perf_counter()
                jax.block_until_ready(compiled(q, k, v))
                times[key].append(time.perf_counter() - start)
        base = statistics.median(times[("dense", 64)]) if times.get(("dense", 64)) else None
        for key in impls:
            ms = statistics.median(times[key]) * 1e3 if times.get(key) else None
            best = min(times[key]) * 1e3 if times.get(key) else None
            ratio = f"{ms / (base * 1e3):.2f}" if ms is not None and base else "–"
            cell = lambda x: f"{x:.1f}" if x is not None else "not run"  # noqa: E731
            print(f"| {t} | {key[0]}/{key[1]} | {temps[key] / MiB:.1f} | {cell(ms)} | {cell(best)} | {ratio} |",
                  flush=True)


if __name__ == "__main__":
    main()
