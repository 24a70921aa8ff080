"""GRPO and PPO with LoRA (lm/train/lora.py): through the trainer (configs/<grpo|ppo>.py:tiny,
lora.rank 2, two steps) only the adapters (and PPO's value head) train, the base comes out bit for
bit as it went in, the loss is finite, and the reference the rollouts are scored against is the
base with adapters off: its log-probabilities are the plain base model's."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lm.data as D
from lm import objectives, train
from lm.cli.train import build_model_config
from lm.model import Transformer, lora
from lm.objectives import _rl
from lm.train import lora as lora_train
from lm.train import loop

TOK = D.ByteTokenizer()


def leaves(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("name", ["grpo", "ppo"])
def test_rl_with_lora_trains_only_adapters_against_the_base_as_reference(name, tmp_path):
    config = importlib.import_module(f"configs.{name}").get_config("tiny")
    config.train.steps = 2
    config.rl.kl_coef = 0.1  # the reference enters the loss
    config.lora.update(rank=2, alpha=4.0, targets="all")
    model_cfg = build_model_config(config, TOK.vocab_size)
    objective = objectives.get(config.objective)
    frozen = objectives.frozen_models(objective, config, model_cfg)
    make_prepare = objectives.make_prepare_batch(objective, config, TOK)
    result = loop.run(config, str(tmp_path), model_cfg=model_cfg,
                      make_loss_fn=lambda g: objective.make_loss_fn(config, g),
                      train_iter=objectives.make_train_iter(objective, config, TOK, D.build_iterator,
                                                            batch_size=config.train.batch_size,
                                                            seq_len=config.train.seq_len, seed=0),
                      valid_batches=None, make_model=objectives.make_model(objective, config, model_cfg),
                      frozen=frozen, batch_kind=objectives.batch_kind(objective, config),
                      make_prepare_batch=make_prepare)
    setup = result.setup
    assert set(setup.frozen_graphdefs) == {lora_train.BASE}  # no second copy of the weights as reference
    trained = leaves(setup.abstract_state.params)
    heads = {"value_head/w", "value_head/b"} if name == "ppo" else set()
    assert heads <= set(trained) and all(lora.is_adapter((k,)) or k in heads for k in trained)
    assert all(np.isfinite(row["loss"]) for row in result.history) and len(result.history) == 2
    assert result.history[0]["rl/kl_ref"] == 0.0  # step 0: policy = base = reference, exactly
    # the base after the run (the non-adapter leaves of the whole parameters) is the base it started from
    base = train.init_frozen(setup, lora_train.BASE, config.seed)
    full = leaves(result.state.params)
    for path, value in leaves(base).items():
        np.testing.assert_array_equal(np.asarray(full[path]), np.asarray(value), err_msg=path)
    adapters = {k: v for k, v in full.items() if lora.is_adapter((k,))}
    assert any(float(jnp.max(jnp.abs(v))) > 0 for k, v in adapters.items() if k.endswith("_lora_b"))
    if name != "grpo":
        return  # the reference below is the objectives' common one (_rl.policy_forward of frozen['reference'])
    # the reference the rollouts are scored against: the same parameters with adapters off, whose
    # log-probs are those of the plain base model
    params = {k: v for k, v in result.state.params.items() if k not in ("value_head",)}
    reference = lora.adapters_off(params)
    plain = nnx.graphdef(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))))
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: lora_train.AdaptedFactory(
        lambda rngs: Transformer(model_cfg, rngs=rngs), config.lora, quantized=False)(nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    t = config.train.seq_len
    seq = {"inputs": jnp.asarray(rng.integers(0, 256, (4, t)), jnp.int32),
           "targets": jnp.asarray(rng.integers(0, 256, (4, t)), jnp.int32),
           "positions": jnp.tile(jnp.arange(t, dtype=jnp.int32), (4, 1)), "segment_ids": jnp.ones((4, t), jnp.int32)}
    knobs = _rl.reference_knobs(config.rl)
    ref, policy, want = jax.jit(lambda r, p, b: (
        _rl.policy_forward(graphdef, r, seq, knobs)[0], _rl.policy_forward(graphdef, p, seq, knobs)[0],
        _rl.policy_forward(plain, b, seq, knobs)[0]))(reference, params, nnx.to_pure_dict(nnx.state(
            nnx.merge(plain, jax.tree.map(np.asarray, {k: v for k, v in base.items()})))))
    np.testing.assert_array_equal(ref, want)
    assert float(jnp.max(jnp.abs(policy - ref))) > 1e-4  # while the policy moved away from it
