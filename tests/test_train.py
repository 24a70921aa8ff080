"""The train step: learning, gradient accumulation, non-finite steps, weight decay, meshes."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import default
from conftest import markov_batch
from lm.parallel import sharding as shd
from lm import train
from lm.model import ModelConfig
from lm.objectives import pretrain
from lm.train.optim import clip_by_global_norm, make_optimizer, weight_decay_mask

CFG = ModelConfig(vocab_size=16, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)


def _config(**train_overrides):
    c = default.get_config("tiny")
    c.optimizer.warmup_steps = 2
    c.optimizer.lr = 1e-2
    for k, v in train_overrides.items():
        c.train[k] = v
    return c


def _setup(config, devices, mesh_sizes=None):
    mesh = shd.make_mesh(mesh_sizes or {"data": -1, "fsdp": 1, "tensor": 1}, devices)
    opt, sched = make_optimizer(config.optimizer, config.train.steps)
    state, setup = train.create_state(CFG, opt, mesh, config.mesh.rules, config.seed)
    loss_fn = pretrain.make_loss_fn(config, setup.graphdef)
    step = train.jit_train_step(train.make_train_step(loss_fn, opt, sched, config.train.micro_batches), setup)
    return state, setup, step


def test_a_few_steps_lower_the_loss(markov):
    config = _config(steps=30)
    state, setup, step = _setup(config, jax.devices()[:1])
    losses = []
    for i in range(30):
        state, m = step(state, train.global_batch(markov_batch(markov, 8 * i, 8, 32), setup.mesh))
        losses.append(float(m["loss"]))
    assert np.mean(losses[-5:]) < losses[0] - 0.3, losses
    assert int(state.step) == 30


def _uneven_batch(markov):
    batch = markov_batch(markov, 0, 8, 16)
    rng = np.random.default_rng(0)
    mask = (rng.random((8, 16)) < np.linspace(0.05, 1.0, 8)[:, None]).astype(np.float32)
    mask[3] = 0.0  # a row with nothing to score
    batch["loss_mask"] = mask
    return batch


@pytest.mark.parametrize("k", [2, 4, 8])
def test_micro_batches_give_the_whole_batch_update(markov, k):
    batch = _uneven_batch(markov)
    s1, setup1, step1 = _setup(_config(micro_batches=1), jax.devices()[:1])
    sk, setupk, stepk = _setup(_config(micro_batches=k), jax.devices()[:1])
    s1, m1 = step1(s1, train.global_batch(batch, setup1.mesh))
    sk, mk = stepk(sk, train.global_batch(batch, setupk.mesh))
    np.testing.assert_allclose(m1["loss"], mk["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], mk["grad_norm"], rtol=1e-5)
    assert float(m1["tokens"]) == float(mk["tokens"]) == batch["loss_mask"].sum()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), s1.params, sk.params)


def test_non_finite_step_is_skipped_and_counted(markov):
    state, setup, step = _setup(_config(), jax.devices()[:1])
    state, _ = step(state, train.global_batch(markov_batch(markov, 8, 4, 16), setup.mesh))  # moments ≠ 0
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    batch = markov_batch(markov, 0, 4, 16)
    batch["loss_mask"] = batch["loss_mask"] * np.float32(np.nan)
    state, m = step(state, train.global_batch(batch, setup.mesh))
    assert int(m["skipped"]) == 1 and int(state.bad_steps) == 1 and int(state.step) == 2
    # params and moments untouched; the optimizer's step counts advance with state.step (issue 28:
    # the schedule, the logged step and optax agree after a skipped step)
    def unchanged_or_counted(new, old):
        if np.issubdtype(np.asarray(new).dtype, np.integer):
            assert int(new) == int(state.step), (new, state.step)
        else:
            np.testing.assert_array_equal(new, old)
    jax.tree.map(unchanged_or_counted, (state.params, state.opt_state), before)
    state, m = step(state, train.global_batch(markov_batch(markov, 4, 4, 16), setup.mesh))
    assert int(m["skipped"]) == 0 and int(state.bad_steps) == 0


def test_the_step_updates_the_donated_state_without_copying_it(markov):
    """No entry parameter of the compiled step (params, optimizer moments) is copied before use:
    a select of new against old state once made XLA copy every optimizer moment each step."""
    state, setup, step = _setup(_config(), jax.devices()[:1])
    hlo = step.lower(state, train.global_batch(markov_batch(markov, 0, 4, 16), setup.mesh)).compile().as_text()
    entry = hlo[hlo.index("\nENTRY"):]
    params = set(re.findall(r"%(\S+) = f32\[[\d,]+\]\S* parameter\(", entry))
    copied = [x for x in re.findall(r" copy\(%([^)]+)\)", entry) if x in params]
    assert len(params) >= len(jax.tree.leaves(state.params)) and not copied, copied


def test_empty_mask_gives_zero_loss_and_zero_gradient(markov):
    state, setup, step = _setup(_config(), jax.devices()[:1])
    batch = markov_batch(markov, 0, 4, 16)
    batch["loss_mask"] = np.zeros_like(batch["loss_mask"])
    state, m = step(state, train.global_batch(batch, setup.mesh))
    assert float(m["loss"]) == 0.0 and float(m["grad_norm"]) == 0.0 and int(m["skipped"]) == 0


def test_weight_decay_skips_norm_scales():
    params = {"embed": jnp.ones((4, 3)), "final_norm": {"scale": jnp.ones(3)},
              "blocks": {"attn_norm": {"scale": jnp.ones((2, 3))}, "mlp": {"w_up": jnp.ones((2, 3, 5))}}}
    mask = weight_decay_mask(params, decay_norms_and_biases=False)
    assert mask == {"embed": True, "final_norm": {"scale": False},
                    "blocks": {"attn_norm": {"scale": False}, "mlp": {"w_up": True}}}
    assert all(jax.tree.leaves(weight_decay_mask(params, decay_norms_and_biases=True)))


@pytest.mark.parametrize("max_norm", [0.5, 5.0, 13.0])
def test_clipping_scales_to_the_max_norm_like_optax(max_norm):
    # global norm of the tree below: sqrt(9 + 16 + 144) = 13
    grads = {"a": jnp.asarray([3.0, 4.0]), "b": {"c": jnp.asarray([[12.0]])}}
    clip = clip_by_global_norm(max_norm)
    clipped, state = clip.update(grads, clip.init(grads))
    reference, ref_state = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    assert state == ref_state  # checkpoints of either optimizer restore into the other
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), clipped, reference)
    norm = float(optax.tree.norm(clipped))
    assert norm == pytest.approx(min(13.0, max_norm), rel=1e-6)
    if max_norm >= 13.0:  # at or below the threshold: the gradient exactly as it was
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), clipped, grads)


MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (2, 4, 1)]


@pytest.fixture(scope="module")
def one_device_run(markov):
    return _three_steps(markov, jax.devices()[:1], None)


def _three_steps(markov, devices, sizes):
    config = _config()
    if sizes and sizes["tensor"] > CFG.num_kv_heads:  # 8-way tensor parallelism: 4 heads cannot split 8 ways
        config.mesh.rules.heads = config.mesh.rules.kv_heads = None  # (an error otherwise, test_sharding.py)
    state, setup, step = _setup(config, devices, sizes)
    losses = []
    for i in range(3):
        state, m = step(state, train.global_batch(markov_batch(markov, 8 * i, 8, 16), setup.mesh))
        losses.append(float(m["loss"]))
    return losses, state, setup


@pytest.mark.parametrize("sizes", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_meshes_match_one_device(markov, one_device_run, sizes):
    mesh_sizes = dict(zip(shd.MESH_AXES, sizes))
    losses, state, setup = _three_steps(markov, jax.devices(), mesh_sizes)
    ref_losses, ref_state, _ = one_device_run
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), state.params, ref_state.params)
    # shardings are what the rules say: e.g. the MLP width over `tensor`, the embed dim over `fsdp`
    w_up = state.params["blocks"]["mlp"]["w_up"]  # [L, D, F] = (layers, embed, mlp)
    assert w_up.sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp" if sizes[1] > 1 else None, "tensor" if sizes[2] > 1 else None)
    mu = state.opt_state[1][0].mu["blocks"]["mlp"]["w_up"]
    assert mu.sharding.spec == w_up.sharding.spec


def test_mesh_errors_are_clear():
    with pytest.raises(ValueError, match="needs 4 devices"):
        shd.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="at most one axis"):
        shd.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        shd.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
    assert shd.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)


def test_optimizer_rejects_impossible_values():
    c = ml_collections.ConfigDict(default.get_config().optimizer.to_dict())
    c.lr = -1.0
    with pytest.raises(ValueError, match="optimizer.lr"):
        make_optimizer(c, 10)
