"""The trainer beyond one language model: model factories (reward and value heads), frozen models,
preference batches through micro-batching, sharding and the memory check, and train.init_from."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from conftest import markov_batch
from lm import losses, train
from lm.data import batch as contract
from lm.io import checkpoint as ckpt
from lm.model import ModelConfig, RewardModel, Transformer, ValueModel, last_scored_index
from lm.parallel import sharding as shd
from lm.train import memory
from lm.train.init import init_params
from lm.train.optim import make_optimizer

CFG = ModelConfig(vocab_size=16, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)


def _pair(markov, start, batch_size=8, seq_len=16):
    chosen, rejected = markov_batch(markov, start, batch_size, seq_len), markov_batch(markov, start + 100, batch_size,
                                                                                        seq_len)
    chosen["loss_mask"][:, : seq_len // 2] = 0.0  # a "prompt" half that is not scored
    rejected["loss_mask"][:, : seq_len // 3] = 0.0
    return {"chosen": chosen, "rejected": rejected}


def _dpo_like_loss(graphdef, ref_graphdef):
    """A pair loss that reads a frozen reference: −log σ(β·(Δ policy − Δ reference)) summed, count = pairs."""
    def logps(model, b):
        logits = model(b["inputs"], b["positions"], b["segment_ids"])
        out = losses.cross_entropy(logits, b["targets"], b["loss_mask"])
        return losses.sequence_logprobs(out.target_logprobs, b["loss_mask"])

    def loss_fn(params, batch, rng, frozen):
        policy, ref = nnx.merge(graphdef, params), nnx.merge(ref_graphdef, frozen["reference"])
        out = losses.dpo_loss(logps(policy, batch["chosen"]), logps(policy, batch["rejected"]),
                              logps(ref, batch["chosen"]), logps(ref, batch["rejected"]), beta=0.5)
        return out.sum, {"count": out.count, "accuracy_sum": out.accuracy_sum}

    return loss_fn


@pytest.fixture(scope="module")
def frozen_setup():
    config = default.get_config("tiny")
    mesh = shd.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices())
    opt, sched = make_optimizer(config.optimizer, 10)
    setup = train.plan_state(CFG, opt, mesh, config.mesh.rules, 0, frozen={"reference": CFG})
    state = train.init_state(CFG, opt, setup, 0)
    reference = {"reference": train.init_frozen(setup, "reference", 0)}  # the same seed: policy == reference
    loss_fn = _dpo_like_loss(setup.graphdef, setup.frozen_graphdefs["reference"])
    steps = {k: train.jit_train_step(train.make_train_step(loss_fn, opt, sched, k), setup) for k in (1, 2)}
    return setup, state, reference, steps


def test_a_frozen_reference_is_sharded_read_and_left_bit_identical(frozen_setup, markov):
    setup, state, reference, steps = frozen_setup
    before = jax.tree.map(np.asarray, reference)
    assert jax.tree.map(lambda a: a.sharding, reference) == setup.frozen_shardings
    state = jax.tree.map(jnp.copy, state)  # the step donates its state argument
    batch = train.global_batch(_pair(markov, 0), setup.mesh)
    for i in range(3):
        state, m = steps[1](state, batch, reference)
        if i == 0:  # policy == reference: every log-ratio is 0, the loss ln 2
            np.testing.assert_allclose(float(m["loss"]), np.log(2), rtol=1e-6)
    assert float(m["loss"]) < np.log(2) - 1e-3  # the policy moved towards the chosen answers
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, reference), before)  # never donated


def test_preference_pairs_split_into_micro_batches_give_the_whole_batch_gradient(frozen_setup, markov):
    setup, state, reference, steps = frozen_setup
    batch = train.global_batch(_pair(markov, 40), setup.mesh)
    outs = [steps[k](jax.tree.map(jnp.copy, state), batch, reference) for k in (1, 2)]
    np.testing.assert_allclose(float(outs[1][1]["loss"]), float(outs[0][1]["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(outs[1][1]["grad_norm"]), float(outs[0][1]["grad_norm"]), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), outs[1][0].params, outs[0][0].params)


def test_the_memory_check_compiles_a_preference_step_with_its_frozen_model(frozen_setup):
    setup, _, _, steps = frozen_setup
    compiled = memory.compile_step(steps[1], setup, 8, 16, "preference")
    report = memory.analyze(compiled, setup, None)
    params = shd.per_device_bytes(setup.abstract_state.params, setup.state_shardings.params)
    assert report.params == 2 * params  # the trained parameters and the frozen reference's


def test_batch_contract_names_the_bad_field():
    good = contract.spec("preference", 2, 4)
    contract.check(good, "preference")
    bad = dict(good, rejected=dict(good["rejected"], loss_mask=np.zeros((2, 4), np.int32)))
    with pytest.raises(ValueError, match=r"batch\['rejected'\]\['loss_mask'\] has dtype int32, the contract says float32"):
        contract.check(bad, "preference")
    with pytest.raises(ValueError, match=r"missing fields \['positions'\]"):
        contract.check({k: v for k, v in good["chosen"].items() if k != "positions"}, "tokens")
    with pytest.raises(ValueError, match="batch kind must be one of"):
        contract.spec("pairs", 2, 4)


def test_heads_read_the_last_scored_token_and_every_position():
    mask = jnp.array([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], jnp.float32)
    np.testing.assert_array_equal(last_scored_index(mask), [2, 4, 0])
    model = RewardModel(CFG, rngs=nnx.Rngs(0))
    model.reward_head.w[...] = jnp.arange(CFG.d_model, dtype=jnp.float32) / CFG.d_model
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 16, (3, 5)), jnp.int32)
    pos, seg = jnp.tile(jnp.arange(5, dtype=jnp.int32), (3, 1)), jnp.ones((3, 5), jnp.int32)
    hidden = model.hidden_states(tokens, pos, seg)
    want = hidden[:, 4] @ model.reward_head.w[...]  # without targets: the last real token (segment ≠ 0)
    np.testing.assert_allclose(model.rewards(tokens, pos, seg, mask), want, rtol=1e-5)
    value = ValueModel(CFG, rngs=nnx.Rngs(0))
    logits, values = value.logits_and_values(tokens, pos, seg)
    assert values.shape == (3, 5) and not np.any(np.asarray(values))  # the head starts at 0
    np.testing.assert_allclose(logits, Transformer(CFG, rngs=nnx.Rngs(0))(tokens, pos, seg), rtol=1e-6)


def test_init_from_takes_the_matching_backbone_and_leaves_a_new_head_fresh(tmp_path):
    config = default.get_config("tiny")
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    opt, _ = make_optimizer(config.optimizer, 10)
    lm_state, lm_setup = train.create_state(CFG, opt, mesh, config.mesh.rules, 1)
    saver = ckpt.Checkpointer(str(tmp_path), keep=1, async_save=False)
    saver.save(5, lm_state, None)
    saver.close()
    make_rm = lambda rngs: RewardModel(CFG, rngs=rngs)  # noqa: E731
    rm_state, rm_setup = train.create_state(make_rm, opt, mesh, config.mesh.rules, 2)
    target = ckpt.abstract_with_shardings(rm_setup.abstract_state.params, rm_setup.state_shardings.params)
    params, fresh = init_params(str(tmp_path), target, rm_state.params, log=lambda _: None)
    assert fresh == ["reward_head/b", "reward_head/w"]
    jax.tree.map(np.testing.assert_array_equal, {k: v for k, v in params.items() if k != "reward_head"},
                 jax.tree.map(np.asarray, lm_state.params))
    jax.tree.map(np.testing.assert_array_equal, params["reward_head"], rm_state.params["reward_head"])
    wider = ModelConfig(**{**CFG.__dict__, "mlp_dim": 128})
    _, wide_setup = train.create_state(wider, opt, mesh, config.mesh.rules, 3)
    wide = ckpt.abstract_with_shardings(wide_setup.abstract_state.params, wide_setup.state_shardings.params)
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"blocks/mlp/w_down: \(2, 64, 32\) in the checkpoint"):
        init_params(str(tmp_path), wide, None, log=lambda _: None)
