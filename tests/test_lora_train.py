"""Training with LoRA (lm/train/lora.py): only adapters (and heads) are parameters, the optimizer
state grows with the rank, the base never changes, step 0 is the base model, and DPO's reference
is the base with adapters off (one copy of the weights)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from configs import dpo as dpo_config
from lm import train
from lm.model import ModelConfig, Transformer, lora
from lm.objectives import dpo, pretrain, reward
from lm.parallel import sharding as shd
from lm.train import lora as lora_train
from lm.train.optim import make_optimizer

CFG = ModelConfig(vocab_size=37, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
B, T = 8, 16  # 8 rows: one per virtual device (tests/conftest.py)


def config_of(rank=2, base_dtype="float32", objective="pretrain"):
    c = dpo_config.get_config() if objective == "dpo" else default.get_config("tiny")
    if objective == "dpo":
        c.dpo.reference = "model"  # the frozen reference policy (configs/dpo.py uses the data's)
    c.objective = objective
    c.mesh.data = -1
    c.lora.update(rank=rank, base_dtype=base_dtype, block_size=8, alpha=4.0)
    c.optimizer.update(lr=3e-2, warmup_steps=0, weight_decay=0.0)
    return c


def planned(config, make_loss, frozen=None, model=CFG):
    optimizer, schedule = make_optimizer(config.optimizer, 10)
    model, sources, make_loss, _ = lora_train.adapt(config, model, frozen or {}, make_loss, None)
    setup = train.plan_state(model, optimizer, shd.make_mesh(config.mesh), config.mesh.rules, 0,
                             frozen={n: f.make_model for n, f in sources.items()})
    return setup, model, optimizer, schedule, make_loss


def token_batch(seed=0):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
    return {"inputs": inputs, "targets": np.roll(inputs, -1, 1), "loss_mask": np.ones((B, T), np.float32),
            "segment_ids": np.ones((B, T), np.int32), "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1))}


def leaves(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_rank_zero_is_the_plain_model_and_the_optimizer_state_grows_with_the_rank():
    plain = leaves(nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Transformer(CFG, rngs=nnx.Rngs(0))))))
    setup0 = planned(config_of(rank=0), None)[0]
    assert {k: v.shape for k, v in leaves(setup0.abstract_state.params).items()} == \
        {k: v.shape for k, v in plain.items()} and not setup0.frozen_graphdefs
    # per layer and rank: q (32+32) + k, v (32+16 each) + o (32+32) + gate, up (32+64 each) + down (64+32)
    per_rank = CFG.num_layers * (64 + 48 + 48 + 64 + 96 + 96 + 96)
    for rank in (2, 4):
        setup = planned(config_of(rank=rank), None)[0]
        params = leaves(setup.abstract_state.params)
        assert all(lora.is_adapter((k,)) for k in params) and sum(v.size for v in params.values()) == rank * per_rank
        moments = sum(v.size for v in leaves(setup.abstract_state.opt_state).values() if v.ndim)
        assert moments == 2 * rank * per_rank  # Adam's two moments, of the adapters only
        base = leaves(setup.abstract_frozen[lora_train.BASE])
        assert set(base) == set(plain)  # the frozen base is the whole model, once


def test_reward_model_trains_adapters_and_its_head():
    setup = planned(config_of(objective="reward", base_dtype="bfloat16"), None, model=reward.make_model(None, CFG))[0]
    params = leaves(setup.abstract_state.params)
    names = set(params)
    assert all(v.dtype == jnp.float32 for v in params.values())  # trained in float32 over a bfloat16 base
    assert all(v.dtype == jnp.bfloat16 for v in leaves(setup.abstract_frozen[lora_train.BASE]).values())
    assert {"reward_head/w", "reward_head/b"} <= names and all(lora.is_adapter((n,)) or "head" in n for n in names)


def test_steps_train_only_the_adapters_from_the_base_outputs():
    """With adapter dropout (lora.dropout 0.3): step 0 is the base model bit for bit (in training too: at
    B = 0 the dropped path adds exactly 0), steps move only the adapters and lower the loss."""
    config = config_of(base_dtype="float32")
    config.lora.dropout = 0.3
    setup, model, optimizer, schedule, make_loss = planned(config, lambda g: pretrain.make_loss_fn(config, g))
    state = train.init_state(model, optimizer, setup, 0)
    frozen = {lora_train.BASE: train.init_frozen(setup, lora_train.BASE, 0)}
    before = jax.tree.map(np.array, frozen)
    loss_fn = make_loss(setup.graphdef)
    batch = jax.tree.map(jnp.asarray, token_batch())
    step0 = jax.jit(lambda p, f: loss_fn(p, batch, None, f)[0])(state.params, frozen)
    plain = Transformer(CFG, rngs=nnx.Rngs(0))  # step 0 is the base model, bit for bit
    want = jax.jit(lambda m: pretrain.token_loss(m, batch, config.loss).sum)(plain)
    assert float(step0) == float(want)
    check_dropout(config, make_loss(setup.graphdef), state.params, frozen, batch)
    step = train.jit_train_step(train.make_train_step(loss_fn, optimizer, schedule), setup)
    losses = []
    for i in range(3):
        state, metrics = step(state, batch, frozen)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.05 and math.isclose(losses[0] * B * T, float(step0), rel_tol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, frozen), before)  # the base: untouched
    b_norm = sum(float(jnp.sum(v ** 2)) for k, v in leaves(state.params).items() if k.endswith("_lora_b"))
    assert b_norm > 0


def check_dropout(config, loss_fn, params, frozen, batch):
    """PEFT's lora_dropout on the adapter inputs: with B ≠ 0 a train step's loss (a key) differs from the
    eval step's (rng None), which equals the dropout-0 loss bit for bit, as does the training loss at
    B = 0; the same key gives the same loss, another key another; with dropout 0 no key matters."""
    no_dropout = config.copy_and_resolve_references()
    no_dropout.lora.dropout = 0.0
    loss_0 = lora_train.adapt(no_dropout, CFG, {}, lambda g: pretrain.make_loss_fn(no_dropout, g), None)[2]
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: lora_train.AdaptedFactory(
        lambda rngs: Transformer(CFG, rngs=rngs), no_dropout.lora)(nnx.Rngs(0))))
    loss_0 = loss_0(graphdef)
    keys = iter(jax.random.split(jax.random.key(9), 64))
    moved = jax.tree_util.tree_map_with_path(  # B ≠ 0: the adapters do something
        lambda p, x: 0.2 * jax.random.normal(next(keys), x.shape) if str(p[-1].key).endswith("_b") else x, params)

    @jax.jit  # one program
    def losses(params, moved, frozen):
        k3, k4 = jax.random.key(3), jax.random.key(4)
        on = lambda p, key: loss_fn(p, batch, key, frozen)[0]  # noqa: E731
        off = lambda p, key: loss_0(p, batch, key, frozen)[0]  # noqa: E731
        return {"b0": on(params, k3), "train": on(moved, k3), "again": on(moved, k3), "other": on(moved, k4),
                "eval": on(moved, None), "off_b0": off(params, k3), "off_train": off(moved, k3),
                "off_eval": off(moved, None)}

    got = jax.tree.map(float, losses(params, moved, frozen))
    assert got["off_train"] == got["off_eval"] == got["eval"] and got["b0"] == got["off_b0"]
    assert got["train"] == got["again"] and got["train"] != got["other"] and abs(got["train"] - got["eval"]) > 1e-3


def preference_batch():
    chosen, rejected = token_batch(1), token_batch(2)
    for side in (chosen, rejected):
        side["loss_mask"][:, : T // 2] = 0.0
    rejected["inputs"][:, : T // 2] = chosen["inputs"][:, : T // 2]  # a shared prompt
    return jax.tree.map(jnp.asarray, {"chosen": chosen, "rejected": rejected})


def test_dpo_reference_is_the_base_with_adapters_off():
    config = config_of(objective="dpo")
    frozen_sources = dpo.frozen_models(config, CFG)
    assert "reference" in frozen_sources
    setup, model, optimizer, schedule, make_loss = planned(config, lambda g: dpo.make_loss_fn(config, g),
                                                           frozen=frozen_sources)
    assert set(setup.frozen_graphdefs) == {lora_train.BASE}  # no second copy of the weights
    state = train.init_state(model, optimizer, setup, 0)
    frozen = {lora_train.BASE: train.init_frozen(setup, lora_train.BASE, 0)}
    step = train.jit_train_step(train.make_train_step(make_loss(setup.graphdef), optimizer, schedule), setup)
    batch = preference_batch()
    state, first = step(state, batch, frozen)
    assert float(first["loss"]) == pytest.approx(math.log(2), abs=1e-6)  # π = π_ref at step 0
    for _ in range(2):
        state, metrics = step(state, batch, frozen)
    assert float(metrics["loss"]) < math.log(2) - 1e-3

    @jax.jit
    def logps(params, frozen):
        full, rest = lora_train.combine(params, frozen, reference=True)
        policy = dpo.answer_logprobs(nnx.merge(setup.graphdef, full), batch)
        ref = dpo.answer_logprobs(nnx.merge(setup.graphdef, rest["reference"]), batch)
        base = dpo.answer_logprobs(Transformer(CFG, rngs=nnx.Rngs(0)), batch)  # the plain model, same seed
        return policy, ref, base

    policy, ref, base = logps(state.params, frozen)
    np.testing.assert_array_equal(ref[0], base[0])
    np.testing.assert_array_equal(ref[1], base[1])
    assert float(jnp.max(jnp.abs(policy[0] - ref[0]))) > 1e-3



def test_a_lora_run_checkpoints_only_adapters_and_resumes(tmp_path):
    """The CLI path (lm.cli.train): the checkpoint holds the adapters and their optimizer state, not the
    base; running again with more steps resumes from it (the base rebuilt from its source, here the seed)."""
    from lm.cli.train import train_and_report
    from lm.io import checkpoint

    config = config_of(base_dtype="nf4")
    config.train.update(steps=2, batch_size=8, seq_len=32, log_every=1, eval_every=0, progress_bar=False)
    config.eval.evaluators, config.data.num_valid_batches = "", 1
    first = train_and_report(config, str(tmp_path))
    _, step, stored = checkpoint.stored_param_shapes(str(tmp_path))
    assert step == 2 and stored and all(lora.is_adapter((k,)) for k in stored)
    config.train.steps = 3
    again = train_and_report(config, str(tmp_path))
    assert checkpoint.stored_param_shapes(str(tmp_path))[1] == 3
    assert np.isfinite(again["train_loss"]) and np.isfinite(first["valid_loss"])


def test_adapters_and_the_quantized_base_shard_by_the_weights_rules():
    """On an FSDP mesh of 8: A [L, D, r] splits D like wq does, the NF4 codes and scales of the frozen
    base split their embed axis too; the rank axis is never split."""
    config = config_of(base_dtype="nf4")
    config.mesh.update(data=1, fsdp=8, tensor=1)
    setup = planned(config, None, model=ModelConfig(**{**CFG.__dict__, "d_model": 64, "mlp_dim": 128}))[0]
    spec = lambda tree, *path: tree["blocks"][path[0]][path[1]].spec if len(path) == 2 else \
        tree["blocks"][path[0]][path[1]][path[2]].spec  # noqa: E731
    params, base = setup.state_shardings.params, setup.frozen_shardings[lora_train.BASE]
    assert tuple(spec(params, "attn", "wq_lora_a")) == (None, "fsdp", None)
    assert tuple(spec(params, "mlp", "w_down_lora_b")) == (None, None, "fsdp")
    assert tuple(spec(base, "attn", "wq", "codes"))[:2] == (None, "fsdp")  # [L, D/2, H, hd] packed codes
    assert tuple(spec(base, "mlp", "w_gate", "scale_codes"))[:2] == (None, "fsdp")
