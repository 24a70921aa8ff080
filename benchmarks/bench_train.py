"""Tokens/s and MFU of the jitted train step, against a float32 matmul peak measured in the same run.

    python benchmarks/bench_train.py                 # both models, default settings
    python benchmarks/bench_train.py --steps 5 --only bench

MFU = model FLOPs per token (6 × matmul parameters) × tokens/s ÷ peak FLOP/s, where the
peak is the best time of a jitted [n, n] @ [n, n] float32 matmul on the same device.
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

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import base  # noqa: E402
from lm import sharding as shd  # noqa: E402
from lm import train  # noqa: E402
from lm.metrics import measure_peak_flops  # noqa: E402
from lm.model import ModelConfig, flops_per_token, param_count  # noqa: E402
from lm.objectives import pretrain  # noqa: E402
from lm.optim import make_optimizer  # noqa: E402

MODELS = {
    # the benchmark model: d_model 512, 8 layers, 8 query / 4 kv heads, SwiGLU 1376, T=256, B=8
    "bench": (dict(d_model=512, num_layers=8, num_heads=8, num_kv_heads=4, mlp_dim=1376), 256, 8),
    # the main job's model (configs/default.py)
    "default": (dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=256), 128, 32),
}


def bench_model(name: str, steps: int, vocab: int, loss_kind: str, dtype: str, remat: bool) -> dict:
    fields, seq_len, batch = MODELS[name]
    cfg = ModelConfig(vocab_size=vocab, dtype=dtype, remat=remat, **fields)
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
    gb = train.global_batch(local, mesh)
    t0 = time.perf_counter()
    state, m = step(state, gb)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = step(state, gb)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tok_s = batch * seq_len / step_s
    flops = flops_per_token(cfg, seq_len)
    return {"model": name, "params": param_count(state.params), "B×T": f"{batch}×{seq_len}",
            "dtype": dtype, "loss": loss_kind, "step_ms": 1e3 * step_s, "tok_s": tok_s,
            "model_flops_s": flops["model"] * tok_s, "total_flops_s": flops["total"] * tok_s,
            "compile_s": compile_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--only", choices=sorted(MODELS), default=None)
    ap.add_argument("--vocab", type=int, default=264)
    ap.add_argument("--loss", default="explicit", choices=["explicit", "fused"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--matmul_n", type=int, default=2048)
    args = ap.parse_args()
    peak = measure_peak_flops(args.matmul_n)
    rows = [bench_model(n, args.steps, args.vocab, args.loss, args.dtype, args.remat)
            for n in ([args.only] if args.only else list(MODELS))]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    print(f"peak (float32 {args.matmul_n}² matmul, same run): {peak / 1e9:.1f} GFLOP/s\n")
    print("| model | params | B×T | dtype | loss | step (ms) | tokens/s | MFU (6N) | MFU (6N + attn) | compile (s) |")
    print("|---|---:|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['B×T']} | {r['dtype']} | {r['loss']} | "
              f"{r['step_ms']:.1f} | {r['tok_s']:,.0f} | {100 * r['model_flops_s'] / peak:.1f}% | "
              f"{100 * r['total_flops_s'] / peak:.1f}% | {r['compile_s']:.1f} |")


if __name__ == "__main__":
    main()
