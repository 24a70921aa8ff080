"""RL from rewards: rollout log-probabilities against a full forward pass, the reward registry's
errors, GRPO's split invariance through the train step, and a tiny GRPO run end to end (its
reward rises, its reference stays bit-identical)."""

import functools
import importlib

import jax
import numpy as np
import pytest
from flax import nnx

import lm.data as D
from configs import grpo as grpo_config
from lm import losses, objectives, rewards as rw, train
from lm.cli.train import build_model_config
from lm.model import ModelConfig, Transformer
from lm.sampling.rollout import COMPILER_OPTIONS, completion_values, rollout, sequences
from lm.train import loop

TOK = D.ByteTokenizer()


# -- rollouts -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    cfg = ModelConfig(vocab_size=TOK.vocab_size, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1,
                      mlp_dim=64)
    return nnx.split(Transformer(cfg, rngs=nnx.Rngs(3)))


def _prompt(lengths, prompt_len):
    rng = np.random.default_rng(0)
    batch = len(lengths)
    out = {k: np.zeros((batch, prompt_len), np.int32) for k in ("tokens", "positions", "segment_ids")}
    for r, n in enumerate(lengths):
        out["tokens"][r, prompt_len - n:] = rng.integers(0, 256, n)
        out["positions"][r, prompt_len - n:] = np.arange(n)
        out["segment_ids"][r, prompt_len - n:] = 1
    out["lengths"] = np.array(lengths, np.int32)
    return out


@pytest.mark.parametrize("decode_layout", [True, False])
def test_rollout_logprobs_equal_a_forward_pass(tiny_model, decode_layout):
    graphdef, params = tiny_model
    prompt, new = _prompt([3, 7, 5, 1], 8), 6
    knobs = {"temperature": np.float32(1.0), "top_k": np.int32(0), "top_p": np.float32(1.0), "min_p": np.float32(0)}
    stop = np.array([ord("e"), ord("a"), -1, -1], np.int32)  # some rows stop early

    @functools.partial(jax.jit, compiler_options=COMPILER_OPTIONS)
    def run(params, prompt, key):
        out = rollout(graphdef, params, prompt, key, knobs, stop, max_new_tokens=new, decode_layout=decode_layout)
        return out, sequences(prompt, out["tokens"])

    out, seq = run(params, prompt, jax.random.key(0))
    logits = nnx.merge(graphdef, params)(seq["inputs"], seq["positions"], seq["segment_ids"])
    forward = losses.cross_entropy(logits, seq["targets"], seq["loss_mask"]).target_logprobs
    produced = np.asarray(out["tokens"]) >= 0
    expected = np.where(produced, np.asarray(completion_values(forward, 8)), 0.0)
    np.testing.assert_allclose(out["policy_logprobs"], expected, atol=2e-5)
    np.testing.assert_allclose(out["sample_logprobs"], expected, atol=2e-5)  # temperature 1, no filter
    # the loss mask scores exactly the generated tokens, and the targets there are those tokens
    assert seq["loss_mask"].sum() == produced.sum() == np.asarray(out["lengths"]).sum()
    np.testing.assert_array_equal(np.asarray(completion_values(seq["targets"], 8))[produced],
                                  np.asarray(out["tokens"])[produced])


# -- rewards ------------------------------------------------------------------------------------


def _completion(reply, ended=True, answer="abc"):
    return rw.Completion(prompt="p", reply=reply, ended=ended, tokens=(), answer=answer)


OPTIONS = grpo_config.rl_config().reward_options


def test_rule_rewards_score_and_combine():
    reward = rw.RuleReward("exact_match:1,format:0.5", OPTIONS)
    values, valid = reward([_completion("abc"), _completion("abc", ended=False), _completion("")], step=3)
    np.testing.assert_allclose(values, [1.5, 0.0, 0.0])
    assert valid.all()


def test_reward_spec_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown rule 'exact'"):
        rw.parse("exact")
    with pytest.raises(ValueError, match="not a number"):
        rw.parse("format:x")
    with pytest.raises(ValueError, match="on_reward_error"):
        rw.RuleReward("format", OPTIONS, on_error="ignore")


@pytest.fixture
def broken_rules(monkeypatch):
    def boom(options):
        def score(c):
            if c.reply == "raise":
                raise KeyError("oops")
            return float("nan") if c.reply == "nan" else 1.0
        return score
    monkeypatch.setitem(rw.REWARDS, "broken", boom)


def test_a_broken_reward_is_an_error_not_a_zero(broken_rules):
    reward = rw.RuleReward("broken", OPTIONS)
    with pytest.raises(RuntimeError, match=r"reward 'broken' raised KeyError.*step 7.*completion 1"):
        reward([_completion("ok"), _completion("raise")], step=7)
    with pytest.raises(FloatingPointError, match="reward 'broken' returned nan"):
        reward([_completion("nan")])


def test_a_broken_reward_is_skipped_and_counted(broken_rules):
    reward = rw.RuleReward("broken", OPTIONS, on_error="skip")
    values, valid = reward([_completion("ok"), _completion("raise"), _completion("nan")])
    assert valid.tolist() == [True, False, False] and reward.skipped == 2
    assert np.isfinite(values).all()


# -- GRPO through the trainer -------------------------------------------------------------------


def run_tiny(name, workdir, steps, **rl):
    """configs/<name>.py:tiny (config.rl fields overridden by `rl`) through loop.run, wired as
    lm.cli.train wires it."""
    config = importlib.import_module(f"configs.{name}").get_config("tiny")
    config.train.steps = steps
    config.rl.update(rl)
    model_cfg = build_model_config(config, TOK.vocab_size)
    objective = objectives.get(config.objective)
    train_iter = objectives.make_train_iter(objective, config, TOK, D.build_iterator,
                                            batch_size=config.train.batch_size, seq_len=config.train.seq_len,
                                            seed=0)
    result = loop.run(config, str(workdir), model_cfg=model_cfg,
                      make_loss_fn=lambda g: objective.make_loss_fn(config, g), train_iter=train_iter,
                      valid_batches=None, make_model=objectives.make_model(objective, config, model_cfg),
                      frozen=objectives.frozen_models(objective, config, model_cfg),
                      batch_kind=objectives.batch_kind(objective, config),
                      make_prepare_batch=objectives.make_prepare_batch(objective, config, TOK))
    return config, result


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return run_tiny("grpo", tmp_path_factory.mktemp("grpo"), 10)


def test_tiny_grpo_run_raises_its_reward(tiny_run):
    _, result = tiny_run
    rewards = [row["rl/reward_mean"] for row in result.history]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.15, rewards
    assert all(np.isfinite(row["loss"]) for row in result.history)
    assert result.history[0]["rl/kl_ref"] == pytest.approx(0.0, abs=1e-6)  # policy = reference at step 0
    assert result.history[-1]["rl/kl_ref"] > 0


def test_reference_stays_bit_identical(tiny_run):
    config, result = tiny_run
    fresh = train.init_frozen(result.setup, "reference", config.seed)  # what the run started from
    for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(result.frozen["reference"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(result.state.params))]
    assert any(moved)  # while the policy moved away from it


def test_grpo_step_split_invariance(tiny_run):
    """One rollout batch: micro_batches=2 gives the loss and update of micro_batches=1."""
    config, result = tiny_run
    setup = result.setup
    objective = objectives.get("grpo")
    prepare = objective.make_prepare_batch(config, setup, TOK)
    prompts = train.global_batch(objective.make_train_iter(config, TOK, batch_size=config.train.batch_size).__next__(),
                                 setup.mesh)
    frozen = result.frozen
    batch, metrics = prepare(result.state.params, prompts, jax.random.key(5), frozen)
    assert float(metrics["rl/reward_std"]) > 0  # non-zero advantages: the check has teeth
    from lm.train.optim import make_optimizer

    optimizer, schedule = make_optimizer(config.optimizer, config.train.steps)
    loss_fn = objective.make_loss_fn(config, setup.graphdef)
    outs = []
    for k in (1, 2):
        step = jax.jit(train.make_train_step(loss_fn, optimizer, schedule, k))
        state = train.TrainState(result.state.step, result.state.params, optimizer.init(result.state.params),
                                 result.state.rng, result.state.bad_steps)
        outs.append(step(state, batch, frozen))
    (s1, m1), (s2, m2) = outs
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
    np.testing.assert_allclose(m1["policy/kl"], m2["policy/kl"], rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # Adam at lr 3e-2: rounding of g/√v


def test_tiny_ppo_run_raises_its_reward(tmp_path):
    """PPO (value head, GAE, whitened advantages) on the same tiny task."""
    _, result = run_tiny("ppo", tmp_path, 8)
    rewards = [row["rl/reward_mean"] for row in result.history]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.15, rewards
    assert all(np.isfinite(row["value/loss"]) and np.isfinite(row["loss"]) for row in result.history)
    assert "value_head" in result.state.params  # the trained model is the ValueModel


def test_grpo_with_a_trained_reward_model(tmp_path):
    """rl.reward='reward_model': a reward run (configs/reward.py:tiny, the policy's shape) scores the
    rollouts on the device; its parameters are the checkpoint's, bit for bit, after training, and
    the rollout's reward is that model's score of prompt + completion."""
    from configs import reward as reward_config
    from lm.cli.train import train_and_report
    from lm.model import RewardModel
    from lm.io import checkpoint as ckpt
    from lm.train.init import load_frozen

    rm_config = reward_config.get_config("tiny")
    rm_config.train.steps = 2
    rm_config.model.scan_layers = grpo_config.get_config("tiny").model.scan_layers  # the policy's layout
    rm_config.eval.evaluators = ""
    train_and_report(rm_config, str(tmp_path / "rm"))
    config, result = run_tiny("grpo", tmp_path / "grpo", 3, reward="reward_model", reward_model=str(tmp_path / "rm"))
    setup, frozen = result.setup, result.frozen
    stored = load_frozen(str(tmp_path / "rm"), ckpt.abstract_with_shardings(setup.abstract_frozen["reward_model"],
                                                                            setup.frozen_shardings["reward_model"]))
    for a, b in zip(jax.tree.leaves(stored), jax.tree.leaves(frozen["reward_model"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(np.isfinite(row["rl/reward_mean"]) and np.isfinite(row["loss"]) for row in result.history)

    objective = objectives.get("grpo")
    prepare = objective.make_prepare_batch(config, setup, TOK)
    prompts = train.global_batch(objective.make_train_iter(config, TOK, batch_size=config.train.batch_size).__next__(),
                                 setup.mesh)
    batch, metrics = prepare(result.state.params, prompts, jax.random.key(7), frozen)
    rm = nnx.merge(setup.frozen_graphdefs["reward_model"], stored)
    assert isinstance(rm, RewardModel)
    scores = rm.rewards(batch["inputs"], batch["positions"], batch["segment_ids"], batch["loss_mask"])
    assert float(np.std(scores)) > 0  # the completions differ, and so do their scores
    np.testing.assert_allclose(float(metrics["rl/reward_mean"]), float(np.mean(scores)), rtol=1e-5, atol=1e-6)


def test_on_policy_ratio_is_one_under_temperature_and_top_p(tiny_run):
    """One behaviour distribution: with temperature 0.7 and top-p 0.9 the sampler's recorded
    log-probs equal the scorer's (old) ones, and the loss's log-probs at the same parameters give
    ratio 1 on every response token (separate jits, separate layouts)."""
    from lm.objectives import _rl

    config, result = tiny_run
    config = config.copy_and_resolve_references()
    config.rl.temperature, config.rl.top_p = 0.7, 0.9
    setup, params = result.setup, result.state.params
    objective = objectives.get("grpo")
    prepare = objective.make_prepare_batch(config, setup, TOK)
    prompts = train.global_batch(objective.make_train_iter(config, TOK, batch_size=config.train.batch_size).__next__(),
                                 setup.mesh)
    seq, out = prepare.rollouts.sample(params, prompts, jax.random.key(11))
    batch, metrics = prepare(params, prompts, jax.random.key(11), result.frozen)
    mask = np.asarray(batch["loss_mask"]) != 0
    assert mask.sum() > 20 and float(metrics["rl/excluded_tokens"]) == 0
    prompt_len = config.train.seq_len - config.rl.max_new_tokens
    recorded = np.asarray(out["sample_logprobs"])
    scored = np.asarray(completion_values(batch["old_logprobs"], prompt_len))
    produced = np.asarray(out["tokens"]) >= 0
    np.testing.assert_allclose(scored[produced], recorded[produced], atol=1e-5)
    assert float(metrics["rl/sampler_scorer_gap"]) < 1e-5
    # the filtered distribution differs from the plain one: the check would catch the old scorer
    plain = np.asarray(out["policy_logprobs"])
    assert np.abs(plain[produced] - recorded[produced]).max() > 0.05
    knobs = _rl.sampling_knobs(config.rl)
    current, _ = jax.jit(lambda p, b: _rl.policy_forward(setup.graphdef, p, b, knobs))(params, batch)
    ratio = np.exp(np.asarray(current) - np.asarray(batch["old_logprobs"]))[mask]
    np.testing.assert_allclose(ratio, 1.0, atol=1e-5)
    _, sums = jax.jit(objective.make_loss_fn(config, setup.graphdef))(params, batch, None, None)
    ratio_sum, n = sums["means"]["policy/ratio"]
    np.testing.assert_allclose(float(ratio_sum / n), 1.0, atol=1e-6)


def test_dynamic_sampling_drops_counts_and_refills(tiny_run):
    """rl.dynamic_sampling: with the exact-match reward a random tiny policy scores 0 on every
    completion, so every group is all-equal: each round drops and counts them all, and after
    rl.dynamic_sampling_max_rounds refills the batch keeps them with weight 0 (nothing trains on
    them); with char_fraction the groups are mixed and nothing is dropped."""
    config, result = tiny_run
    setup = result.setup
    objective = objectives.get("grpo")
    config = config.copy_and_resolve_references()
    config.rl.dynamic_sampling, config.rl.dynamic_sampling_max_rounds = True, 1
    prepare = objective.make_prepare_batch(config, setup, TOK)
    prompts = train.global_batch(
        objective.make_train_iter(config, TOK, batch_size=config.train.batch_size).__next__(), setup.mesh)
    n_groups = config.train.batch_size // config.rl.group_size
    for reward, dropped in (("char_fraction", False), ("exact_match", True)):
        prepare.rollouts.rule = rw.RuleReward(reward, config.rl.reward_options)  # same compiled sampler and scorer
        batch, metrics = prepare(result.state.params, prompts, jax.random.key(3), result.frozen)
        if dropped:
            assert metrics["rl/dynamic_dropped_groups"] == 2 * n_groups and metrics["rl/dynamic_rounds"] == 2
            assert metrics["rl/dynamic_unfilled_groups"] == n_groups
            assert float(np.sum(batch["loss_mask"])) == 0.0
        else:
            assert metrics["rl/dynamic_dropped_groups"] == 0 and metrics["rl/dynamic_unfilled_groups"] == 0
            assert float(np.sum(batch["loss_mask"])) > 0
