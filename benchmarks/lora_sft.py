"""LoRA vs full fine-tuning of the imported Llama fixture on CPU (configs/lora.py: chat SFT through the
checkpoint's chat template, assistant-only loss): the same data, steps and schedule; per mode the trainable and frozen parameters, the final validation loss, the
median step time, the compiled step's per-device memory (XLA's buffer assignment) and the
process's peak resident memory.

    python benchmarks/lora_sft.py [--steps 300] [--modes full,lora,qlora] [--out /tmp/lora_sft]

Each mode runs `python -m lm.cli.train --config=configs/lora.py:<imported>,<mode>` in its own
process (the fixture is imported once, with `python -m lm.interop.hf import`). Step times come
from the run's metrics (tokens/s between log lines, the first interval, which holds the compile,
left out); the machine's cores are shared, so compare them as a ratio, not as absolutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "hf", "llama")
CHILD = ("import resource, sys, runpy\n"
         "sys.argv = ['lm.cli.train'] + sys.argv[1:]\n"
         "try:\n    runpy.run_module('lm.cli.train', run_name='__main__')\n"
         "except SystemExit:\n    pass\n"
         "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\n")


def run_mode(imported: str, mode: str, steps: int, out: str) -> dict:
    workdir = os.path.join(out, mode)
    args = [f"--config=configs/lora.py:{imported},{mode}", f"--workdir={workdir}", f"--config.train.steps={steps}",
            "--config.train.progress_bar=False", "--config.train.checkpoint_every=0"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "bench.log"), "w") as f:
        f.write(log)
    if proc.returncode or "peak_rss_kib" not in log:
        raise RuntimeError(f"{mode} failed:\n{log[-3000:]}")
    trained = int(re.search(r"model: ([\d,]+) parameters", log).group(1).replace(",", ""))
    frozen = re.search(r"frozen lora_base: ([\d,]+)", log)
    size, unit = re.search(r"total ([\d.]+) (MiB|GiB)", log).groups()
    total = float(size) * (1024 if unit == "GiB" else 1)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    tok_s = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(workdir, "config.json")) as f:
        train_cfg = json.load(f)["train"]
    tokens_per_step = train_cfg["batch_size"] * train_cfg["seq_len"]
    return {"mode": mode, "trainable": trained, "frozen": int(frozen.group(1).replace(",", "")) if frozen else 0,
            "valid_loss": summary.get("valid_loss"), "train_loss": summary.get("train_loss"),
            "step_ms": 1e3 * tokens_per_step / statistics.median(tok_s) if tok_s else float("nan"),
            "step_mib": total, "peak_rss_mib": int(re.search(r"peak_rss_kib (\d+)", log).group(1)) / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--modes", default="full,lora,qlora")
    p.add_argument("--out", default="/tmp/lora_sft")
    a = p.parse_args()
    imported = os.path.join(a.out, "imported")
    if not os.path.exists(os.path.join(imported, "config.json")):
        subprocess.run([sys.executable, "-m", "lm.interop.hf", "import", "--hf_dir", FIXTURE, "--workdir", imported],
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), check=True, capture_output=True)
    results = [run_mode(imported, mode, a.steps, a.out) for mode in a.modes.split(",")]
    print(f"\n{a.steps} steps of chat SFT (assistant-only loss), imported Llama fixture (configs/lora.py)\n")
    print("| mode | trainable params | frozen params | final valid loss | final train loss | step (ms, median) "
          "| compiled step (MiB/device) | peak RSS (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['mode']} | {r['trainable']:,} | {r['frozen']:,} | {r['valid_loss']:.4f} | {r['train_loss']:.4f} "
              f"| {r['step_ms']:.1f} | {r['step_mib']:.1f} | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
