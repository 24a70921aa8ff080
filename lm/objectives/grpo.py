"""GRPO: group-relative policy optimization with a KL penalty to the reference (seed: RLHF).

For each prompt the policy samples G completions y_1..y_G (lm/objectives/_rl.py: rollouts over
the KV cache inside the training loop); each gets a scalar reward r_i (lm/rewards.py rules, or
a frozen reward model); the advantage of every token of y_i is its group-relative reward

    A_i = (r_i − mean_j r_j) / (std_j r_j + ε)                 (rl.advantage_scale='group')

(lm.losses.group_advantages; 'batch' divides by the batch's std, 'none' only centres: Dr. GRPO)
and the loss is lm.losses.policy_loss, per scored (generated) token t,

    ℓ_t = −min(ρ_t·A, clip(ρ_t, 1−ε, 1+ε_high)·A) + β·KL_t,   ρ_t = π_θ(y_t)/π_old(y_t)

with KL_t the k1 or k3 estimate of KL(π_θ‖π_ref) against the frozen reference (the SFT model the
policy starts from, train.init_from; with rl.kl_penalty='reward' the sequence's sampled KL is
subtracted from r_i instead, _rl.kl_shaped), normalized per rl.normalize ('sequence': GRPO's mean of
sequence means; 'token': DAPO; 'constant': Dr. GRPO). No value model.

By default each rollout is used for one optimizer step (micro-batches of it included), so ρ = 1
at the step's parameters up to float rounding and the clip fraction is ≈ 0; with
rl.updates_per_rollout = k the same rollout serves k steps (_rl.reused) and the clip acts.

Metrics per step: rl/reward_mean, rl/reward_std, rl/kl_ref (k3 KL of the sampling policy to the
reference over the generated tokens), rl/entropy, rl/response_length, rl/truncated,
rl/reward_skipped, and from the loss policy/kl, policy/clip_fraction, policy/ratio, policy/entropy.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from lm import losses
from lm.objectives import _rl

HAS_VALIDATION_LOSS = False
BATCH_KIND = _rl.batch_kind(("old_logprobs", "ref_logprobs", "advantages"))  # advantages: A_i on every token


def frozen_models(config: Any, model_cfg: Any) -> dict:
    return _rl.reference(config, model_cfg)


make_train_iter = _rl.make_train_iter


def make_prepare_batch(config: Any, setup: Any, tokenizer: Any):
    """prepare_batch(params, prompts, rng, frozen) -> (step batch, rollout metrics)."""
    rc = config.rl
    rollouts = _rl.Rollouts(config, setup, tokenizer)
    ref_graphdef = setup.frozen_graphdefs["reference"]

    @functools.partial(jax.jit, out_shardings=(rollouts.batch_sharding, rollouts.replicated))
    def score(params, seq, out, rewards, valid, frozen):
        if rc.reward == "reward_model":
            rewards = _rl.model_rewards(setup, seq, frozen)
        old, logits = _rl.policy_forward(setup.graphdef, params, seq)
        ref, _ = _rl.policy_forward(ref_graphdef, frozen["reference"], seq)
        mask = seq["loss_mask"] * valid[:, None]
        shaped = _rl.kl_shaped(config, rewards, mask, old, ref)
        advantages = losses.group_advantages(shaped, rc.group_size, scale=rc.advantage_scale)
        batch = dict(seq, loss_mask=mask, old_logprobs=old, ref_logprobs=ref,
                     advantages=jnp.broadcast_to(advantages[:, None], mask.shape))
        return batch, _rl.rollout_metrics(rewards, valid, mask, old, ref, losses.entropy(logits).per_token,
                                          out["lengths"], rc.max_new_tokens)

    return _rl.prepare_with(rollouts, score, rc.updates_per_rollout)


def make_loss_fn(config: Any, graphdef: Any):
    """loss_fn(params, batch, rng, frozen) -> (policy loss sum, sums): lm.losses.policy_loss."""
    def loss_fn(params, batch, rng, frozen=None):
        del rng, frozen  # the reference's log-probs are in the batch
        logprobs, logits = _rl.policy_forward(graphdef, params, batch)
        total, sums, _ = _rl.policy_terms(config, logprobs, logits, batch, batch["advantages"])
        return total, sums

    return loss_fn
