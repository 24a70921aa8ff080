"""PPO with a value head, GAE and whitened advantages, with a KL penalty to the reference.

Rollouts, rewards and the reference are GRPO's (lm/objectives/_rl.py); what differs is the
advantage. The policy is an lm.model.ValueModel (the Transformer plus a scalar value head on
its hidden states; from train.init_from the backbone is the SFT model's and the head starts at
0). With the sequence reward R placed on the completion's last token (r_t = R there, 0 before)
and the critic's values V_t at the rollout (aligned with targets: V at position t estimates the
return of targets t, t+1, …), lm.losses.gae gives per-token advantages and returns

    δ_t = r_t + γ·V_{t+1} − V_t,   A_t = δ_t + γλ·A_{t+1},   R_t = A_t + V_t

over the generated tokens; A is whitened over the batch's generated tokens (rl.whiten_advantages)
and the objective per generated token is

    ℓ_t = policy_loss_t (clipped surrogate + β·KL_t to the reference, as GRPO)
          + c_v · ½·max((V_t − R_t)², (V_old,t + clip(V_t − V_old,t, ±ε_v) − R_t)²)

(lm.losses.value_loss, c_v = rl.value_coef), both normalized per rl.normalize, so they share
one count. Metrics: GRPO's, plus value/loss, value/clip_fraction, value/explained_variance.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lm import losses
from lm.model.heads import last_scored_index
from lm.objectives import _rl

HAS_VALIDATION_LOSS = False
BATCH_KIND = _rl.batch_kind(("old_logprobs", "ref_logprobs", "advantages", "returns", "old_values"))
make_train_iter = _rl.make_train_iter


def make_model(config: Any, model_cfg: Any):
    from lm.model import ValueModel

    return lambda rngs: ValueModel(model_cfg, rngs=rngs)


def frozen_models(config: Any, model_cfg: Any) -> dict:
    return _rl.reference(config, model_cfg)


def _forward(graphdef, params, batch, knobs):
    """(log q(targets) [B, T] and entropy [B, T] of the behaviour distribution, values [B, T])."""
    logits, values = nnx.merge(graphdef, params).logits_and_values(batch["inputs"], batch["positions"],
                                                                   batch["segment_ids"])
    logprobs, entropy = _rl.token_scores(logits, batch["targets"], knobs)
    return logprobs, entropy, values


def make_prepare_batch(config: Any, setup: Any, tokenizer: Any):
    """prepare_batch(params, prompts, rng, frozen) -> (step batch, rollout metrics)."""
    from lm.objectives.grpo import score_shardings

    rc = config.rl
    rollouts = _rl.Rollouts(config, setup, tokenizer)
    ref_graphdef = setup.frozen_graphdefs["reference"]
    knobs, ref_knobs = _rl.sampling_knobs(rc), _rl.reference_knobs(rc)
    prompt_len = config.train.seq_len - rc.max_new_tokens

    def score(params, seq, out, rewards, valid, frozen):
        if rc.reward == "reward_model":
            rewards = _rl.model_rewards(setup, seq, frozen)
        rewards = rewards + _rl.overlong(rc, out["lengths"])
        old, entropy, values = _forward(setup.graphdef, params, seq, knobs)
        ref, _ = _rl.policy_forward(ref_graphdef, frozen["reference"], seq, ref_knobs)
        mask, excluded = _rl.scored_mask(seq, valid, old)
        last = last_scored_index(mask)
        token_rewards = jnp.zeros_like(mask).at[jnp.arange(mask.shape[0]), last].set(rewards * valid)
        if rc.kl_penalty == "reward":  # per-token −β·(log π_old − log π_ref): the usual RLHF shaping
            token_rewards = token_rewards + losses.kl_rewards(old, ref, mask, rc.kl_coef)
        advantages, returns = losses.gae(token_rewards, values, mask, rc.gamma, rc.lam)
        if rc.whiten_advantages:
            advantages = losses.whiten(advantages, mask)
        batch = dict(seq, loss_mask=mask, old_logprobs=jnp.where(mask != 0, old, 0.0), ref_logprobs=ref,
                     advantages=advantages, returns=returns, old_values=jnp.where(mask != 0, values, 0.0))
        metrics = _rl.rollout_metrics(rewards, valid, mask, old, ref, entropy, out, prompt_len, rc.max_new_tokens)
        metrics["rl/excluded_tokens"] = excluded
        residual = _rl.token_mean((returns - values) ** 2, mask)
        spread = _rl.token_mean((returns - _rl.token_mean(returns, mask)) ** 2, mask)
        metrics["value/explained_variance"] = 1.0 - residual / jnp.maximum(spread, 1e-8)
        return batch, metrics

    score = jax.jit(setup.with_activation_hints(score), **score_shardings(rollouts, setup))
    return _rl.prepare_with(rollouts, score, rc.updates_per_rollout)


def make_loss_fn(config: Any, graphdef: Any):
    """loss_fn(params, batch, rng, frozen) -> (policy + value loss sum, sums)."""
    rc = config.rl
    knobs = _rl.sampling_knobs(rc)

    def loss_fn(params, batch, rng, frozen=None):
        del rng, frozen
        logprobs, entropy, values = _forward(graphdef, params, batch, knobs)
        policy_sum, sums, policy = _rl.policy_terms(config, logprobs, entropy, batch, batch["advantages"])
        value = losses.value_loss(values, batch["old_values"], batch["returns"], batch["loss_mask"],
                                  clip_eps=rc.value_clip_eps or None, normalize=_value_normalize(rc),
                                  max_len=rc.max_new_tokens if _value_normalize(rc) == "constant" else None)
        sums["means"]["value/loss"] = (value.sum, value.count)
        sums["means"]["value/clip_fraction"] = (value.clip_fraction_sum, value.token_count)
        return policy_sum + rc.value_coef * value.sum, sums  # one count: both normalized alike

    return loss_fn


def _value_normalize(rc) -> str:
    """The value loss's normalization: the policy loss's (rl.loss_type's when set), so they share one count."""
    return losses.LOSS_TYPES[rc.loss_type] if rc.loss_type else rc.normalize
