"""Checkpoint speed: save and restore of a ~110M-parameter train state, and the step-time cost
of saving asynchronously every N steps.

    python benchmarks/bench_checkpoint.py                      # both parts, writes results/checkpoint.md
    python benchmarks/bench_checkpoint.py --skip_big --steps 20

Part 1 (`lm.io.checkpoint.Checkpointer`, one device): the train state of a GPT-2-small-like model
(vocab 32000, d_model 768, 12 layers, 12 heads, SwiGLU 2048, tied embeddings: 110M parameters;
with AdamW's two moments 3 × 440 MB). For each save: the time `save` blocks the caller
(copy to host memory; the checksum pass is only dispatched), the time until it is on disk
(`wait`: checksums, compression, writes in a background thread), the same with synchronous
saving, and the time to restore it (shape check + read + checksum verification). Orbax's
plain restore (no checksums) and the checksum pass alone are timed too, as the baselines.
Restores read files just written, i.e. mostly from the OS page cache.

Part 2: a small model trained for `--steps` steps with no checkpoints (the baseline), with an
asynchronous save every `--every` steps, and with a synchronous save every `--every` steps,
in alternation, `--repeats` times; the median ms/step of each, its ratio to the baseline, and
the median time one `save()` call blocks the loop (after the step it saves has finished).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from absl import logging  # noqa: E402

from configs import base  # noqa: E402
from lm.io import checkpoint as ckpt  # noqa: E402
from lm.io import checksum  # noqa: E402
from lm.parallel import sharding as shd  # noqa: E402
from lm import train  # noqa: E402
from lm.model import ModelConfig, param_count  # noqa: E402
from lm.objectives import pretrain  # noqa: E402
from lm.train.optim import make_optimizer  # noqa: E402

BIG = ModelConfig(vocab_size=32000, d_model=768, num_layers=12, num_heads=12, num_kv_heads=12, mlp_dim=2048)
SMALL = ModelConfig(vocab_size=8192, d_model=256, num_layers=4, num_heads=4, num_kv_heads=4, mlp_dim=768)
SMALL_BATCH = (4, 64)  # B, T


def _state(cfg: ModelConfig):
    """A train state whose AdamW moments hold random numbers, as after training (fresh moments are
    zeros, which compress to nothing and would flatter the save)."""
    config = base.get_config()
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    opt, sched = make_optimizer(config.optimizer, 1000)
    state, setup = train.create_state(cfg, opt, mesh, config.mesh.rules, 0)

    def randomize(tree):
        leaves, treedef = jax.tree.flatten(tree)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        leaves = [jnp.abs(jax.random.normal(k, x.shape, x.dtype)) * 1e-3 if jnp.issubdtype(x.dtype, jnp.floating)
                  else x for k, x in zip(keys, leaves)]
        return jax.tree.unflatten(treedef, leaves)

    state = jax.jit(lambda s: s._replace(opt_state=randomize(s.opt_state)),
                    out_shardings=setup.state_shardings, donate_argnums=0)(state)
    return jax.block_until_ready(state), setup, opt, sched, config


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(path) for f in names)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return time.perf_counter() - t0, out


def bench_big(repeats: int, root: str) -> tuple[list[dict], dict]:
    state, setup, *_ = _state(BIG)
    target = ckpt.abstract_with_shardings(setup.abstract_state, setup.state_shardings)
    checksum.fingerprints(state)  # compile the checksum pass once
    times: dict[str, list[float]] = {k: [] for k in ("fingerprint", "async_block", "async_total", "sync_total",
                                                      "restore", "orbax_restore")}
    size = 0
    for i in range(repeats):
        for mode in ("async", "sync"):
            workdir = os.path.join(root, f"big_{mode}_{i}")
            writer = ckpt.Checkpointer(workdir, keep=1, async_save=mode == "async")
            t0 = time.perf_counter()
            writer.save(1, state, {"batches": 1})
            blocked = time.perf_counter() - t0
            writer.wait()
            times[f"{mode}_total"].append(time.perf_counter() - t0)
            if mode == "async":
                times["async_block"].append(blocked)
                size = _du(writer.step_path(1))
                t, restored = _timed(lambda: writer.restore(target).tree)
                times["restore"].append(t)
                np.testing.assert_array_equal(np.asarray(restored.params["embed"]), np.asarray(state.params["embed"]))
                del restored
                args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
                times["orbax_restore"].append(_timed(lambda: writer.manager.restore(1, args=args).state)[0])
                times["fingerprint"].append(_timed(lambda: checksum.fingerprints(state))[0])
            writer.close()
            shutil.rmtree(workdir)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_params = param_count(state.params)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    rows = [
        {"operation": "save, async: time save() blocks the train loop", "s": med["async_block"]},
        {"operation": "save, async: until on disk", "s": med["async_total"]},
        {"operation": "save, synchronous", "s": med["sync_total"]},
        {"operation": "restore (shape check + read + checksum verification)", "s": med["restore"]},
        {"operation": "baseline: orbax restore alone (no checks)", "s": med["orbax_restore"]},
        {"operation": "baseline: checksum pass alone", "s": med["fingerprint"]},
    ]
    for row in rows:
        row["GB/s"] = state_bytes / row["s"] / 1e9
    info = {"params": n_params, "state_bytes": state_bytes, "disk_bytes": size, "repeats": repeats}
    return rows, info


def bench_overhead(steps: int, every: int, repeats: int, root: str) -> tuple[list[dict], dict]:
    state, setup, opt, sched, config = _state(SMALL)
    step_fn = train.jit_train_step(train.make_train_step(pretrain.make_loss_fn(config, setup.graphdef), opt, sched),
                                   setup)
    batch_size, seq_len = SMALL_BATCH
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, SMALL.vocab_size, (batch_size, seq_len + 1)).astype(np.int32)
    batch = train.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                                "loss_mask": np.ones((batch_size, seq_len), np.float32),
                                "segment_ids": np.ones((batch_size, seq_len), np.int32),
                                "positions": np.tile(np.arange(seq_len, dtype=np.int32), (batch_size, 1))},
                               setup.mesh)
    state, m = step_fn(state, batch)  # compile
    jax.block_until_ready(m)
    checksum.fingerprints(state)
    per_step: dict[str, list[float]] = {"none": [], "async": [], "sync": []}
    blocked: dict[str, list[float]] = {"none": [0.0], "async": [], "sync": []}
    for i in range(repeats):
        for mode in per_step:
            workdir = os.path.join(root, f"small_{mode}_{i}")
            writer = None if mode == "none" else ckpt.Checkpointer(workdir, keep=2, async_save=mode == "async")
            t0 = time.perf_counter()
            for s in range(1, steps + 1):
                state, m = step_fn(state, batch)
                if writer is not None and s % every == 0:
                    jax.block_until_ready(state)  # save copies the state to host: it waits for this step anyway
                    t_save = time.perf_counter()
                    writer.save(s, state, {"batches": s})
                    blocked[mode].append(time.perf_counter() - t_save)
            jax.block_until_ready(m)
            per_step[mode].append((time.perf_counter() - t0) / steps)
            if writer is not None:
                writer.wait()
                writer.close()
                shutil.rmtree(workdir)
    base_ms = 1e3 * statistics.median(per_step["none"])
    labels = {"none": "no checkpoints", "async": f"async save every {every} steps",
              "sync": f"synchronous save every {every} steps"}
    rows = []
    for mode, values in per_step.items():
        ms = 1e3 * statistics.median(values)
        rows.append({"run": labels[mode], "ms/step": ms, "× baseline": ms / base_ms,
                     "ms blocked in save()": 1e3 * statistics.median(blocked[mode])})
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    return rows, {"params": param_count(state.params), "state_bytes": state_bytes}


def _table(rows: list[dict]) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:,.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30, help="steps per run in part 2")
    ap.add_argument("--every", type=int, default=10, help="save interval in part 2")
    ap.add_argument("--skip_big", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "checkpoint.md"))
    args = ap.parse_args()
    logging.set_verbosity(logging.WARNING)
    root = tempfile.mkdtemp(prefix="bench_checkpoint_")
    load = os.getloadavg()
    parts = ["# Checkpoint save / restore speed", "",
             f"`python benchmarks/bench_checkpoint.py --repeats {args.repeats} --steps {args.steps} "
             f"--every {args.every}`; jax {jax.__version__}, orbax-checkpoint {ocp.__version__}, "
             f"device {jax.devices()[0].device_kind}; medians of {args.repeats} repeats; load average at start "
             f"{load[0]:.1f} (a shared machine: other jobs ran at the same time)."]
    try:
        if not args.skip_big:
            rows, info = bench_big(args.repeats, root)
            parts += ["", f"## ~110M-parameter train state: {info['params']:,} parameters, "
                      f"{info['state_bytes'] / 1e9:.2f} GB with the AdamW moments, "
                      f"{info['disk_bytes'] / 1e9:.2f} GB on disk", "", _table(rows)]
        rows, info = bench_overhead(args.steps, args.every, args.repeats, root)
        parts += ["", f"## Step time with checkpoints every {args.every} steps: {info['params']:,}-parameter model "
                  f"({info['state_bytes'] / 1e6:.0f} MB state), B×T = {SMALL_BATCH[0]}×{SMALL_BATCH[1]}, "
                  f"{args.steps} steps per run", "", _table(rows)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    lscpu = subprocess.run(["bash", "-c", "lscpu | head -20"], capture_output=True, text=True).stdout
    parts += ["", "## Machine (`lscpu | head -20`)", "", "```", lscpu.rstrip(), "```", ""]
    text = "\n".join(parts)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
