"""Learning-rate sweep of the main job: how close to the Bayes-optimal CE does each peak lr get?

    python -m lm.cli.sweep experiments/lr_sweep.py
    python -m lm.cli.sweep experiments/lr_sweep.py --print_only

Results (measured; see experiments/lr_sweep.md) are gathered into runs/sweeps/lr_sweep/results.md.
"""

CONFIG = "configs/default.py"
COLUMNS = ("valid_ce", "bayes_optimal_ce", "kl_gap", "relative_gap", "train_loss", "tokens_per_s")


def sweep():
    return [{"optimizer.lr": lr} for lr in (1e-3, 3e-3, 1e-2)]
