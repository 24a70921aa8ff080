"""Memory and speed of the loss's value_and_grad: fused vs materialized logits.

For hidden states ``[N, D]`` and an output projection ``[D, V]`` (float32) it
compiles ``jax.value_and_grad`` of the mean loss with respect to both, and prints

* temp MiB: XLA's ``memory_analysis().temp_size_in_bytes`` of the compiled
  function (scratch memory beyond its arguments and outputs),
* median wall time over ``--repeats`` runs after one warm-up run,

for three methods: ``fused`` (``lm.losses.fused_cross_entropy``, logits never
built), ``ce`` (logits = h @ W, then ``lm.losses.cross_entropy``) and ``optax``
(logits = h @ W, then ``optax.softmax_cross_entropy_with_integer_labels``).
Ratios are against ``ce`` at the same V, in the same run.

    python benchmarks/bench_losses.py                       # N=8192 D=1024 V=32768,131072
    python benchmarks/bench_losses.py --n 1024 --d 256 --vocab 8192 --repeats 3   # quick
    python benchmarks/bench_losses.py --memory-only          # compile only, no timing
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
import optax  # noqa: E402

from lm.losses import cross_entropy, fused_cross_entropy  # noqa: E402

MiB = 2**20


def make_losses(chunk_size):
    def fused(h, w, t):
        return fused_cross_entropy(h, w, t, chunk_size=chunk_size).mean

    def ce(h, w, t):
        return cross_entropy(h @ w, t).mean

    def optax_ce(h, w, t):
        return optax.softmax_cross_entropy_with_integer_labels(h @ w, t).mean()

    return {"fused": fused, "ce": ce, "optax": optax_ce}


def measure(loss_fn, args, repeats):
    step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
    compiled = step.lower(*args).compile()
    mem = compiled.memory_analysis()
    temp = mem.temp_size_in_bytes if mem is not None else float("nan")
    times, value = [], float("nan")
    if repeats > 0:
        jax.block_until_ready(compiled(*args))  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            out = jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - start)
        value = float(out[0])
        del out
    return temp, times, value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8192, help="tokens N")
    parser.add_argument("--d", type=int, default=1024, help="hidden size D")
    parser.add_argument("--vocab", type=str, default="32768,131072", help="comma-separated V values")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median)")
    parser.add_argument("--chunk-size", type=int, default=None, help="fused chunk (default: auto)")
    parser.add_argument("--methods", type=str, default="fused,ce,optax")
    parser.add_argument("--memory-only", action="store_true", help="compile and report memory, no runs")
    opts = parser.parse_args(argv)
    repeats = 0 if opts.memory_only else opts.repeats
    methods = opts.methods.split(",")

    print(f"# bench_losses: N={opts.n} D={opts.d} float32, value_and_grad wrt (hidden, kernel), "
          f"repeats={repeats}, chunk={opts.chunk_size or 'auto'}")
    print(f"# jax {jax.__version__}, backend {jax.default_backend()}, {jax.devices()[0].device_kind}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print()
    print("| V | method | temp MiB | temp vs ce | median s | time vs ce | all runs s | loss |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for vocab in [int(v) for v in opts.vocab.split(",")]:
        keys = jax.random.split(jax.random.PRNGKey(vocab), 3)
        h = jax.random.normal(keys[0], (opts.n, opts.d), jnp.float32)
        w = jax.random.normal(keys[1], (opts.d, vocab), jnp.float32) / opts.d**0.5
        t = jax.random.randint(keys[2], (opts.n,), 0, vocab)
        losses = make_losses(opts.chunk_size)
        # The baseline first, so that every row can be printed as soon as it is measured.
        order = sorted(methods, key=lambda name: name != "ce")
        base = None
        for name in order:
            temp, times, value = measure(losses[name], (h, w, t), repeats)
            secs = statistics.median(times) if times else float("nan")
            if name == "ce":
                base = (temp, secs)
            mem_ratio = f"{base[0] / temp:.1f}x less" if base and temp else "-"
            time_ratio = f"{secs / base[1]:.2f}x" if base and repeats else "-"
            runs = " / ".join(f"{x:.1f}" for x in times) or "-"
            print(f"| {vocab} | {name} | {temp / MiB:,.0f} | {mem_ratio} | {secs:.2f} | {time_ratio} "
                  f"| {runs} | {value:.4f} |", flush=True)
        del h, w, t


if __name__ == "__main__":
    main()
