"""Losses for language models, in pure ``jax.numpy``: depends only on ``jax``; import it (or copy
this folder) into any JAX project.

Every loss returns a **sum** and a **count** (the total of its float weights), not only a mean:
sum the pairs over micro-batches and devices, then divide once with :func:`mean_of`. A split
batch then gives exactly the whole batch's loss and gradient, and a count of 0 gives 0 and a zero
gradient, never NaN. All math runs in float32 whatever the input dtype.

Out-of-range targets: a target id outside [0, V) at a scored (unmasked) position gives a NaN
loss and NaN log-probability, loudly, never a plausible wrong number (a masked position may hold
any id). Pass ``checked=True`` to cross_entropy / fused_cross_entropy / token_logprobs and run
under ``jax.experimental.checkify`` (``lm.losses.checked(fn)`` does it) to raise an error naming
the target and its index instead.

    sums.py           mean_of: the (sum, count) convention
    token_logprobs.py per-token log q(y), entropy, logsumexp from hidden states and the unembedding:
                      chunked over tokens and vocabulary, optionally sharded over a mesh
                      (chunked_logprobs.py: the chunked core and its VJP; sharded_logprobs.py:
                      checks, casts, padding and the shard_map over the mesh)
    cross_entropy.py  next-token cross-entropy (explicit logits, or fused: a reduction of token_logprobs)
    divergences.py    entropy, soft cross-entropy, KL, summed sequence log-probabilities
    preference.py     pairwise preference: Bradley–Terry reward-model loss, DPO and its variants,
                      SimPO and ORPO (no reference model)
    policy.py         RL losses: PPO/GRPO family (GRPO, BNPO, DAPO, Dr. GRPO, GSPO, CISPO, SAPO) with a KL
                      penalty (k1/k2/k3), clipped value loss
    advantages.py     GRPO group advantages, GAE, masked whitening (batch statistics, no loss)
"""
from lm.losses.advantages import equal_reward_groups, gae, group_advantages, overlong_penalty, whiten
from lm.losses.cross_entropy import LossOutput, checked, cross_entropy, fused_cross_entropy
from lm.losses.divergences import TokenStats, entropy, kl_divergence, sequence_logprobs, soft_cross_entropy
from lm.losses.policy import LOSS_TYPES, PolicyLossOutput, ValueLossOutput, kl_penalty, kl_rewards, policy_loss, value_loss
from lm.losses.preference import (BradleyTerryOutput, DPOOutput, ORPOOutput, bradley_terry_loss, dpo_loss, dpo_metrics,
                                  orpo_loss, simpo_loss)
from lm.losses.sums import mean_of
from lm.losses.token_logprobs import TokenLogprobs, check_targets, token_logprobs

__all__ = ["LOSS_TYPES", "equal_reward_groups", "kl_penalty", "kl_rewards", "overlong_penalty", "ORPOOutput", "orpo_loss",
           "simpo_loss", "BradleyTerryOutput", "DPOOutput", "LossOutput", "PolicyLossOutput", "TokenLogprobs",
           "TokenStats", "ValueLossOutput", "bradley_terry_loss", "check_targets", "checked", "cross_entropy",
           "dpo_loss", "dpo_metrics", "entropy", "fused_cross_entropy", "gae", "group_advantages", "kl_divergence",
           "mean_of", "policy_loss", "sequence_logprobs", "soft_cross_entropy", "token_logprobs", "value_loss", "whiten"]
