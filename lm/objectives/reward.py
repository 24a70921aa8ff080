"""Reward model: a Transformer with a scalar head (lm.model.RewardModel), trained on preference
pairs by the Bradley–Terry likelihood (seed documents' RLHF stage: people rank answers, a reward
model learns to score them).

    r = RewardModel(prompt + answer)   the hidden state at the answer's final token → scalar
    objective = Σ_pairs w·(−log σ(r_c − r_r − margin)) + c·Σ_pairs w·(r_c + r_r)²,   count = Σ w

(`lm.losses.bradley_terry_loss`; the second term is TRL's `center_rewards_coefficient` c =
config.reward.center_rewards: it pins the free offset of r near 0 and leaves the preferences
alone). A pair's weight w is 1 when both of its rows hold a scored token (0 for padding rows).
Chosen and rejected rows go through the model in one forward pass of [2B, T].

Start: config.train.init_from, a pretrained language model (every backbone parameter is taken,
the reward head starts at 0, so every reward is 0 at step 0 and the loss is ln 2). Metrics:
`accuracy` (pairs with r_c > r_r), `margin` (mean r_c − r_r), `center` (mean (r_c + r_r)²).
After training the `pairwise_accuracy` evaluator (lm/evals/pairwise_accuracy.py) scores held-out
pairs and, on the Markov benchmark, compares with the Bayes pairwise accuracy.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lm import losses
from lm.model import RewardModel

BATCH_KIND = "preference"


def make_model(config: Any, model_cfg):
    return lambda rngs: RewardModel(model_cfg, rngs=rngs)


def pair_weights(batch: dict) -> jax.Array:
    """[B] float32: 1 for a pair whose two rows each score a token, 0 for a padding row."""
    has = lambda side: jnp.any(batch[side]["loss_mask"] > 0, axis=-1)  # noqa: E731
    return (has("chosen") & has("rejected")).astype(jnp.float32)


def both_sides(batch: dict) -> dict:
    """{'chosen': [B, T] batch, 'rejected': ...} → one [2B, T] batch, chosen rows first."""
    return jax.tree.map(lambda c, r: jnp.concatenate([c, r], axis=0), batch["chosen"], batch["rejected"])


def pair_rewards(model: RewardModel, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(r_c [B], r_r [B]) from one forward pass over both sides."""
    both = both_sides(batch)
    rewards = model.rewards(both["inputs"], both["positions"], both["segment_ids"], both["loss_mask"],
                            both["targets"])  # the final token is a target only: fed as one more input
    b = batch["chosen"]["inputs"].shape[0]
    return rewards[:b], rewards[b:]


def make_loss_fn(config: Any, graphdef: Any):
    """loss_fn(params, batch, rng, frozen) -> (objective_sum, sums) on preference batches."""
    rc = config.reward
    if rc.center_rewards < 0:
        raise ValueError(f"config.reward.center_rewards must be >= 0, got {rc.center_rewards}")

    def loss_fn(params, batch, rng, frozen=None):
        del rng, frozen
        chosen, rejected = pair_rewards(nnx.merge(graphdef, params), batch)
        weights = pair_weights(batch)
        out = losses.bradley_terry_loss(chosen, rejected, weights, margin=rc.margin)
        center = jnp.sum(weights * (chosen + rejected) ** 2)
        objective = out.sum + rc.center_rewards * center
        return objective, {"count": out.count, "correct_sum": out.accuracy_sum, "margin_sum": out.margin_sum,
                           "center_sum": jax.lax.stop_gradient(center)}

    return loss_fn
