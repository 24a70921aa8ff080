"""Tokens/s and MFU of the jitted train step, against a float32 matmul peak measured in the same run.

    python benchmarks/bench_train.py                 # both models, default settings
    python benchmarks/bench_train.py --steps 5 --only bench

MFU = model FLOPs per token (6 × matmul parameters) × tokens/s ÷ peak FLOP/s, where the
peak is a jitted [n, n] @ [n, n] float32 matmul timed on the same device right before each
step (this VM's speed drifts by up to ±15% within minutes, so steps and peaks are paired).
A second column also counts the attention score/value products (12·L·T·H·hd per token).
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lm.cli.runtime import malloc_tuned, tune_malloc  # noqa: E402

if __name__ == "__main__":
    tune_malloc()  # re-exec with glibc settings that keep XLA's step buffers mapped (lm/cli/runtime.py)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import base  # noqa: E402
from lm.parallel import sharding as shd  # noqa: E402
from lm import train  # noqa: E402
from lm.io.metrics import measure_peak_flops  # noqa: E402
from lm.model import ModelConfig, flops_per_token, param_count  # noqa: E402
from lm.objectives import pretrain  # noqa: E402
from lm.train.optim import make_optimizer  # noqa: E402

BENCH = dict(d_model=512, num_layers=8, num_heads=8, num_kv_heads=4, mlp_dim=1376)
MODELS = {
    # the benchmark model: d_model 512, 8 layers, 8 query / 4 kv heads, SwiGLU 1376, T=256, B=8
    "bench": (dict(BENCH, scan_layers=False), 256, 8),  # layers unrolled (model.scan_layers=False)
    "bench-scan": (dict(BENCH, scan_layers=True), 256, 8),  # the same under lax.scan (the default)
    "bench-full-attn": (dict(BENCH, scan_layers=False, attention_block=0), 256, 8),  # one T×T block
    # the main job's model (configs/default.py)
    "default": (dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=256, attention_block=64), 128, 32),
}


def build(name: str, vocab: int, loss_kind: str, **model_fields):
    """The jitted train step of benchmark model `name` (ModelConfig fields overridden by `model_fields`),
    its initial state, a global batch of random tokens, and the model FLOPs of one step."""
    fields, seq_len, batch = MODELS[name]
    cfg = ModelConfig(vocab_size=vocab, **{"attention_block": 64, **fields, **model_fields})
    config = base.get_config()
    config.loss.kind = loss_kind
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    opt, sched = make_optimizer(config.optimizer, 1000)
    state, setup = train.create_state(cfg, opt, mesh, config.mesh.rules, 0)
    step = train.jit_train_step(train.make_train_step(pretrain.make_loss_fn(config, setup.graphdef), opt, sched),
                                setup)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)
    local = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "loss_mask": np.ones((batch, seq_len), np.float32),
             "segment_ids": np.ones((batch, seq_len), np.int32),
             "positions": np.tile(np.arange(seq_len, dtype=np.int32), (batch, 1))}
    flops = flops_per_token(cfg, seq_len)
    return step, state, train.global_batch(local, mesh), flops, flops["model"] * batch * seq_len


def bench_model(name: str, steps: int, vocab: int, loss_kind: str, dtype: str, remat: bool, matmul_n: int) -> dict:
    _, seq_len, batch = MODELS[name]
    step, state, gb, flops, step_flops = build(name, vocab, loss_kind, dtype=dtype, remat=remat)
    t0 = time.perf_counter()
    state, m = step(state, gb)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times, peaks = [], []
    for _ in range(steps):  # paired: the peak is measured right before each step (the VM's speed drifts)
        peaks.append(measure_peak_flops(matmul_n, repeats=2))
        t0 = time.perf_counter()
        state, m = step(state, gb)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    mfus = [step_flops / t / p for t, p in zip(times, peaks)]
    return {"model": name, "params": param_count(state.params), "B×T": f"{batch}×{seq_len}", "dtype": dtype,
            "step_ms": 1e3 * statistics.median(times), "best_ms": 1e3 * min(times),
            "tok_s": batch * seq_len / statistics.median(times), "peak": statistics.median(peaks),
            "mfu": statistics.median(mfus), "mfu_best": max(mfus),
            "attn_factor": flops["total"] / flops["model"], "compile_s": compile_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {sorted(MODELS)}")
    ap.add_argument("--vocab", type=int, default=264)
    ap.add_argument("--loss", default="explicit", choices=["explicit", "fused"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--matmul_n", type=int, default=2048)
    args = ap.parse_args()
    rows = [bench_model(n, args.steps, args.vocab, args.loss, args.dtype, args.remat, args.matmul_n)
            for n in (args.only.split(",") if args.only else list(MODELS))]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}; glibc malloc tuned (lm/cli/runtime.py): "
          f"{malloc_tuned()}; loss {args.loss}\n")
    print(f"Each of {args.steps} steps (after the compiling one) is paired with a float32 {args.matmul_n}² "
          f"matmul timed just before it (best of 2): MFU = the step's model FLOPs/s over that peak. "
          f"Median over the pairs, best pair in brackets.\n")
    print("| model | params | B×T | dtype | step ms (median / best) | tokens/s | peak GFLOP/s (median) "
          "| MFU 6N | MFU 6N + attn | compile (s) |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        a = r["attn_factor"]
        print(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['B×T']} | {r['dtype']} | {r['step_ms']:.0f} / "
              f"{r['best_ms']:.0f} | {r['tok_s']:,.0f} | {r['peak'] / 1e9:.1f} | {100 * r['mfu']:.1f}% "
              f"({100 * r['mfu_best']:.1f}%) | {100 * r['mfu'] * a:.1f}% ({100 * r['mfu_best'] * a:.1f}%) | "
              f"{r['compile_s']:.1f} |")


if __name__ == "__main__":
    main()
