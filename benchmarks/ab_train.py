"""Paired A/B of two variants of a benchmark model's train step, in one process.

    python benchmarks/ab_train.py --b attention_block=128               # A: the model as in bench_train
    python benchmarks/ab_train.py --a scan_layers=True --b scan_layers=False --steps 12
    python benchmarks/ab_train.py --model default --b loss=fused

On this VM the speed drifts by ±10% within minutes, so two separate runs of bench_train.py cannot
resolve a change of a few percent. Here both variants are compiled first; then their steps
alternate (A B, B A, A B, ...), each paired with a float32 matmul peak measured just before it, so
the drift hits both alike. Printed: median step time, the median and best of the per-pair MFU, and
the ratio of the median step times B / A. A variant is a list of `field=value`: ModelConfig fields
(attention_block, scan_layers, remat, dtype, ...) or `loss=explicit|fused`.

For a change to the code itself, make it switchable by a ModelConfig field while you measure, or
run the two commits' benchmarks alternately.
"""

from __future__ import annotations

import argparse
import ast
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lm.cli.runtime import tune_malloc  # noqa: E402

if __name__ == "__main__":
    tune_malloc()  # the same glibc settings as bench_train.py and lm.cli.train

import jax  # noqa: E402

from bench_train import MODELS, build  # noqa: E402
from lm.io.metrics import measure_peak_flops  # noqa: E402


def parse_variant(text: str) -> dict:
    """'a=1,b=True,c=float32' → {'a': 1, 'b': True, 'c': 'float32'}; raises on a malformed item."""
    fields = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"variant item {item!r} is not field=value")
        try:
            fields[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            fields[key.strip()] = value.strip()
    return fields


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="bench", choices=sorted(MODELS))
    ap.add_argument("--a", default="", help="variant A: field=value,... (default: the model as it is)")
    ap.add_argument("--b", default="", help="variant B: field=value,...")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    ap.add_argument("--vocab", type=int, default=264)
    ap.add_argument("--matmul_n", type=int, default=2048)
    args = ap.parse_args()

    variants = {}
    for name, text in (("A", args.a), ("B", args.b)):
        fields = parse_variant(text)
        loss = fields.pop("loss", "explicit")
        step, state, batch, _, step_flops = build(args.model, args.vocab, loss, **fields)
        state, metrics = step(state, batch)  # compile
        jax.block_until_ready(metrics)
        variants[name] = {"text": text or "(as in bench_train)", "step": step, "state": state, "batch": batch,
                          "flops": step_flops, "times": [], "mfus": []}
    for i in range(args.steps):
        for name in ("AB" if i % 2 == 0 else "BA"):
            v = variants[name]
            peak = measure_peak_flops(args.matmul_n, repeats=2)
            t0 = time.perf_counter()
            v["state"], metrics = v["step"](v["state"], v["batch"])
            jax.block_until_ready(metrics)
            elapsed = time.perf_counter() - t0
            v["times"].append(elapsed)
            v["mfus"].append(v["flops"] / elapsed / peak)

    print(f"model {args.model}, {args.steps} alternating steps per variant, each paired with a float32 "
          f"{args.matmul_n}² matmul peak\n")
    print("| variant | fields | step ms (median) | MFU 6N (median / best) |\n|---|---|---:|---:|")
    for name, v in variants.items():
        print(f"| {name} | {v['text']} | {1e3 * statistics.median(v['times']):.0f} | "
              f"{100 * statistics.median(v['mfus']):.1f}% / {100 * max(v['mfus']):.1f}% |")
    ratio = statistics.median(variants["B"]["times"]) / statistics.median(variants["A"]["times"])
    print(f"\nstep time B / A (medians): {ratio:.3f}")


if __name__ == "__main__":
    main()
