"""Step time and tokens/s of the default model (configs/default.py) on 1 device vs every mesh
shape over 8 virtual CPU devices: a check of the sharding overheads, not of speed-up (the 8
virtual devices share this machine's cores).

    python benchmarks/bench_mesh.py                       # all shapes, Markdown table
    python benchmarks/bench_mesh.py --steps 20 --meshes 1x8x1,2x2x2

Each case runs in its own process (the device count is fixed when JAX starts), with the real
train step of lm.train jitted with the mesh's shardings, a batch of random tokens of the
default shape (32 × 128) and the byte tokenizer's vocabulary (263). The step time is the best
of `--steps` steps after one warm-up step (the median beside it); "× 1 device" divides it by
the 1-device time of the same run. The per-device memory comes from the compiled step's memory
analysis (deterministic, unlike the times on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ["1x1x1", "8x1x1", "1x8x1", "1x1x8", "2x2x2", "2x4x1", "4x1x2", "1x4x2"]
VOCAB = 263  # the byte tokenizer's


def child(mesh_name: str, steps: int) -> dict:
    """One case, in a process started with the right device count."""
    sys.path.insert(0, REPO)
    import jax
    import numpy as np

    from configs import default
    from lm.train import memory
    from lm.parallel import sharding as shd
    from lm import train
    from lm.cli.train import build_model_config
    from lm.objectives import pretrain
    from lm.train.optim import make_optimizer

    config = default.get_config()
    sizes = dict(zip(shd.MESH_AXES, map(int, mesh_name.split("x"))))
    devices = jax.devices()[:int(np.prod(list(sizes.values())))]
    mesh = shd.make_mesh(sizes, devices)
    model_cfg = build_model_config(config, VOCAB)
    tc = config.train
    opt, sched = make_optimizer(config.optimizer, tc.steps)
    state, setup = train.create_state(model_cfg, opt, mesh, config.mesh.rules, config.seed)
    jitted = train.jit_train_step(train.make_train_step(pretrain.make_loss_fn(config, setup.graphdef), opt, sched),
                                  setup)
    t0 = time.perf_counter()
    step = memory.compile_step(jitted, setup, tc.batch_size, tc.seq_len)
    compile_s = time.perf_counter() - t0
    report = memory.analyze(step, setup, capacity=None)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, (tc.batch_size, tc.seq_len + 1)).astype(np.int32)
    local = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "loss_mask": np.ones((tc.batch_size, tc.seq_len), np.float32),
             "segment_ids": np.ones((tc.batch_size, tc.seq_len), np.int32),
             "positions": np.tile(np.arange(tc.seq_len, dtype=np.int32), (tc.batch_size, 1))}
    batch = train.global_batch(local, mesh)
    state, m = step(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_s = min(times)  # the least disturbed by other load on the machine
    return {"mesh": mesh_name, "devices": len(devices), "step_ms": 1e3 * step_s,
            "median_ms": 1e3 * statistics.median(times),
            "tok_s": tc.batch_size * tc.seq_len / step_s, "compile_s": compile_s, "loss": float(m["loss"]),
            "params_kib": report.params / 1024, "opt_kib": report.opt_state / 1024,
            "temp_kib": report.temporaries / 1024, "process_devices": jax.device_count()}


def run_case(mesh_name: str, steps: int, devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    out = subprocess.run([sys.executable, __file__, "--child", mesh_name, "--steps", str(steps)], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"case {mesh_name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--meshes", default=",".join(MESHES), help="data x fsdp x tensor shapes, comma-separated")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return
    rows = [run_case("1x1x1", args.steps, 1) | {"note": "a process with 1 device"}]
    for name in args.meshes.split(","):
        rows.append(run_case(name, args.steps, 8) | {"note": "" if name != "1x1x1" else "1 of 8 virtual devices"})
    base = rows[0]["step_ms"]
    import jax

    print(f"default model (configs/default.py), batch 32 × 128 tokens, float32, jax {jax.__version__}, "
          f"{args.steps} steps per case (best; median in brackets)\n")
    print("| mesh (data×fsdp×tensor) | devices | step (ms) | × 1 device | tokens/s | compile (s) | "
          "params / opt / temps per device (KiB) | loss after 1+steps |  |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---|")
    for r in rows:
        print(f"| {r['mesh']} | {r['devices']} | {r['step_ms']:.1f} ({r['median_ms']:.0f}) | "
              f"{r['step_ms'] / base:.2f} | "
              f"{r['tok_s']:,.0f} | {r['compile_s']:.1f} | {r['params_kib']:.0f} / {r['opt_kib']:.0f} / "
              f"{r['temp_kib']:.0f} | {r['loss']:.5f} | {r['note']} |")


if __name__ == "__main__":
    main()
