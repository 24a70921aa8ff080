"""Per-chip memory of real train steps from the TPU compiler (libtpu, deviceless: no chip needed).

    python benchmarks/bench_tpu_memory.py attention [--layers=2]   # dense vs splash at T = 8k, 32k
    python benchmarks/bench_tpu_memory.py remat [--layers=2]       # llama_8b per model.remat policy
    python benchmarks/bench_tpu_memory.py configs [--layers=0]     # every shipped TPU config on its slice

Each row compiles `lm.train.memory.plan_config` (the config's real train step: model, fused loss,
AdamW, shardings) for a TPU topology and reads `memory_analysis()`. `--layers=L` compiles L layers of
the real widths and, for `configs`, also L/2 layers: the per-layer slope of the two gives the
full-depth estimate (printed beside, with the linearity check: L/2 → L predicted from the
constant part). `T×T arrays` counts array shapes in the compiled HLO with two dimensions ≥ T
(scores or masks that grow as T²). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import llama_1b, llama_8b  # noqa: E402
from lm.train import memory  # noqa: E402

GiB = 2**30


def t_squared_arrays(hlo: str, t: int) -> int:
    """Array shapes in `hlo` with at least two dimensions >= t."""
    count = 0
    for dims in re.findall(r"\[([0-9,]+)\]", hlo):
        sizes = [int(x) for x in dims.split(",") if x]
        if sum(s >= t for s in sizes) >= 2:
            count += 1
    return count


def compile_row(config, topology: str = "") -> dict:
    devs, topo = memory.tpu_devices(config, topology)
    t0 = time.perf_counter()
    compiled, report, info = memory.plan_config(config, devs)
    return {"report": report, "info": info, "topology": topo, "seconds": time.perf_counter() - t0,
            "t2": t_squared_arrays(compiled.as_text(), config.train.seq_len)}


def attention(layers: int, seqs=(8192, 32768), impls=("dense", "splash")) -> None:
    print(f"llama_8b widths, {layers} layers, 4 rows (one per chip) on v5p:2x2x1, fsdp 4, remat full, bf16\n")
    print("| T | attention | temporaries / chip (GiB) | total / chip (GiB) | T×T arrays in HLO | compile (s) |")
    print("|---:|---|---:|---:|---:|---:|")
    for t in seqs:
        for impl in impls:
            c = llama_8b.get_config("v5p-128")
            c.model.num_layers, c.model.attention_impl, c.model.attention_block = layers, impl, 0
            c.mesh.fsdp, c.train.batch_size, c.train.seq_len = 4, 4, t
            c.mesh.slice = "v5p-8"
            r = compile_row(c)
            rep = r["report"]
            print(f"| {t} | {impl} | {rep.temporaries / GiB:.2f} | {rep.total / GiB:.2f} | {r['t2']} | "
                  f"{r['seconds']:.0f} |", flush=True)


def remat(layers: int) -> None:
    print(f"llama_8b:v5p-128 widths and batch per chip (4 rows × 4096), {layers} layers, 4 chips (v5p:2x2x1, "
          "fsdp 4, batch 16)\n")
    print("| model.remat | temporaries / chip (GiB) | total / chip (GiB) | compile (s) |")
    print("|---|---:|---:|---:|")
    for policy in ("none", "full", "save_qkv_proj", "save_out_proj", "save_dots", "offload"):
        c = llama_8b.get_config("v5p-128")
        c.model.num_layers, c.model.remat = layers, policy
        c.mesh.fsdp, c.train.batch_size, c.mesh.slice = 4, 16, "v5p-8"
        r = compile_row(c)
        print(f"| {policy} | {r['report'].temporaries / GiB:.2f} | {r['report'].total / GiB:.2f} | "
              f"{r['seconds']:.0f} |", flush=True)


SHIPPED = [(llama_1b, "v5p-32"), (llama_1b, "v6e-16"), (llama_8b, "v5p-128"), (llama_8b, "v6e-64"),
           (llama_8b, "v5p-128-32k")]


def configs(layers: int, only: str = "") -> None:
    print("| config | topology | layers compiled | params | optimizer | temporaries | total | HBM | fits | "
          "T×T arrays | compile (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for module, arg in SHIPPED:
        if only and arg not in only.split(","):
            continue
        c = module.get_config(arg)
        full = c.model.num_layers
        rows = []
        for n in ([layers // 2, layers] if layers else [full]):
            c.model.num_layers = n
            rows.append((n, compile_row(c)))
        name = f"{module.__name__.split('.')[-1]}.py:{arg}"
        for n, r in rows:
            rep = r["report"]
            print(f"| `{name}` | {r['topology']} | {n} | {rep.params / GiB:.2f} | {rep.opt_state / GiB:.2f} | "
                  f"{rep.temporaries / GiB:.2f} | {rep.total / GiB:.2f} | {rep.capacity / GiB:.1f} | "
                  f"{rep.verdict} | {r['t2']} | {r['seconds']:.0f} |", flush=True)
        if layers:  # linear in depth: total(L) = a + b·L from the two compiles, extrapolated to full depth
            (n1, r1), (n2, r2) = rows
            slope = (r2["report"].total - r1["report"].total) / (n2 - n1)
            temp_slope = (r2["report"].temporaries - r1["report"].temporaries) / (n2 - n1)
            est = r2["report"].total + slope * (full - n2)
            budget = r2["report"].budget
            print(f"| `{name}` extrapolated | | {full} | | | {(r2['report'].temporaries + temp_slope * (full - n2)) / GiB:.2f}"
                  f" | {est / GiB:.2f} | {r2['report'].capacity / GiB:.1f} | "
                  f"{'fits' if est <= budget else 'DOES NOT FIT'} | | |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["attention", "remat", "configs"])
    ap.add_argument("--layers", type=int, default=None, help="layers compiled (configs: 0 = full depth)")
    ap.add_argument("--only", default="", help="configs: comma-separated slice arguments (default: all)")
    ap.add_argument("--seqs", default="8192,32768", help="attention: sequence lengths")
    ap.add_argument("--impls", default="dense,splash", help="attention: implementations")
    args = ap.parse_args()
    layers = args.layers if args.layers is not None else (0 if args.what == "configs" else 2)
    if args.what == "configs":
        configs(layers, args.only)
    elif args.what == "attention":
        attention(layers, [int(t) for t in args.seqs.split(",")], args.impls.split(","))
    else:
        remat(layers)


if __name__ == "__main__":
    main()
