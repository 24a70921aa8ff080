"""The end of a run: summary.json, the loss-curve PNG and a printed verdict (samples and other
evaluations: lm/evals/)."""

from __future__ import annotations

import io
import os
import time
from typing import Any

import numpy as np

from lm.io import metrics as mx
from lm.io import paths


def summarize(config: Any, model_cfg: Any, result: Any, source_info: dict) -> dict:
    """Final metrics of a run. For a source with known entropy, also the Bayes-optimal CE and
    the gap to it, which is the KL(data ‖ model) per token the model has left."""
    from lm.model import flops_per_token, param_count

    ev = result.final_eval
    train_rows = [r for r in result.history if "loss" in r]
    summary = {
        "steps": int(config.train.steps),
        "parameters": param_count(result.state.params),
        "flops_per_token": flops_per_token(model_cfg, config.train.seq_len)["total"],
    }
    if ev:  # an objective without a validation loss (RL) has none
        summary.update(valid_ce=ev.get("nll", ev["loss"]), valid_loss=ev["loss"], valid_perplexity=ev.get("perplexity"),
                       valid_accuracy=ev.get("accuracy"), valid_tokens=ev["tokens"])
    if train_rows:
        last = train_rows[-1]
        summary["train_loss"] = last["loss"]
        speeds = [r["tokens_per_s"] for r in train_rows[1:]] or [last["tokens_per_s"]]
        summary["tokens_per_s"] = float(np.median(speeds))
        summary["mfu"] = float(np.median([r["mfu"] for r in train_rows[1:]] or [last["mfu"]]))
        summary["mfu_peak"] = mx.peak_source(config.train.peak_flops)  # the MFU's denominator
        summary["scored_tokens_per_step"] = float(np.mean([r["tokens"] for r in train_rows if "tokens" in r]))
    times = process_seconds()
    if times is not None:
        summary["wall_seconds"], summary["cpu_seconds"] = times
    if "bayes_optimal_ce" in source_info and ev.get("nll") is not None:
        bound = float(source_info["bayes_optimal_ce"])
        summary["bayes_optimal_ce"] = bound
        summary["kl_gap"] = summary["valid_ce"] - bound
        summary["relative_gap"] = summary["kl_gap"] / bound
    return summary


# The metrics that say how an objective is doing, as its loss_fn / prepare_batch log them
# (lm/evals/loss.py: summary_metrics turns `<name>_sum` into `<name>`), with their short names.
HEADLINE = {"rl/reward_mean": "reward", "rl/kl_ref": "kl", "policy/clip_fraction": "clip",
            "rewards/accuracies": "acc", "rewards/margins": "margin", "accuracy": "acc", "margin": "margin"}


def headline(row: dict) -> dict[str, float]:
    """{short name: value} of the HEADLINE metrics in a logged row (reward mean, KL, accuracy, ...)."""
    out = {}
    for key, name in HEADLINE.items():
        if key in row and name not in out and isinstance(row[key], (int, float)):
            out[name] = float(row[key])
    return out


def print_summary(summary: dict) -> None:
    if summary.get("valid_perplexity") is not None:
        print(f"validation cross-entropy: {summary['valid_ce']:.4f} nats/token "
              f"(perplexity {summary['valid_perplexity']:.3f}, accuracy {summary['valid_accuracy']:.3f})")
    elif "valid_loss" in summary:
        print(f"validation loss: {summary['valid_loss']:.4f}")
    if "bayes_optimal_ce" in summary:
        print(f"Bayes-optimal cross-entropy: {summary['bayes_optimal_ce']:.4f} nats/token")
        print(f"difference (KL left to learn): {summary['kl_gap']:.4f} nats/token "
              f"({100 * summary['relative_gap']:.2f}% of the bound)")
    if "tokens_per_s" in summary:
        print(f"throughput: {summary['tokens_per_s']:,.0f} tokens/s, MFU {100 * summary['mfu']:.1f}% "
              f"(of the peak: {summary.get('mfu_peak', 'unknown')})")


def target_verdict(config: Any, summary: dict) -> str | None:
    """'target met: relative_gap = 0.0123 <= 0.02' (or 'NOT met', or 'cannot be checked'), or
    None where the config states no target (config.target.metric empty or absent)."""
    target = config.get("target") if hasattr(config, "get") else None
    if not target or not target.get("metric"):
        return None
    metric, low, high = target.metric, target.get("min"), target.get("max")
    bound = " and ".join(([f">= {low:g}"] if low is not None else []) + ([f"<= {high:g}"] if high is not None else []))
    value = summary.get(metric)
    if not isinstance(value, (int, float)) or not bound:
        why = "no bound (target.min / target.max)" if not bound else f"summary.json has no {metric!r}"
        return f"target {metric} {bound}: cannot be checked ({why})"
    met = (low is None or value >= low) and (high is None or value <= high)
    return f"target {'met' if met else 'NOT met'}: {metric} = {value:.4g} (stated: {bound})"


def plot_loss(workdir: str, bound: float | None) -> str:
    """loss.png: training loss per logged step, validation points, and the bound if known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = mx.read_metrics(str(paths.run_path(workdir) / "metrics.jsonl"))
    train = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), float)]
    valid = [(r["step"], r["valid/nll"]) for r in rows if "valid/nll" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation cross-entropy", ms=4)
    if bound is not None:
        ax.axhline(bound, color="k", ls="--", lw=1, label=f"Bayes-optimal CE = {bound:.4f}")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, dpi=120, format="png")
    plt.close(fig)
    return str(paths.write_bytes(paths.run_path(workdir) / "loss.png", image.getvalue()))


def process_seconds() -> tuple[float, float] | None:
    """(wall seconds since this process started, CPU seconds it used: user + system, all threads)."""
    try:
        import psutil

        process = psutil.Process(os.getpid())
        cpu = process.cpu_times()
        return time.time() - process.create_time(), cpu.user + cpu.system
    except Exception:  # noqa: BLE001 -- informative only
        return None
