"""Losses for language models, in pure ``jax.numpy``: depends only on ``jax``; import it (or copy
this folder) into any JAX project.

Every loss returns a **sum** and a **count** (the total of its float weights), not only a mean:
sum the pairs over micro-batches and devices, then divide once with :func:`mean_of`. A split
batch then gives exactly the whole batch's loss and gradient, and a count of 0 gives 0 and a zero
gradient, never NaN. All math runs in float32 whatever the input dtype.

    sums.py           mean_of: the (sum, count) convention
    cross_entropy.py  next-token cross-entropy (explicit logits, or fused with the output projection)
    divergences.py    entropy, soft cross-entropy, KL, summed sequence log-probabilities
    preference.py     pairwise preference: Bradley–Terry reward-model loss, DPO and its variants,
                      SimPO and ORPO (no reference model)
    policy.py         RL losses: PPO/GRPO family (GRPO, BNPO, DAPO, Dr. GRPO, GSPO, CISPO, SAPO) with a KL
                      penalty (k1/k2/k3), clipped value loss
    advantages.py     GRPO group advantages, GAE, masked whitening (batch statistics, no loss)
"""
from lm.losses.advantages import equal_reward_groups, gae, group_advantages, overlong_penalty, whiten
from lm.losses.cross_entropy import LossOutput, cross_entropy, fused_cross_entropy
from lm.losses.divergences import TokenStats, entropy, kl_divergence, sequence_logprobs, soft_cross_entropy
from lm.losses.policy import LOSS_TYPES, PolicyLossOutput, ValueLossOutput, kl_penalty, kl_rewards, policy_loss, value_loss
from lm.losses.preference import (BradleyTerryOutput, DPOOutput, ORPOOutput, bradley_terry_loss, dpo_loss, dpo_metrics,
                                  orpo_loss, simpo_loss)
from lm.losses.sums import mean_of

__all__ = ["LOSS_TYPES", "equal_reward_groups", "kl_penalty", "kl_rewards", "overlong_penalty", "ORPOOutput", "orpo_loss", "simpo_loss",
           "BradleyTerryOutput", "DPOOutput", "LossOutput", "PolicyLossOutput", "TokenStats", "ValueLossOutput",
           "bradley_terry_loss", "cross_entropy", "dpo_loss", "dpo_metrics", "entropy", "fused_cross_entropy", "gae",
           "group_advantages", "kl_divergence", "mean_of", "policy_loss", "sequence_logprobs", "soft_cross_entropy",
           "value_loss", "whiten"]
