"""SimPO: preference optimization without a reference model (Meng et al. 2024).

The policy is trained on preference pairs (the batches of DPO, lm/data/preference.py) with the
length-normalized log-probability as its implicit reward, r(y) = (β/|y|)·Σ_t log π_θ(y_t | ·), and
a target margin γ in the Bradley–Terry likelihood (`lm.losses.simpo_loss`):

    loss = −log σ(r(y_c) − r(y_r) − γ)        (label_smoothing ε as in cDPO)

No frozen model: half the memory and forward passes of DPO. Its optimum is not tied to a
reference (no KL term), so on the Markov benchmark it is measured against the KL-regularized
optimum for comparison only (experiments/preference.md). Metrics: TRL's CPOTrainer names
(rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins: means of r) and
logps/chosen, logps/rejected.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from lm import losses
from lm.objectives.dpo import answer_logprobs, pair_sums
from lm.objectives.reward import pair_weights

BATCH_KIND = "preference"


def make_loss_fn(config: Any, graphdef: Any):
    """loss_fn(params, batch, rng, frozen) -> (objective_sum, sums) on preference batches."""
    sc = config.simpo
    if not sc.beta > 0 or sc.gamma < 0:
        raise ValueError(f"config.simpo.beta must be > 0 and config.simpo.gamma >= 0, got {sc.beta}, {sc.gamma}")

    def loss_fn(params, batch, rng, frozen=None):
        del rng, frozen
        pol_c, pol_r, counts = answer_logprobs(nnx.merge(graphdef, params), batch)
        b = pol_c.shape[0]
        weights = pair_weights(batch)
        out = losses.simpo_loss(pol_c, pol_r, counts[:b], counts[b:], beta=sc.beta, gamma=sc.gamma,
                                label_smoothing=sc.label_smoothing, weights=weights)
        return out.sum, pair_sums(out, weights, pol_c, pol_r)

    return loss_fn
