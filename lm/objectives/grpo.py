"""GRPO: group-relative policy optimization with a KL penalty to the reference (seed: RLHF).

For each prompt the policy samples G completions y_1..y_G (lm/objectives/_rl.py: rollouts over
the KV cache inside the training loop); each gets a scalar reward r_i (lm/rewards.py rules, or
a frozen reward model); the advantage of every token of y_i is its group-relative reward

    A_i = (r_i − mean_j r_j) / (std_j r_j + ε)                 (rl.advantage_scale='group')

(lm.losses.group_advantages; 'batch' divides by the batch's std, 'none' only centres: Dr. GRPO)
and the loss is lm.losses.policy_loss, per scored (generated) token t,

    ℓ_t = −min(ρ_t·A, clip(ρ_t, 1−ε, 1+ε_high)·A) + β·KL_t,   ρ_t = π_θ(y_t)/π_old(y_t)

with KL_t the rl.kl_estimator penalty toward the frozen reference (the SFT model the policy starts
from, train.init_from): k2 = ½(log π_θ − log π_ref)² by default, whose expected gradient is
β∇KL(π_θ‖π_ref) (lm.losses.kl_penalty documents k1, k2, k3); with rl.kl_penalty='reward' the
sequence's sampled k1 is subtracted from r_i instead (_rl.kl_shaped: the same expected gradient),
normalized per rl.normalize ('sequence': GRPO's mean of sequence means; 'token': DAPO; 'constant':
Dr. GRPO) or per rl.loss_type (the GRPO family of lm.losses.policy_loss: grpo, bnpo, dapo,
dr_grpo, cispo, sapo; rl.importance_sampling_level='sequence' is GSPO). DAPO's pieces:
rl.clip_eps_high (clip-higher), rl.dynamic_sampling (equal-reward groups dropped, counted and
refilled) and rl.overlong_cache (soft overlong penalty). No value model. All log-probs are of the
behaviour distribution (rl's temperature and filters; _rl module docstring).

By default each rollout is used for one optimizer step (micro-batches of it included), so ρ = 1
at the step's parameters up to float rounding and the clip fraction is ≈ 0; with
rl.updates_per_rollout = k the same rollout serves k steps (_rl.reused) and the clip acts.

Metrics per step: rl/reward_mean, rl/reward_std, rl/kl_ref (k3 KL of the sampling policy to the
reference over the generated tokens), rl/entropy, rl/response_length, rl/truncated,
rl/reward_skipped, and from the loss policy/kl, policy/clip_fraction, policy/ratio, policy/entropy.
"""

from __future__ import annotations

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


def score_shardings(rollouts: _rl.Rollouts, setup: Any) -> dict:
    """in/out shardings of an RL `score` jit, from the mesh: (params, seq, out, rewards, valid,
    frozen) → (step batch, metrics)."""
    rows, rep = rollouts.rows, rollouts.replicated
    return {"in_shardings": (setup.state_shardings.params, rows, rows, rep, rep, dict(setup.frozen_shardings)),
            "out_shardings": (rows, rep)}


def make_prepare_batch(config: Any, setup: Any, tokenizer: Any):
    """prepare_batch(params, prompts, rng, frozen) -> (step batch, rollout metrics)."""
    rc = config.rl
    rollouts = _rl.Rollouts(config, setup, tokenizer)
    ref_graphdef = setup.frozen_graphdefs["reference"]
    knobs, ref_knobs = _rl.sampling_knobs(rc), _rl.reference_knobs(rc)
    prompt_len = config.train.seq_len - rc.max_new_tokens

    def score(params, seq, out, rewards, valid, frozen):
        if rc.reward == "reward_model":
            rewards = _rl.model_rewards(setup, seq, frozen)
        rewards = rewards + _rl.overlong(rc, out["lengths"])
        old, entropy = _rl.policy_forward(setup.graphdef, params, seq, knobs)
        ref, _ = _rl.policy_forward(ref_graphdef, frozen["reference"], seq, ref_knobs)
        mask, excluded = _rl.scored_mask(seq, valid, old)
        shaped = _rl.kl_shaped(config, rewards, mask, old, ref)
        advantages = losses.group_advantages(shaped, rc.group_size, scale=rc.advantage_scale, ddof=rc.advantage_ddof)
        batch = dict(seq, loss_mask=mask, old_logprobs=jnp.where(mask != 0, old, 0.0), ref_logprobs=ref,
                     advantages=jnp.broadcast_to(advantages[:, None], mask.shape))
        metrics = _rl.rollout_metrics(rewards, valid, mask, old, ref, entropy, out, prompt_len, rc.max_new_tokens)
        return batch, dict(metrics, **{"rl/excluded_tokens": excluded})

    score = jax.jit(setup.with_activation_hints(score), **score_shardings(rollouts, setup))
    return _rl.prepare_with(rollouts, score, rc.updates_per_rollout)


def make_loss_fn(config: Any, graphdef: Any):
    """loss_fn(params, batch, rng, frozen) -> (policy loss sum, sums): lm.losses.policy_loss on the
    behaviour distribution's log-probs (rl's temperature and filters, as the sampler's)."""
    knobs = _rl.sampling_knobs(config.rl)

    def loss_fn(params, batch, rng, frozen=None):
        del rng, frozen  # the reference's log-probs are in the batch
        logprobs, entropy = _rl.policy_forward(graphdef, params, batch, knobs)
        total, sums, _ = _rl.policy_terms(config, logprobs, entropy, batch, batch["advantages"])
        return total, sums

    return loss_fn
