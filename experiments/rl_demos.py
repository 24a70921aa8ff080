"""The RL demonstrations of experiments/rl.md, end to end (each stage ≤ 10 minutes on 2 CPU cores):

  1. Markov known optimum: pretrain on the chain (configs/default.py, 8 characters, order 1), then
     GRPO with the reward r(x) = Σ g(x_t) and the sampled KL in the reward (configs/grpo.py:markov);
     summary.json: rl_fraction_of_optimal_gain (target ≥ 0.9).
  2. Exact match: a brief SFT run (configs/sft.py stopped at step 1000 of its 1600-step schedule),
     then GRPO with the exact-match reward (configs/grpo.py: 400 steps of 16 prompts × 8 samples);
     summary.json: sft_exact_match, rl_exact_match, error_rate_ratio (target ≤ 0.5: the held-out
     error rate at least halved).

    python experiments/rl_demos.py --out=runs/rl_demos [--only=markov|exact_match]

Prints a table of the numbers from each run's summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

STAGES = {
    "markov": [
        ("markov_pretrain", ["--config=configs/default.py", "--config.data.markov.alphabet=abcdefgh",
                             "--config.data.markov.order=1", "--config.train.steps=300", "--config.train.seq_len=64",
                             "--config.train.eval_every=0", "--config.train.checkpoint_every=0",
                             "--config.eval.evaluators="]),
        ("markov_grpo", ["--config=configs/grpo.py:markov", "--config.train.init_from={out}/markov_pretrain"]),
    ],
    "exact_match": [
        ("sft_brief", ["--config=configs/sft.py", "--config.train.steps=1000", "--config.optimizer.decay_steps=1600",
                       "--config.eval.exact_match.continue_tokens=0"]),
        ("exact_match_grpo", ["--config=configs/grpo.py", "--config.train.init_from={out}/sft_brief"]),
    ],
}
KEYS = ("wall_seconds", "rl_fraction_of_optimal_gain", "sft_fraction_of_optimal_gain", "rl_markov_j",
        "markov_j_optimal", "markov_j_reference_chain", "exact_match", "sft_exact_match", "rl_exact_match",
        "error_rate_ratio", "kl_gap")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/rl_demos")
    parser.add_argument("--only", choices=sorted(STAGES), default=None)
    args = parser.parse_args()
    rows = []
    for demo, stages in STAGES.items():
        if args.only and demo != args.only:
            continue
        for name, flags in stages:
            workdir = os.path.join(args.out, name)
            command = [sys.executable, "-m", "lm.cli.train", *[f.format(out=args.out) for f in flags],
                       "--config.train.progress_bar=False", f"--workdir={workdir}"]
            print(" ".join(command), flush=True)
            subprocess.run(command, check=True)
            with open(os.path.join(workdir, "summary.json")) as f:
                summary = json.load(f)
            rows.append((name, {k: summary[k] for k in KEYS if k in summary}))
    for name, values in rows:
        print(f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items()))


if __name__ == "__main__":
    main()
