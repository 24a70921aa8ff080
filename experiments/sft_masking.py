"""Assistant-only vs all-token loss for chat SFT, on the same data, model and budget.

    python -m lm.cli.sweep experiments/sft_masking.py                    # the two runs, then a table
    python experiments/sft_masking.py runs/sweeps/sft_masking        # table + experiments/sft_masking.png

Both runs train configs/sft.py (multi-turn word-transformation chat, from scratch) with the same seed,
data order, steps and batch; only `data.chat_loss` differs:

  assistant_only  the loss scores the assistant's answers and their <|end_of_turn|> (SFT)
  all             every token is scored: system prompts, user questions, role markers too

Measured after training (lm/evals/exact_match.py) on held-out conversations:
exact match of the greedy final answer, and, letting the model continue past the answer's
<|end_of_turn|> for 16 tokens, how often it writes a <|user|> turn itself. Under 'all' the
model is trained to predict the <|user|> marker that follows an answer inside a multi-turn
conversation; under 'assistant_only' that prediction is never scored. Results: sft_masking.md.
"""

from __future__ import annotations

import json
import os
import sys

CONFIG = "configs/sft.py"
NAME = "sft_masking"
POLICIES = ("assistant_only", "all")
COLUMNS = ("exact_match", "writes_user_turn", "stopped_at_end_of_turn", "valid_accuracy", "train_loss",
           "wall_seconds")


def sweep():
    return [{"data.chat_loss": policy} for policy in POLICIES]


def load(root: str) -> dict[str, dict]:
    """{policy: summary.json} of the runs under the sweep directory `root`."""
    out = {}
    for policy in POLICIES:
        path = os.path.join(root, f"chat_loss={policy}", "summary.json")
        if os.path.exists(path):
            with open(path) as f:
                out[policy] = json.load(f)
    return out


def table(results: dict[str, dict]) -> str:
    lines = ["| loss mask | held-out exact match | wrote a user turn after answering | ended answer with <\\|end_of_turn\\|> "
             "| scored tokens per step | wall time (s) |", "|---|---|---|---|---|---|"]
    for policy, s in results.items():
        lines.append(f"| {policy} | {100 * s['exact_match']:.1f}% ({s['exact_match_n']}) "
                     f"| {100 * s['writes_user_turn']:.1f}% | {100 * s['stopped_at_end_of_turn']:.1f}% "
                     f"| {s.get('scored_tokens_per_step', float('nan')):.0f} | {s.get('wall_seconds', float('nan')):.0f} |")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("exact_match", "held-out exact match"), ("writes_user_turn", "writes a <|user|> turn\nafter its answer"),
               ("stopped_at_end_of_turn", "ends its answer with\n<|end_of_turn|>")]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    width = 0.8 / max(len(results), 1)
    for j, (policy, s) in enumerate(results.items()):
        xs = [i + (j - (len(results) - 1) / 2) * width for i in range(len(metrics))]
        values = [100 * s[key] for key, _ in metrics]
        bars = ax.bar(xs, values, width, label=f"loss on {policy.replace('_', '-')} tokens")
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(metrics)), [label for _, label in metrics])
    ax.set_ylabel("% of held-out conversations")
    ax.set_ylim(0, 110)
    ax.set_title("Chat SFT (word transformations): assistant-only vs all-token loss, same data and budget", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    root = argv[1] if len(argv) > 1 else os.path.join("runs", "sweeps", NAME)
    results = load(root)
    if not results:
        print(f"no finished runs under {root}: run `python -m lm.cli.sweep experiments/sft_masking.py` first")
        return 1
    print(table(results))
    print(plot(results, os.path.join(os.path.dirname(os.path.abspath(__file__)), "sft_masking.png")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
