"""ORPO: supervised fine-tuning and an odds-ratio preference term in one loss, no reference model
(Hong et al. 2024).

On preference pairs (lm/data/preference.py), with P(y) = exp(mean_t log π_θ(y_t | ·)) and
odds(y) = P(y)/(1 − P(y)) (`lm.losses.orpo_loss`):

    loss = −mean_t log π_θ(y_c,t | ·) + λ·(−log σ(log odds(y_c) − log odds(y_r)))

The NLL term keeps the policy a language model of the chosen answers; the odds-ratio term pushes
the rejected ones down. No frozen model. Metrics (means over pairs, TRL ORPOTrainer names):
nll_loss (the chosen answers' mean token NLL), log_odds_ratio, odds_ratio_loss,
rewards/accuracies (log-odds ratio > 0), logps/chosen, logps/rejected.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lm import losses
from lm.objectives.dpo import answer_logprobs
from lm.objectives.reward import pair_weights

BATCH_KIND = "preference"


def make_loss_fn(config: Any, graphdef: Any):
    """loss_fn(params, batch, rng, frozen) -> (objective_sum, sums) on preference batches."""
    oc = config.orpo
    if oc.lam < 0:
        raise ValueError(f"config.orpo.lam must be >= 0, got {oc.lam}")

    def loss_fn(params, batch, rng, frozen=None):
        del rng, frozen
        pol_c, pol_r, counts = answer_logprobs(nnx.merge(graphdef, params), batch)
        b = pol_c.shape[0]
        weights = pair_weights(batch)
        out = losses.orpo_loss(pol_c, pol_r, counts[:b], counts[b:], lam=oc.lam, weights=weights)
        stop = jax.lax.stop_gradient
        return out.sum, {"count": out.count, "nll_loss_sum": out.nll_sum, "log_odds_ratio_sum": out.log_odds_sum,
                         "odds_ratio_loss_sum": out.odds_loss_sum, "rewards/accuracies_sum": out.accuracy_sum,
                         "logps/chosen_sum": stop(jnp.sum(weights * pol_c)),
                         "logps/rejected_sum": stop(jnp.sum(weights * pol_r))}

    return loss_fn
