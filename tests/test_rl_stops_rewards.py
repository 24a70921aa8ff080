"""Rollouts stop at every stop id, and nothing after it is scored; the reward model reads the last
real token (training, RL and evaluation alike); a skipped non-finite step keeps the step counters
together."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lm.model import ModelConfig, RewardModel, Transformer
from lm.sampling.rollout import COMPILER_OPTIONS, left_padded, rollout, sequences, stop_array, stop_ids_of
from lm.train import TrainState, make_train_step

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64)


class _ImportedTokenizer:
    """What lm.data.hf_tokenizer gives for a model whose generation_config lists several eos ids."""
    stop_ids = (5, 9, 11)
    end_of_turn_id = 5
    eos_id = 5


def test_every_stop_id_ends_a_rollout_and_nothing_after_it_is_scored():
    assert stop_ids_of(_ImportedTokenizer()) == (5, 9, 11)
    stops = tuple(range(2, 64, 6))  # 11 ids, frequent enough to hit in 10 tokens
    stop = stop_array(stops)
    assert stop.shape == (12,) and stop[11] == -1
    graphdef, params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))
    batch, prompt_len, new = 16, 4, 10
    prompt = left_padded(jnp.full((batch, prompt_len), 7, jnp.int32), jnp.full((batch,), prompt_len, jnp.int32))
    knobs = {"temperature": np.float32(1.5), "top_k": np.int32(0), "top_p": np.float32(1), "min_p": np.float32(0)}

    @functools.partial(jax.jit, compiler_options=COMPILER_OPTIONS)
    def run(params, key):
        out = rollout(graphdef, params, prompt, key, knobs, stop, max_new_tokens=new)
        return out, sequences(prompt, out["tokens"])

    out, seq = run(params, jax.random.key(0))
    tokens, lengths = np.asarray(out["tokens"]), np.asarray(out["lengths"])
    stopped = 0
    for row, n in zip(tokens, lengths):
        generated = row[:n].tolist()
        assert all(t >= 0 for t in generated) and all(t == -1 for t in row[n:])
        assert not set(generated[:-1]) & set(stops)  # no stop id before the last token
        if n < new:
            assert generated[-1] in stops  # a row shorter than N ended at a stop id
            stopped += 1
    assert 0 < stopped < batch
    mask, segments = np.asarray(seq["loss_mask"]), np.asarray(seq["segment_ids"])
    for b, n in enumerate(lengths):  # scored: exactly the generated tokens, the stop included
        np.testing.assert_array_equal(np.nonzero(mask[b])[0], np.arange(prompt_len - 1, prompt_len - 1 + n))
        assert segments[b, prompt_len + n:].sum() == 0  # after the stop: padding (no reward reads it)
    for k in ("sample_logprobs", "policy_logprobs", "entropy"):
        assert out[k].shape == (batch, new) and np.all(np.asarray(out[k])[tokens < 0] == 0)


def _pair_rows(tokens, seq_len, answer_start):
    """The preference layout (lm/data/preference.py): inputs = tokens[:-1], targets = tokens[1:],
    scored on the answer, right-padded to seq_len."""
    n = len(tokens) - 1
    row = {"inputs": np.zeros(seq_len, np.int32), "targets": np.zeros(seq_len, np.int32),
           "positions": np.zeros(seq_len, np.int32), "segment_ids": np.zeros(seq_len, np.int32),
           "loss_mask": np.zeros(seq_len, np.float32)}
    row["inputs"][:n], row["targets"][:n] = tokens[:-1], tokens[1:]
    row["positions"][:n], row["segment_ids"][:n] = np.arange(n), 1
    row["loss_mask"][answer_start - 1:n] = 1.0
    return row


def test_the_reward_model_reads_the_last_real_token():
    model = RewardModel(CFG, rngs=nnx.Rngs(1))
    model.reward_head.w[...] = jax.random.normal(jax.random.key(2), (CFG.d_model,))
    a, b = [1, 5, 6, 7, 9], [1, 5, 6, 7, 10]  # differ only in the final token
    rewards = jax.jit(model.rewards)

    def score(seqs, seq_len):
        rows = [_pair_rows(np.array(s), seq_len, 3) for s in seqs]
        batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
        return np.asarray(rewards(batch["inputs"], batch["positions"], batch["segment_ids"], batch["loss_mask"],
                                  batch["targets"]))

    full = score([a, b], 4)                    # rows exactly full: the final token only as a target
    assert abs(full[0] - full[1]) > 1e-3
    np.testing.assert_allclose(score([a, b], 9), full, atol=1e-5)  # padding the batch more changes nothing
    # a rollout row (left-padded, inputs hold the whole sequence, no targets) gives the same rewards
    inputs = jnp.asarray([[0, 0] + a, [0, 0] + b], jnp.int32)
    segments = jnp.asarray([[0, 0, 1, 1, 1, 1, 1]] * 2, jnp.int32)
    positions = jnp.asarray([[0, 0, 0, 1, 2, 3, 4]] * 2, jnp.int32)
    rollout_rewards = model.rewards(inputs, positions, segments, jnp.zeros((2, 7)))
    np.testing.assert_allclose(rollout_rewards, full, atol=1e-5)


def test_a_skipped_step_keeps_the_step_counters_together():
    """An injected NaN batch: the update is skipped, and after it the optimizer's counts, the
    learning-rate schedule and the logged step all agree."""
    schedule = optax.linear_schedule(1.0, 0.0, 10)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule))
    params = {"w": jnp.ones((3,))}

    def loss_fn(p, batch, rng, frozen):
        return jnp.sum(batch["x"] * p["w"] ** 2), {"count": jnp.float32(1.0)}

    step = jax.jit(make_train_step(loss_fn, optimizer, schedule))
    state = TrainState(jnp.int32(0), params, optimizer.init(params), jax.random.key_data(jax.random.key(0)),
                       jnp.int32(0))
    batches = [jnp.ones(3), jnp.full(3, jnp.nan), jnp.ones(3)]
    for i, x in enumerate(batches):
        before = state.params["w"]
        state, metrics = step(state, {"x": x})
        assert int(metrics["skipped"]) == (i == 1)
        np.testing.assert_allclose(float(metrics["learning_rate"]), float(schedule(i)))
        counts = [int(c) for path, c in jax.tree_util.tree_leaves_with_path(state.opt_state)
                  if getattr(path[-1], "name", None) == "count"]
        assert counts and all(c == int(state.step) == i + 1 for c in counts), counts
        if i == 1:
            np.testing.assert_array_equal(state.params["w"], before)  # the NaN step changed nothing else


def test_stacked_kv_cache_is_updated_in_place_and_decodes_the_same():
    """The compiled rollout over a stacked cache ([L, B, K, hd, S], scan over layers) holds no copy of
    the whole cache and builds it once (no per-step fresh buffer); it samples the same tokens as the
    per-layer layout."""
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=64,
                      scan_layers=True)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    batch, prompt_len, new = 4, 8, 12  # 20 slots ≠ head_dim 16: k and v caches of different shapes
    prompt = left_padded(jnp.full((batch, prompt_len), 7, jnp.int32), jnp.full((batch,), prompt_len, jnp.int32))
    knobs = {"temperature": np.float32(1.0), "top_k": np.int32(0), "top_p": np.float32(1), "min_p": np.float32(0)}

    def compiled(per_layer):
        return jax.jit(functools.partial(rollout, graphdef, max_new_tokens=new, per_layer=per_layer),
                       compiler_options=COMPILER_OPTIONS).lower(params, prompt, jax.random.key(0), knobs,
                                                                stop_array(())).compile()

    stacked = compiled(False)
    hd, slots = cfg.d_model // cfg.num_heads, prompt_len + new
    shapes = (f"[{cfg.num_layers},{batch},1,{hd},{slots}]", f"[{cfg.num_layers},{batch},1,{slots},{hd}]")
    whole = [line for line in stacked.as_text().splitlines()
             if any(s in line.split("=", 1)[-1][:60] for s in shapes) and (" copy(" in line or " broadcast(" in line)]
    assert not [line for line in whole if " copy(" in line], whole
    assert len([line for line in whole if " broadcast(" in line]) <= 2, whole  # the empty k and v caches, once
    a = stacked(params, prompt, jax.random.key(0), knobs, stop_array(()))
    b = compiled(True)(params, prompt, jax.random.key(0), knobs, stop_array(()))
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_allclose(a["sample_logprobs"], b["sample_logprobs"], atol=1e-5)
