"""The seed documents' lesson as an experiment: two correct phrasings, a hidden preference for one.

Next-token prediction on data where every answer is written bare ('cba') or as a sentence
('It is cba.') equally often can only learn the 50/50 split: nothing in the data prefers either.
A labeller who does prefer one (the sentence; lm/evals/nuance.py: PREFERRED) compares pairs of
the SFT model's own samples, and those labels move the policy, by a reward model and RL, or by
DPO on the same pairs, while the answers stay correct. The stages (configs/nuance.py), each a
run of lm.cli.train except `pairs`:

  sft     SFT on the two-phrasing word chat (configs/nuance.py:sft)
  pairs   2 samples at temperature 1 from the SFT model for each of --pair_prompts held-in prompts
          (and --valid_pair_prompts held-out ones for validation), judged (preferred-correct >
          other-correct > incorrect), ties dropped and counted; TRL-format JSONL (prompt as chat
          messages, chosen / rejected as one assistant message): pairs_train.jsonl, pairs_valid.jsonl
  reward  reward model (Bradley–Terry) on the pairs, from the SFT parameters
  dpo     DPO on the same pairs against the frozen SFT model
  grpo    GRPO with the frozen reward model as the reward, KL to the SFT model
  ppo     PPO the same
  sweep   the KL coefficient β swept (--sweep=grpo:0,0.1,1 --sweep=dpo:0.3,3 ...): each value one more run
          of that stage from the same SFT model, pairs and reward model, in sweep/<stage>_beta<β>
          (rl.kl_coef for grpo and ppo, dpo.beta for dpo); the stage's own run is its default-β point

Every policy run (sft, dpo, grpo, ppo) ends with the `nuance` evaluator on the same held-out
prompts and sampling keys: correctness, preferred-phrasing rate and KL(π ‖ π_sft), all sampled at
temperature 1. Then a table (results.md; the β sweep's below it), the numbers (results.json) and a
plot (experiments/rlhf_nuance.png with --plot) are written.

    python experiments/rlhf_nuance.py --out=/tmp/nuance/run            # all stages (15–25 min on 2 shared cores)
    python experiments/rlhf_nuance.py --out=/tmp/nuance/run --from=dpo # reuse the earlier stages
    python experiments/rlhf_nuance.py --out=/tmp/nuance/run --only=sweep --sweep=grpo:0,0.03,0.1,1
    python experiments/rlhf_nuance.py --out=/tmp/nuance/run --only=report --plot=experiments/rlhf_nuance.png

Report: experiments/rlhf_nuance.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

STAGES = ("sft", "pairs", "reward", "dpo", "grpo", "ppo", "sweep", "report")
POLICIES = ("sft", "dpo", "grpo", "ppo")
LABELS = {"sft": "SFT", "dpo": "DPO", "grpo": "RM + GRPO", "ppo": "RM + PPO"}
BETA_KEY = {"grpo": ("rl", "kl_coef"), "ppo": ("rl", "kl_coef"), "dpo": ("dpo", "beta")}  # the β each stage sweeps


def train_flags(stage: str, out: str) -> list[str]:
    pairs = [f"--config.data.preference_jsonl.train_files={out}/pairs_train.jsonl",
             f"--config.data.preference_jsonl.valid_files={out}/pairs_valid.jsonl"]
    start = [f"--config.train.init_from={out}/sft"]
    return {"sft": [], "reward": start + pairs, "dpo": start + pairs,
            "grpo": start + [f"--config.rl.reward_model={out}/reward"],
            "ppo": start + [f"--config.rl.reward_model={out}/reward"]}[stage]


def train(stage: str, out: str, extra: list[str], name: str | None = None, flags: tuple[str, ...] = ()) -> float:
    """One run of lm.cli.train in out/name (name: the stage); returns its wall time (s)."""
    workdir = os.path.join(out, name or stage)
    command = [sys.executable, "-m", "lm.cli.train", f"--config=configs/nuance.py:{stage}", f"--workdir={workdir}",
               *train_flags(stage, out), *[e.split(":", 1)[1] for e in extra if e.startswith(stage + ":")], *flags]
    print(" ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def pair_record(example: dict, chosen: str, rejected: str) -> dict:
    """TRL's conversational format: the prompt messages, one assistant message each side."""
    return {"prompt": example["messages"][:-1], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def renderable(sample: dict) -> bool:
    """A reply that reads back as the tokens sampled: non-empty, ended, no special token inside."""
    return bool(sample["reply"]) and sample["ended"] and not sample["has_special"]


def write_pairs(out: str, num_prompts: int, num_valid_prompts: int, samples_per_prompt: int, seed: int) -> dict:
    """The `pairs` stage (module docstring); returns its statistics (also in pairs.json)."""
    from lm.data.synthetic import WordChat
    from lm.evals import nuance
    from lm.io.checkpoint import load_for_inference
    from lm.data import build_tokenizer

    _, graphdef, params, config = load_for_inference(os.path.join(out, "sft"))
    tokenizer = build_tokenizer(config.data)
    ec = config.eval.nuance
    stats = {}
    for split, count, first, path in (("train", num_prompts, 0, "pairs_train.jsonl"),
                                      ("valid", num_valid_prompts, 10_000, "pairs_valid.jsonl")):
        # valid prompts from index 10,000 on: not the evaluator's (the first eval.nuance.examples)
        source = WordChat(config.data.word_chat, split, tokenizer, seed=config.seed, loss_policy="assistant_only")
        examples = [source.example(i) for i in range(first, first + count)]
        started = time.perf_counter()
        replies = nuance.sample_replies(graphdef, params, tokenizer, examples, samples_per_prompt=samples_per_prompt,
                                        prompt_len=ec.prompt_len, max_new_tokens=ec.max_new_tokens,
                                        batch_size=500, seed=seed + (split == "valid"))
        judged = [[(s["reply"], nuance.judge(s["reply"], s["ended"], nuance.result_of(ex))) for s in samples]
                  for ex, samples in zip(examples, replies)]
        labelled = nuance.label_pairs(judged)
        by_reply = [{s["reply"]: s for s in samples} for samples in replies]
        records, unrenderable, kinds = [], 0, {}
        for p, chosen, rejected in labelled.pairs:
            if not (renderable(by_reply[p][chosen]) and renderable(by_reply[p][rejected])):
                unrenderable += 1
                continue
            verdicts = [nuance.judge(r, True, nuance.result_of(examples[p])) for r in (chosen, rejected)]
            kind = "preferred>other" if verdicts[1].correct else "correct>incorrect"
            kinds[kind] = kinds.get(kind, 0) + 1
            records.append(pair_record(examples[p], chosen, rejected))
        with open(os.path.join(out, path), "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        stats[split] = {"prompts": count, "samples": count * samples_per_prompt, "pairs_written": len(records),
                        "pairs_by_kind": kinds, "ties": labelled.ties, "ties_total": labelled.num_ties,
                        "unrenderable_pairs": unrenderable, "sampled_rates": nuance.rates(examples, replies),
                        "seconds": time.perf_counter() - started}
        print(f"pairs ({split}): {len(records)} written of {count} prompts × {samples_per_prompt} samples; "
              f"ties dropped {labelled.ties}; unrenderable {unrenderable}; kinds {kinds}", flush=True)
    with open(os.path.join(out, "pairs.json"), "w") as f:
        json.dump(stats, f, indent=1)
    return stats


def parse_sweep(specs: list[str]) -> dict[str, list[float]]:
    """--sweep values 'stage:b1,b2,...' -> {stage: [β, ...]} (a stage named twice: its values joined)."""
    sweep = {}
    for spec in specs:
        stage, _, values = spec.partition(":")
        if stage not in BETA_KEY or not values:
            raise SystemExit(f"--sweep={spec!r}: expected STAGE:β1,β2,... with STAGE one of {sorted(BETA_KEY)}")
        try:
            sweep.setdefault(stage, []).extend(float(v) for v in values.split(","))
        except ValueError:
            raise SystemExit(f"--sweep={spec!r}: the values must be numbers, e.g. grpo:0,0.1,1") from None
    return sweep


def default_beta(stage: str) -> float:
    from configs import nuance as nuance_config

    group, key = BETA_KEY[stage]
    return float(nuance_config.get_config(stage)[group][key])


def sweep_name(stage: str, beta: float) -> str:
    return f"sweep/{stage}_beta{beta:g}"


def run_sweep(out: str, sweep: dict[str, list[float]], extra: list[str]) -> None:
    """The `sweep` stage: one run per (stage, β) not yet done (a summary.json in its directory); the
    stage's default β is its own run (out/<stage>), not run again."""
    for stage, betas in sweep.items():
        group, key = BETA_KEY[stage]
        for beta in betas:
            name = sweep_name(stage, beta)
            if beta == default_beta(stage) or os.path.exists(os.path.join(out, name, "summary.json")):
                continue
            seconds = train(stage, out, extra, name=name, flags=(f"--config.{group}.{key}={beta}",))
            print(f"sweep {stage} β={beta:g}: {seconds:.0f} s", flush=True)


def beta_of(workdir: str, stage: str) -> float:
    group, key = BETA_KEY[stage]
    with open(os.path.join(workdir, "config.json")) as f:
        return float(json.load(f)[group][key])


def collect_sweep(out: str) -> dict[str, list[tuple[float, dict]]]:
    """{stage: [(β, summary), ...] sorted by β}: the sweep's runs and the stage's own run (its default β)."""
    found = {}
    for stage in BETA_KEY:
        runs = [os.path.join(out, stage)]
        sweep_dir = os.path.join(out, "sweep")
        if os.path.isdir(sweep_dir):
            runs += [os.path.join(sweep_dir, d) for d in sorted(os.listdir(sweep_dir)) if d.startswith(stage + "_beta")]
        for workdir in runs:
            path = os.path.join(workdir, "summary.json")
            if os.path.exists(path):
                with open(path) as f:
                    found.setdefault(stage, []).append((beta_of(workdir, stage), json.load(f)))
    return {stage: sorted(points, key=lambda p: p[0]) for stage, points in found.items() if len(points) > 1}


def phrasing_kl_bound(p: float, q: float) -> float:
    """KL(Bern(p) ‖ Bern(q)): the least KL(π ‖ π_sft) of a policy whose preferred rate is p when
    π_sft's is q (data processing over the map reply → preferred or not; joint convexity over prompts)."""
    def term(a, b):
        return 0.0 if a <= 0 else a * math.log(a / b)
    return term(p, q) + term(1 - p, 1 - q)


def collect(out: str) -> dict:
    results = {}
    for stage in (*POLICIES, "reward"):
        path = os.path.join(out, stage, "summary.json")
        if os.path.exists(path):
            with open(path) as f:
                results[stage] = json.load(f)
    for name, key in (("pairs.json", "pairs"), ("stage_seconds.json", "stage_seconds")):
        if os.path.exists(os.path.join(out, name)):
            with open(os.path.join(out, name)) as f:
                results[key] = json.load(f)
    sweep = collect_sweep(out)
    if sweep:
        results["sweep"] = {stage: [dict(beta=beta, **s) for beta, s in points] for stage, points in sweep.items()}
    return results


def cells(s: dict, base: float | None) -> str:
    """A policy's evaluator numbers as table cells: correct | preferred | among correct | KL | least KL | wall."""
    bound = phrasing_kl_bound(s["nuance_preferred"], base) if base else float("nan")
    return (f"{100 * s['nuance_correct']:.1f}% ± {100 * s['nuance_correct_stderr']:.1f} "
            f"| {100 * s['nuance_preferred']:.1f}% ± {100 * s['nuance_preferred_stderr']:.1f} "
            f"| {100 * s['nuance_preferred_among_correct']:.1f}% "
            f"| {s['nuance_kl']:.3f} ± {s['nuance_kl_stderr']:.3f} | {bound:.3f} "
            f"| {s.get('wall_seconds', float('nan')):.0f} |")


def table(results: dict) -> str:
    lines = ["| policy | correct | preferred (sentence) | preferred among correct | KL(π ‖ π_sft), nats | "
             "least KL for that rate | wall (s) |", "|---|---|---|---|---|---|---|"]
    base = results.get("sft", {}).get("nuance_preferred")
    for stage in POLICIES:
        s = results.get(stage)
        if s is None or "nuance_correct" not in s:
            lines.append(f"| {LABELS[stage]} | (not run) | | | | | |")
            continue
        lines.append(f"| {LABELS[stage]} | " + cells(s, base))
    return "\n".join(lines)


def sweep_table(results: dict) -> str:
    """The β sweep: one row per (method, β), β ascending within a method."""
    lines = ["| method | β | correct | preferred (sentence) | preferred among correct | KL(π ‖ π_sft), nats | "
             "least KL for that rate | wall (s) |", "|---|---|---|---|---|---|---|---|"]
    base = results.get("sft", {}).get("nuance_preferred")
    for stage, points in results.get("sweep", {}).items():
        for s in points:
            lines.append(f"| {LABELS[stage]} | {s['beta']:g} | " + cells(s, base))
    return "\n".join(lines)


def plot(results: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = [s for s in POLICIES if "nuance_correct" in results.get(s, {})]
    sweep = results.get("sweep", {})
    fig, axes = plt.subplots(1, 3 if sweep else 2, figsize=(16.5 if sweep else 11, 4.2))
    bars, kl = axes[0], axes[1]
    x = np.arange(len(runs))
    for offset, key, label in ((-0.2, "nuance_correct", "correct"), (0.2, "nuance_preferred", "preferred phrasing")):
        values = [100 * results[s][key] for s in runs]
        errors = [100 * results[s][key + "_stderr"] for s in runs]
        bars.bar(x + offset, values, 0.38, yerr=errors, label=label, capsize=3)
    bars.axhline(50, color="grey", lw=0.8, ls=":")
    bars.set_xticks(x, [LABELS[s] for s in runs])
    bars.set_ylim(0, 105)
    bars.set_ylabel("% of samples (temperature 1, held-out prompts)")
    bars.set_title("correct and preferred-phrasing samples per policy")
    bars.legend(loc="lower right")
    base = results["sft"]["nuance_preferred"] if "sft" in runs else 0.5
    grid = np.linspace(base, 0.999, 200)
    kl.plot(100 * grid, [phrasing_kl_bound(p, base) for p in grid], color="grey", lw=1,
            label="least possible KL (phrasing alone)")
    for s in runs:
        r = results[s]
        kl.errorbar(100 * r["nuance_preferred"], r["nuance_kl"], xerr=100 * r["nuance_preferred_stderr"],
                    yerr=r["nuance_kl_stderr"], fmt="o", capsize=3, label=LABELS[s])
    for stage, points in sweep.items():  # each method's β sweep: a line through its points, β written beside
        xs, ys = [100 * p["nuance_preferred"] for p in points], [p["nuance_kl"] for p in points]
        kl.plot(xs, ys, lw=0.8, alpha=0.6, marker=".", label=f"{LABELS[stage]}, β swept")
        for p, x, y in zip(points, xs, ys):
            kl.annotate(f"{p['beta']:g}", (x, y), fontsize=7, xytext=(3, 2), textcoords="offset points")
        axes[2].plot(ys, [100 * p["nuance_correct"] for p in points], marker="o", label=LABELS[stage])
        for p, x, y in zip(points, ys, [100 * p["nuance_correct"] for p in points]):
            axes[2].annotate(f"{p['beta']:g}", (x, y), fontsize=7, xytext=(3, 2), textcoords="offset points")
    kl.set_xlabel("preferred phrasing, % of samples")
    kl.set_ylabel("KL(π ‖ π_sft), nats per reply")
    kl.set_title("preferred rate against KL to the SFT model" + (" (β beside each sweep point)" if sweep else ""))
    kl.legend(fontsize=8)
    if sweep:  # a sweep's β = 0 runs reach KLs of many nats: a log scale above 0.1 keeps the rest readable
        kl.set_yscale("symlog", linthresh=0.1)
        axes[2].set_xscale("symlog", linthresh=0.1)
        axes[2].axhline(100 * results["sft"]["nuance_correct"] if "sft" in runs else 100, color="grey", lw=0.8,
                        ls=":", label="SFT")
        axes[2].set_xlabel("KL(π ‖ π_sft), nats per reply")
        axes[2].set_ylabel("correct, % of samples")
        axes[2].set_title("correctness against KL, β swept (β beside each point)")
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(out: str, plot_path: str | None) -> None:
    results = collect(out)
    text = table(results)
    if "sweep" in results:
        text += "\n\nβ sweep (the KL coefficient: rl.kl_coef for RM + GRPO / PPO, dpo.beta for DPO):\n\n"
        text += sweep_table(results)
    if "reward" in results:
        r = results["reward"]
        text += (f"\n\nreward model: held-out pairwise accuracy {100 * r.get('pairwise_accuracy', float('nan')):.1f}% "
                 f"of {r.get('pairwise_accuracy_n', 0)} pairs")
    print(text)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text + "\n")
    keep = ("nuance_", "pairwise_accuracy", "wall_seconds", "train_loss", "valid_")
    def kept(s):
        return {k: v for k, v in s.items() if k.startswith(keep) or k == "beta"}
    numbers = {stage: kept(s) if stage in (*POLICIES, "reward") else s for stage, s in results.items()}
    if "sweep" in results:
        numbers["sweep"] = {stage: [kept(p) for p in points] for stage, points in results["sweep"].items()}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(numbers, f, indent=1, sort_keys=True)
    if plot_path:
        print("plot:", plot(results, plot_path))
        with open(os.path.splitext(plot_path)[0] + ".json", "w") as f:
            json.dump(numbers, f, indent=1, sort_keys=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="/tmp/nuance/run", help="directory of the runs and pairs")
    parser.add_argument("--from", dest="start", choices=STAGES, default="sft", help="first stage to run")
    parser.add_argument("--only", choices=STAGES, default=None, help="run this stage only")
    parser.add_argument("--pair_prompts", type=int, default=4000, help="held-in prompts sampled for pairs")
    parser.add_argument("--valid_pair_prompts", type=int, default=500, help="held-out prompts for validation pairs")
    parser.add_argument("--samples_per_prompt", type=int, default=2, help="samples per prompt (pairs: 0-1, 2-3, …)")
    parser.add_argument("--pair_seed", type=int, default=1, help="sampling seed of the pairs")
    parser.add_argument("--plot", default=None, help="where to write the plot (and the numbers beside it, .json)")
    parser.add_argument("--sweep", action="append", default=[], metavar="STAGE:β1,β2,...",
                        help="the sweep stage's values of β for grpo, ppo (rl.kl_coef) or dpo (dpo.beta) (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="STAGE:--config.a.b=v",
                        help="an extra flag for one stage's run, e.g. dpo:--config.dpo.beta=0.2 (repeatable)")
    args = parser.parse_args()
    sweep = parse_sweep(args.sweep)
    os.makedirs(args.out, exist_ok=True)
    stages = [args.only] if args.only else list(STAGES[STAGES.index(args.start):])
    wall_path = os.path.join(args.out, "stage_seconds.json")  # each stage's latest wall time, kept across calls
    for stage in stages:
        started = time.perf_counter()
        if stage == "pairs":
            write_pairs(args.out, args.pair_prompts, args.valid_pair_prompts, args.samples_per_prompt,
                        args.pair_seed)
        elif stage == "sweep":
            run_sweep(args.out, sweep, args.set)
        elif stage == "report":
            report(args.out, args.plot)
            continue
        else:
            train(stage, args.out, args.set)
        wall = {}
        if os.path.exists(wall_path):
            with open(wall_path) as f:
                wall = json.load(f)
        wall[stage] = time.perf_counter() - started
        with open(wall_path, "w") as f:
            json.dump(wall, f, indent=1)
        print(f"stage {stage}: {wall[stage]:.0f} s", flush=True)


if __name__ == "__main__":
    main()
