"""The RL demonstrations of experiments/rl.md, end to end (each stage ≤ 10 minutes on 2 CPU cores):

  1. Markov known optimum: pretrain on the chain (configs/default.py, 8 characters, order 1), then
     GRPO with the reward r(x) = Σ g(x_t) and the sampled KL in the reward (configs/grpo.py:markov);
     summary.json: rl_fraction_of_optimal_gain (target ≥ 0.9).
  2. Exact match: a brief SFT run (configs/sft.py stopped at step 1000 of its 1600-step schedule),
     then GRPO with the exact-match reward (configs/grpo.py: 400 steps of 16 prompts × 8 samples);
     summary.json: sft_exact_match, rl_exact_match, error_rate_ratio (target ≤ 0.5: the held-out
     error rate at least halved).
  3. The GRPO family on the exact-match task (--loss_types): the exact-match GRPO stage once per
     member of lm.losses.policy_loss's family (FAMILY below: each with the settings its paper and
     TRL recommend), from the same SFT run, with the same budget and seed; --set changes every
     member's run alike (e.g. fewer steps, or rl.updates_per_rollout=2 so that the ratio departs
     from 1 and the members' clips and gates act). Prints a markdown table.

    python experiments/rl_demos.py --out=runs/rl_demos [--only=markov|exact_match]
    python experiments/rl_demos.py --out=runs/rl_demos --reuse --loss_types=all \
        --set=--config.train.steps=200 --set=--config.rl.updates_per_rollout=2

--reuse skips a stage whose summary.json exists (the SFT run the family starts from, say).
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
# The GRPO family (docs/rl.md): name -> the rl flags of that member, with the settings its paper / TRL use.
FAMILY = {
    "default": [],  # lm's default: clipped surrogate, rl.normalize='sequence' (= grpo's normalization)
    "grpo": ["--config.rl.loss_type=grpo"],  # per-sequence mean
    "bnpo": ["--config.rl.loss_type=bnpo"],  # token mean of the batch
    "dapo": ["--config.rl.loss_type=dapo", "--config.rl.clip_eps_high=0.28"],  # token mean, clip-higher
    "dr_grpo": ["--config.rl.loss_type=dr_grpo", "--config.rl.advantage_scale=none"],  # constant normalizer
    "cispo": ["--config.rl.loss_type=cispo", "--config.rl.clip_eps_high=4.0"],  # weight capped at 5 (TRL's 5.0)
    "sapo": ["--config.rl.loss_type=sapo"],  # soft gate, τ+ = 1, τ− = 1.05
    "gspo": ["--config.rl.loss_type=grpo", "--config.rl.importance_sampling_level=sequence",
             "--config.rl.clip_eps=3e-4", "--config.rl.clip_eps_high=4e-4"],  # GSPO's sequence ratio and clip
}
KEYS = ("wall_seconds", "rl_fraction_of_optimal_gain", "sft_fraction_of_optimal_gain", "rl_markov_j",
        "markov_j_optimal", "markov_j_reference_chain", "exact_match", "sft_exact_match", "rl_exact_match",
        "error_rate_ratio", "kl_gap")


def run_stage(out: str, name: str, flags: list[str], reuse: bool) -> dict:
    """One lm.cli.train run in out/name (skipped with reuse when its summary.json exists); its summary."""
    workdir = os.path.join(out, name)
    summary_path = os.path.join(workdir, "summary.json")
    if not (reuse and os.path.exists(summary_path)):
        command = [sys.executable, "-m", "lm.cli.train", *[f.format(out=out) for f in flags],
                   "--config.train.progress_bar=False", f"--workdir={workdir}"]
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True)
    with open(summary_path) as f:
        return json.load(f)


def training_means(workdir: str, keys: tuple[str, ...], last: int = 10) -> dict:
    """Per key: the mean over all logged steps, and over the last `last` logged rows (metrics.jsonl)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if "rl/reward_mean" in r]
    out = {}
    for key in keys:
        values = [r[key] for r in rows if key in r]
        if values:
            out[key] = sum(values) / len(values)
            out[key + "_last"] = sum(values[-last:]) / len(values[-last:])
    return out


def family_table(out: str, names: list[str]) -> str:
    lines = ["| loss | SFT exact match | RL exact match | error-rate ratio | clip fraction (mean) | "
             "sampled reward (last 10 logs) | k3 KL to SFT (last 10 logs) | wall (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for name in names:
        workdir = os.path.join(out, f"family_{name}")
        with open(os.path.join(workdir, "summary.json")) as f:
            s = json.load(f)
        m = training_means(workdir, ("policy/clip_fraction", "rl/reward_mean", "rl/kl_ref"))
        lines.append(f"| {name} | {s['sft_exact_match']:.3f} | {s['rl_exact_match']:.3f} | {s['error_rate_ratio']:.3f} "
                     f"| {m.get('policy/clip_fraction', float('nan')):.3f} | {m.get('rl/reward_mean_last', float('nan')):.3f} "
                     f"| {m.get('rl/kl_ref_last', float('nan')):.3f} | {s.get('wall_seconds', float('nan')):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/rl_demos")
    parser.add_argument("--only", choices=sorted(STAGES), default=None)
    parser.add_argument("--loss_types", default="", help=f"comma-separated members of {sorted(FAMILY)} or 'all': "
                        "run the exact-match GRPO stage once per member (after sft_brief) instead of the demos")
    parser.add_argument("--set", action="append", default=[], metavar="--config.a.b=v",
                        help="an extra flag for every family run (repeatable)")
    parser.add_argument("--reuse", action="store_true", help="skip a stage whose summary.json exists")
    args = parser.parse_args()
    if args.loss_types:
        names = sorted(FAMILY) if args.loss_types == "all" else args.loss_types.split(",")
        unknown = [n for n in names if n not in FAMILY]
        if unknown:
            raise SystemExit(f"--loss_types: unknown {unknown}; choose from {sorted(FAMILY)} or 'all'")
        sft_name, sft_flags = STAGES["exact_match"][0]
        run_stage(args.out, sft_name, sft_flags, args.reuse)
        grpo_flags = STAGES["exact_match"][1][1]
        for name in names:
            run_stage(args.out, f"family_{name}", [*grpo_flags, *FAMILY[name], *args.set], args.reuse)
            print(family_table(args.out, names[:names.index(name) + 1]), flush=True)
        return
    rows = []
    for demo, stages in STAGES.items():
        if args.only and demo != args.only:
            continue
        for name, flags in stages:
            summary = run_stage(args.out, name, flags, args.reuse)
            rows.append((name, {k: summary[k] for k in KEYS if k in summary}))
    for name, values in rows:
        print(f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items()))


if __name__ == "__main__":
    main()
