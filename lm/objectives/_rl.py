"""What the RL objectives (grpo.py, ppo.py) share: prompts, rollouts, rewards, the batch they
build and the metrics of a rollout. Not an objective itself (the leading underscore keeps it out
of lm.objectives.names()).

One training step of RL (lm/train/loop.py calls `prepare_batch` between the data and the step):

  1. the data gives n prompts (lm/data/prompts.py); each is repeated G = rl.group_size times,
     group-major (rows g·G … g·G+G−1 answer prompt g), B = n·G = train.batch_size rows;
  2. `sample` (jitted, parameters as an argument): lm.sampling.rollout decodes
     N = rl.max_new_tokens tokens per row over the KV cache with the current policy
     (temperature / top-k / top-p / min-p of rl), stopping a row at any stop id (rl.stop:
     lm.sampling.rollout.stop_ids_of), and lays prompt + completion out as a batch of the
     token contract [B, T], T = train.seq_len = P + N (lm.sampling.rollout.sequences): the
     loss mask is 1 exactly on the generated tokens, the stop token included, 0 after it (so
     nothing after a stop reaches the loss, the reward or the KL);
  3. the rewards, on the host: a rule reward (lm/rewards.py) of each decoded completion, or on
     the device a frozen reward model (lm.model.RewardModel) of prompt + completion; with
     rl.dynamic_sampling, groups whose rewards are all equal are dropped, counted and refilled
     by sampling the step's prompts again (`Rollouts.refill`);
  4. a second jit (the objective's `score`): one teacher-forced forward pass of the policy gives
     the old log-probabilities and one of the frozen reference gives the reference's, once per
     rollout; the advantages follow.

One behaviour distribution: every policy log-prob (the sampler's record, old, current) is of the
distribution the tokens were drawn from, softmax(filter(logits)) with rl's temperature and
filters, through one function (lm.sampling.behaviour_logprobs, `token_scores`), so the ratio is
exactly 1 on the first, on-policy step. The reference is scored at the same temperature but
unfiltered (TRL's and verl's choice: a filtered reference could give a sampled token
probability 0 and the KL infinity).

The step batch is the token contract plus `old_logprobs`, `ref_logprobs` [B, T] and the
objective's advantages (and PPO's values and returns): everything is a [B, ...] array, so
micro-batching and sharding split it like any batch, and the advantages, batch statistics, are
computed before the split.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import losses, rewards as rw
from lm.data import batch as batch_contract
from lm.parallel import sharding as shd
from lm.sampling.rollout import COMPILER_OPTIONS as ROLLOUT_COMPILER_OPTIONS
from lm.objectives._dynamic_sampling import overlong, refill
from lm.sampling.filters import behaviour_logprobs
from lm.sampling.rollout import completion_values, left_padded, rollout, sequences, stop_array, stop_ids_of
from lm.train.state import FrozenModel

HAS_VALIDATION_LOSS = False  # RL has no fixed validation batches: its measure is the reward


STOP = ("stop_ids", "end_of_turn", "none")


def check(config: Any) -> None:
    rc, tc = config.rl, config.train
    if rc.group_size < 1 or tc.batch_size % rc.group_size:
        raise ValueError(f"train.batch_size={tc.batch_size} must be a positive multiple of rl.group_size="
                         f"{rc.group_size} (the rows of a step are prompts × samples per prompt)")
    if not 1 <= rc.max_new_tokens < tc.seq_len:
        raise ValueError(f"rl.max_new_tokens={rc.max_new_tokens} must be in [1, train.seq_len={tc.seq_len}): "
                         "a row holds the prompt (train.seq_len − rl.max_new_tokens tokens) and the completion")
    if rc.kl_penalty not in ("loss", "reward"):
        raise ValueError(f"rl.kl_penalty must be 'loss' or 'reward', got {rc.kl_penalty!r}")
    if rc.stop not in STOP:
        raise ValueError(f"rl.stop must be one of {STOP}, got {rc.stop!r}")
    if rc.kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"rl.kl_estimator must be 'k1', 'k2' or 'k3', got {rc.kl_estimator!r}")
    if rc.loss_type and rc.loss_type not in losses.LOSS_TYPES:
        raise ValueError(f"rl.loss_type must be '' or one of {tuple(losses.LOSS_TYPES)}, got {rc.loss_type!r}")
    if rc.importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"rl.importance_sampling_level must be 'token' or 'sequence', got "
                         f"{rc.importance_sampling_level!r}")
    if not rc.temperature > 0:
        raise ValueError(f"rl.temperature must be > 0 (the ratio of a greedy policy is undefined), got {rc.temperature}")
    if not 0 <= rc.overlong_cache <= rc.max_new_tokens:
        raise ValueError(f"rl.overlong_cache must be in [0, rl.max_new_tokens={rc.max_new_tokens}], got "
                         f"{rc.overlong_cache}")
    if rc.dynamic_sampling and (rc.reward == "reward_model" or rc.group_size < 2):
        raise ValueError("rl.dynamic_sampling needs rule rewards (rl.reward != 'reward_model': they are known on "
                         f"the host before scoring) and rl.group_size >= 2, got rl.reward={rc.reward!r}, "
                         f"rl.group_size={rc.group_size}")


def sampling_knobs(rc: Any) -> dict:
    """The behaviour distribution's knobs (traced scalars of lm.sampling.filters)."""
    return {"temperature": np.float32(rc.temperature), "top_k": np.int32(rc.top_k),
            "top_p": np.float32(rc.top_p), "min_p": np.float32(rc.min_p)}


def reference_knobs(rc: Any) -> dict:
    """The reference's: rl's temperature, no filter (see the module docstring)."""
    return {"temperature": np.float32(rc.temperature), "top_k": np.int32(0), "top_p": np.float32(1.0),
            "min_p": np.float32(0.0)}


def _filters_on(knobs: dict) -> bool:
    return bool(knobs["top_k"] > 0 or knobs["top_p"] < 1 or knobs["min_p"] > 0)


def token_scores(logits: jax.Array, targets: jax.Array, knobs: dict) -> tuple[jax.Array, jax.Array]:
    """(log q(targets) [B, T], entropy of q [B, T]) of the behaviour distribution
    q = softmax(filter(logits)) (lm.sampling.behaviour_logprobs: the function the sampler uses).
    Without a filter, q = softmax(logits / T): the plain cross-entropy path (to become the chunked
    log-prob computation of lm.losses); filters need whole rows [.., V]."""
    if _filters_on(knobs):
        return behaviour_logprobs(logits, targets, **knobs, with_entropy=True)
    scaled = logits.astype(jnp.float32) / knobs["temperature"]
    logprobs = losses.cross_entropy(scaled, targets).target_logprobs
    return logprobs, jax.lax.stop_gradient(losses.entropy(scaled).per_token)


def batch_kind(per_token: tuple[str, ...]):
    """A `batch_kind` (lm/data/batch.py: spec) for the token contract plus float32 [B, T] fields
    (a per-sequence value, GRPO's advantage, is broadcast over its row)."""
    def kind(batch_size: int, seq_len: int, make) -> dict:
        out = batch_contract.spec("tokens", batch_size, seq_len, make)
        out.update({k: make((batch_size, seq_len), np.float32) for k in per_token})
        return out
    return kind


def reference(config: Any, model_cfg: Any) -> dict:
    """The frozen models: the reference policy, a Transformer with the parameters of
    train.init_from (the SFT run the policy starts from; None: freshly initialized, for tests),
    and with rl.reward='reward_model' the reward model (lm.model.RewardModel) of rl.reward_model
    (a reward run: lm/objectives/reward.py)."""
    from lm.model import RewardModel, Transformer

    frozen = {"reference": FrozenModel(lambda rngs: Transformer(model_cfg, rngs=rngs), path=config.train.init_from)}
    if config.rl.reward == "reward_model":
        if not config.rl.reward_model:
            raise ValueError("rl.reward='reward_model' needs rl.reward_model: the run directory (or checkpoint) "
                             "of a trained reward model with this model shape")
        frozen["reward_model"] = FrozenModel(lambda rngs: RewardModel(model_cfg, rngs=rngs),
                                             path=config.rl.reward_model)
    return frozen


def model_rewards(setup: Any, seq: dict, frozen: dict) -> jax.Array:
    """r(prompt, completion) [B] of the frozen reward model: its scalar head at the last real token,
    the completion's last (stop token included), whose hidden state has read all of it
    (lm.model.RewardModel.rewards; tokens after a stop are padding, segment 0)."""
    model = nnx.merge(setup.frozen_graphdefs["reward_model"], frozen["reward_model"])
    return model.rewards(seq["inputs"], seq["positions"], seq["segment_ids"], seq["loss_mask"])


def make_train_iter(config: Any, tokenizer: Any, *, batch_size: int, process_index: int = 0,
                    process_count: int = 1, **_) -> Any:
    """This process's prompts: batch_size / G per step (batch_size: this process's rows)."""
    from lm import data
    from lm.data.prompts import PromptIterator

    check(config)
    rc = config.rl
    if config.data.source == "markov":  # the Markov reward task: start states as prompts
        from lm.data.prompts import MarkovPrompts

        source = MarkovPrompts(config.data.markov, "train", seed=config.seed)
    else:
        source = data.build_source(config.data, split="train", seq_len=config.train.seq_len, seed=config.seed,
                                   tokenizer=tokenizer)
    if not hasattr(source, "example"):
        raise ValueError(f"RL needs a prompt source with examples (the synthetic chat tasks or markov_prompts), "
                         f"got data.source={config.data.source!r}")
    return PromptIterator(source, tokenizer, batch_size=batch_size // rc.group_size,
                          prompt_len=config.train.seq_len - rc.max_new_tokens, answer_len=rc.max_answer_tokens,
                          process_index=process_index, process_count=process_count, name=config.data.source)


def to_host(x: jax.Array) -> np.ndarray:
    """A global array → numpy on every process."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def token_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return losses.mean_of(jnp.sum(mask * jnp.where(mask != 0, x, 0.0)), jnp.sum(mask))


class Rollouts:
    """Step 1–3 of the module docstring for one run: `sample` and `rewards` (and, with dynamic
    sampling, lm/objectives/_dynamic_sampling.py's `refill`)."""

    def __init__(self, config: Any, setup: Any, tokenizer: Any):
        check(config)
        rc = config.rl
        self.config, self.setup, self.tokenizer = config, setup, tokenizer
        self.group, self.new_tokens = rc.group_size, rc.max_new_tokens
        self.prompt_len = config.train.seq_len - rc.max_new_tokens
        self.stop_ids = stop_ids_of(tokenizer) if rc.stop != "none" else ()
        self._stop = stop_array(self.stop_ids)
        self.knobs = sampling_knobs(rc)
        self.batch_sharding = shd.batch_sharding(setup.mesh)  # [B, T] arrays
        # any [B, ...] array (rank ≥ 1): rows over the batch axes
        self.rows = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec(shd.BATCH_AXES))
        self.replicated = shd.replicated(setup.mesh)
        self.rule = None if rc.reward == "reward_model" else rw.RuleReward(rc.reward, rc.reward_options,
                                                                             rc.on_reward_error)
        self.calls = 0
        if rc.dynamic_sampling and jax.process_count() > 1:
            raise ValueError("rl.dynamic_sampling runs on one process (it regroups the batch on the host)")
        # in/out shardings from the mesh: parameters as the state holds them, rows over the batch axes
        rows, rep = self.rows, self.replicated
        self._sample = jax.jit(setup.with_activation_hints(functools.partial(self._sample_fn, setup.graphdef)),
                               in_shardings=(setup.state_shardings.params, rows, rep, rep, rep),
                               out_shardings=(rows, rows), compiler_options=ROLLOUT_COMPILER_OPTIONS)

    def _sample_fn(self, graphdef, params, prompts: dict, key: jax.Array, knobs: dict,
                   stop_ids: jax.Array) -> tuple[dict, dict]:
        tokens = jnp.repeat(prompts["prompt"], self.group, axis=0)  # group-major rows
        lengths = jnp.repeat(prompts["prompt_lengths"], self.group, axis=0)
        prompt = left_padded(tokens, lengths)
        out = rollout(graphdef, params, prompt, key, knobs, stop_ids,
                      max_new_tokens=self.new_tokens, decode_layout=self.config.rl.decode_layout)
        return sequences(prompt, out["tokens"]), out

    def sample(self, params: Any, prompts: dict, key: jax.Array) -> tuple[dict, dict]:
        """(the token-contract batch of prompt + completion, rollout outputs), both [B, ...]."""
        prompts = {k: prompts[k] for k in ("prompt", "prompt_lengths")}
        return self._sample(params, prompts, key, self.knobs, self._stop)  # knobs traced: no constant folding

    def rewards(self, prompts: dict, out: dict) -> tuple[jax.Array, jax.Array, dict]:
        """Rule rewards of the decoded completions → (rewards [B], valid [B] float32, replicated;
        host metrics). A skipped completion's reward is its group's mean over valid ones."""
        values, valid, host = self.host_rewards(prompts, out)
        if values is None:  # a reward model scores on the device (`model_rewards`, in the objective's jit)
            ones = jnp.ones((out["tokens"].shape[0],), jnp.float32)
            return ones * 0.0, ones, {}
        return self.put(values), self.put(valid), host

    def put(self, v: np.ndarray) -> jax.Array:
        return jax.make_array_from_process_local_data(self.replicated, v)

    def host_rewards(self, prompts: dict, out: dict):
        """(rewards [B], valid [B] float32 numpy, metrics) of rule rewards; (None, None, {}) for a model."""
        self.calls += 1
        if self.rule is None:
            return None, None, {}
        host = {k: to_host(prompts[k]) for k in ("prompt", "prompt_lengths", "answer", "answer_lengths")}
        host = {k: np.repeat(v, self.group, axis=0) for k, v in host.items()}
        completions = rw.decode_completions(self.tokenizer, host["prompt"], host["prompt_lengths"],
                                            to_host(out["tokens"]), host["answer"], host["answer_lengths"],
                                            self.stop_ids)
        values, valid = self.rule(completions, step=f"rollout {self.calls}")
        grouped, ok = values.reshape(-1, self.group), valid.reshape(-1, self.group)
        fill = np.where(ok.any(1), (grouped * ok).sum(1) / np.maximum(ok.sum(1), 1), 0.0)
        values = np.where(ok, grouped, fill[:, None]).reshape(-1).astype(np.float32)
        return values, valid.astype(np.float32), {"rl/reward_skipped": float(self.rule.skipped)}


def rollout_metrics(rewards, valid, mask, old_logprobs, ref_logprobs, entropy, out: dict, prompt_len: int,
                    new_tokens: int) -> dict:
    """Per-rollout metrics (means over valid rows / scored tokens)."""
    n = jnp.maximum(jnp.sum(valid), 1.0)
    mean = jnp.sum(valid * rewards) / n
    log_rho = jnp.where(mask != 0, ref_logprobs - old_logprobs, 0.0)
    lengths = out["lengths"]
    # the scorer's log-probs against those the sampler recorded (same function, other layout: ~1e-6)
    gap = jnp.where(completion_values(mask, prompt_len) != 0,
                    jnp.abs(completion_values(old_logprobs, prompt_len) - out["sample_logprobs"]), 0.0)
    return {"rl/reward_mean": mean, "rl/reward_std": jnp.sqrt(jnp.sum(valid * (rewards - mean) ** 2) / n),
            "rl/kl_ref": token_mean(jnp.exp(log_rho) - log_rho - 1.0, mask),  # k3 estimate of KL(π_old‖π_ref)
            "rl/entropy": token_mean(entropy, mask),
            "rl/response_length": jnp.mean(lengths.astype(jnp.float32)),
            "rl/truncated": jnp.mean((lengths >= new_tokens).astype(jnp.float32)),
            "rl/sampler_scorer_gap": jnp.max(gap)}


def completion_logprobs(per_target: jax.Array, prompt_len: int) -> jax.Array:
    return completion_values(per_target, prompt_len)


def floor_excluded(logprobs, old_logprobs):
    """A sampled token that the current policy's filters now exclude (log q = −inf, possible after
    updates with top-k/top-p/min-p) gets log π_old − 20 instead (ratio e^−20, no gradient): finite
    ratio and KL, never a skipped step."""
    return jnp.where(jnp.isfinite(logprobs), logprobs, jax.lax.stop_gradient(old_logprobs) - 20.0)


def policy_terms(config: Any, logprobs, entropy, batch: dict, advantages) -> tuple[jax.Array, dict, Any]:
    """The policy loss + KL of `batch` (rl config) → (sum, sums with count and means, output)."""
    rc = config.rl
    mask = batch["loss_mask"]
    logprobs = floor_excluded(logprobs, batch["old_logprobs"])
    normalize = None if rc.loss_type else rc.normalize
    constant = (rc.loss_type or None) == "dr_grpo" or (not rc.loss_type and rc.normalize == "constant")
    out = losses.policy_loss(logprobs, batch["old_logprobs"], advantages, mask, clip_eps=rc.clip_eps,
                             clip_eps_high=rc.clip_eps_high or None, ref_logprobs=batch["ref_logprobs"],
                             kl_coef=rc.kl_coef if rc.kl_penalty == "loss" else 0.0, kl_estimator=rc.kl_estimator,
                             normalize=normalize, max_len=rc.max_new_tokens if constant else None,
                             loss_type=rc.loss_type or None, importance_sampling_level=rc.importance_sampling_level,
                             sapo_temperature_pos=rc.sapo_temperature_pos,
                             sapo_temperature_neg=rc.sapo_temperature_neg)
    ent = jnp.sum(mask * jnp.where(mask != 0, entropy, 0.0))
    sums = {"count": out.count,
            "means": {"policy/kl": (out.kl_sum, out.token_count), "policy/clip_fraction": (out.clip_fraction_sum,
                      out.token_count), "policy/ratio": (out.ratio_sum, out.token_count),
                      "policy/entropy": (ent, out.token_count)}}
    return out.sum, sums, out


def policy_forward(graphdef: Any, params: Any, batch: dict, knobs: dict):
    """(log q(targets) [B, T], entropy [B, T]) of `params`' behaviour distribution (`token_scores`)."""
    model = nnx.merge(graphdef, params)
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    return token_scores(logits, batch["targets"], knobs)


def scored_mask(seq: dict, valid, old_logprobs):
    """The loss mask of a rollout: generated tokens of valid rows, less any token the scorer's
    filters exclude (log q = −inf: float rounding at a filter's edge; counted in rl/excluded_tokens)."""
    mask = seq["loss_mask"] * valid[:, None]
    excluded = (mask != 0) & ~jnp.isfinite(old_logprobs)
    return jnp.where(excluded, 0.0, mask), jnp.sum(excluded.astype(jnp.float32))


def kl_shaped(config: Any, rewards, mask, old_logprobs, ref_logprobs):
    """rl.kl_penalty='reward': r_i + Σ_t kl_rewards_t = r_i − β·Σ_t (log π_old(y_t) − log π_ref(y_t))
    over row i's generated tokens (the sequence's sampled k1), so that the policy gradient with a
    baseline is that of J = E[r] − β·KL(π‖π_ref) exactly; 'loss': the rewards as they are (the KL
    is a loss term)."""
    if config.rl.kl_penalty != "reward":
        return rewards
    return rewards + jnp.sum(losses.kl_rewards(old_logprobs, ref_logprobs, mask, config.rl.kl_coef), axis=1)


def prepare_with(rollouts: Rollouts, score, updates_per_rollout: int):
    """prepare_batch(params, prompts, rng, frozen) -> (step batch, rollout metrics): sample with the
    current parameters, reward on the host (rules), then the objective's jitted `score(params, seq,
    out, rewards, valid, frozen)` (old and reference log-probs, advantages, metrics)."""
    def prepare_batch(params, prompts, rng, frozen):
        seq, out = rollouts.sample(params, prompts, rng)
        if rollouts.config.rl.dynamic_sampling:
            seq, out, rewards, valid, host = refill(rollouts, params, prompts, rng, seq, out)
        else:
            rewards, valid, host = rollouts.rewards(prompts, out)
        batch, metrics = score(params, seq, out, rewards, valid, frozen)
        return batch, {**metrics, **host}

    prepare_batch.rollouts = rollouts
    return reused(prepare_batch, updates_per_rollout)


def reused(prepare_batch, updates_per_rollout: int):
    """prepare_batch that samples a new rollout every `updates_per_rollout` steps and returns the
    same batch (old log-probabilities, advantages) in between: PPO's several updates per rollout,
    where the ratio π_θ/π_old leaves 1 and the clip acts. The prompts of the steps in between are
    not used. A run resumed mid-cycle samples anew at its first step."""
    if updates_per_rollout < 1:
        raise ValueError(f"rl.updates_per_rollout must be >= 1, got {updates_per_rollout}")
    if updates_per_rollout == 1:
        return prepare_batch
    cache: dict = {"left": 0}

    def prepare(params, prompts, rng, *frozen):
        if cache["left"] == 0:
            cache["batch"], cache["metrics"] = prepare_batch(params, prompts, rng, *frozen)
            cache["left"] = updates_per_rollout
        cache["left"] -= 1
        return cache["batch"], cache["metrics"]

    prepare.rollouts = prepare_batch.rollouts
    return prepare
