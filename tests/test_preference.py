"""Preference learning: pair data (JSONL with TRL's fields, the Markov benchmark), the reward and
DPO objectives, and tiny end-to-end runs. Tiny models, compiled once per module."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import dpo as dpo_config
from configs.data import data_config
from configs import reward as reward_config
from lm import data as D
from lm import losses, train
from lm.data import batch as contract
from lm.data import chat
from lm.data.tokenizer import ByteTokenizer
from lm.model import ModelConfig, RewardModel, Transformer
from lm.objectives import dpo, reward
from lm.parallel import sharding as shd
from lm.train.optim import make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = ByteTokenizer()
CFG = ModelConfig(vocab_size=TOK.vocab_size, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=32,
                  scan_layers=False, attention_block=0)


# -- JSONL pairs ------------------------------------------------------------------------------------


def jsonl_config(path, **fields):
    cfg = data_config()
    cfg.source, cfg.num_valid_batches = "preference_jsonl", 2
    cfg.preference_jsonl.train_files = cfg.preference_jsonl.valid_files = str(path)
    for key, value in fields.items():
        cfg.preference_jsonl[key] = value
    return cfg


def write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def rows_of(batch, side):
    """Per row: (token ids, scored target ids) of one side of a pair batch."""
    b = batch[side]
    out = []
    for i in range(b["inputs"].shape[0]):
        n = int((b["segment_ids"][i] > 0).sum())
        tokens = list(b["inputs"][i, :n]) + [int(b["targets"][i, n - 1])] if n else []
        out.append((tokens, [int(t) for t, w in zip(b["targets"][i], b["loss_mask"][i]) if w > 0]))
    return out


TEXT = {"prompt": "Sky?", "chosen": "blue", "rejected": "green"}
CONV = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky?"}],
        "chosen": [{"role": "assistant", "content": "blue"}],
        "rejected": [{"role": "assistant", "content": "green"}]}
IMPLICIT = {"chosen": CONV["prompt"] + CONV["chosen"], "rejected": CONV["prompt"] + CONV["rejected"]}


@pytest.mark.parametrize("row", [CONV, IMPLICIT], ids=["conversational", "implicit_prompt"])
def test_chat_pairs_render_with_the_template_and_score_only_the_answer(tmp_path, row):
    cfg = jsonl_config(write(tmp_path / "p.jsonl", [row]))
    batch = next(iter(D.build_iterator(cfg, split="valid", batch_size=1, seq_len=48, seed=0)))
    for side, answer in (("chosen", "blue"), ("rejected", "green")):
        tokens, scored = rows_of(batch, side)[0]
        expected = chat.render_chat(CONV["prompt"] + CONV[side], TOK)[0].tolist()
        assert tokens == expected
        assert scored == TOK.encode(answer) + [TOK.end_of_turn_id]  # assistant-only: answer + its end-of-turn
        assert batch[side]["segment_ids"][0, len(tokens) - 1:].max() == 0  # right-padded


def test_text_pairs_chat_and_plain_formats(tmp_path):
    path = write(tmp_path / "p.jsonl", [TEXT])
    batch = next(iter(D.build_iterator(jsonl_config(path), split="valid", batch_size=1, seq_len=32, seed=0)))
    tokens, scored = rows_of(batch, "chosen")[0]
    assert tokens == chat.render_chat([("user", "Sky?"), ("assistant", "blue")], TOK)[0].tolist()
    assert scored == TOK.encode("blue") + [TOK.end_of_turn_id]
    plain = jsonl_config(path, text_format="plain")
    batch = next(iter(D.build_iterator(plain, split="valid", batch_size=1, seq_len=32, seed=0)))
    tokens, scored = rows_of(batch, "rejected")[0]
    assert tokens == [TOK.bos_id] + TOK.encode("Sky?green") + [TOK.eos_id]
    assert scored == TOK.encode("green") + [TOK.eos_id]


BAD = {
    "missing_field": ({"prompt": "a", "chosen": "b"}, "no 'rejected' field"),
    "empty_document": ({"prompt": "a", "chosen": "", "rejected": "c"}, "'chosen' is empty"),
    "identical_answers": ({"prompt": "a", "chosen": "same", "rejected": "same"}, "same answer"),
    "conversation_too_long": ({"prompt": "a", "chosen": "x" * 80, "rejected": "c"}, "do not fit a row"),
    "malformed_json": ('{"prompt": "a", "chosen"', "column"),
    "wrong_type": ({"prompt": "a", "chosen": 3, "rejected": "c"}, "must be a string"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_pair_raises_naming_file_line_or_is_skipped_and_counted(tmp_path, kind):
    bad, detail = BAD[kind]
    path = write(tmp_path / "p.jsonl", [TEXT, bad, TEXT])
    cfg = jsonl_config(path)
    with pytest.raises(D.DataError, match=f"{path}:2: {kind}: .*{detail}"):
        list(D.build_iterator(cfg, split="valid", batch_size=2, seq_len=32, seed=0))
    cfg.on_error = "skip"
    valid = D.build_iterator(cfg, split="valid", batch_size=2, seq_len=32, seed=0)
    batches = list(valid)
    assert valid.error_counts()[kind] == 1 and sum(valid.error_counts().values()) == 1
    assert sum(int((b["chosen"]["segment_ids"].max(axis=1) > 0).sum()) for b in batches) == 2  # both good kept


def test_train_pairs_resume_exactly_and_shard_disjointly():
    cfg = reward_config.get_config("tiny").data
    it = D.build_iterator(cfg, split="train", batch_size=4, seq_len=12, seed=3)
    next(it)
    state = it.get_state()
    after = [next(it) for _ in range(3)]
    it.set_state(state)
    again = [next(it) for _ in range(3)]
    for a, b in zip(after, again):
        jax.tree.map(np.testing.assert_array_equal, a, b)
    shards = [next(D.build_iterator(cfg, split="train", batch_size=32, seq_len=12, seed=3, process_index=i,
                                    process_count=2)) for i in range(2)]
    rows = [set(map(bytes, s["chosen"]["inputs"])) for s in shards]
    assert not rows[0] & rows[1]


# -- objectives -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair_batch():
    cfg = reward_config.get_config("tiny").data
    return next(iter(D.build_iterator(cfg, split="valid", batch_size=8, seq_len=12, seed=0)))


def test_reward_loss_is_bradley_terry_of_the_models_rewards(pair_batch):
    model = RewardModel(CFG, rngs=nnx.Rngs(0))
    model.reward_head.w[...] = jax.random.normal(jax.random.key(1), (CFG.d_model,))  # not all 0
    graphdef, params = nnx.split(model, nnx.Param)
    config = reward_config.get_config("tiny")
    config.reward.center_rewards = 0.1
    obj, sums = jax.jit(reward.make_loss_fn(config, graphdef))(params, pair_batch, None, {})
    rewards = jax.jit(lambda b: model.rewards(b["inputs"], b["positions"], b["segment_ids"], b["loss_mask"],
                                              b["targets"]))  # the final token is a target only
    r_c, r_r = rewards(pair_batch["chosen"]), rewards(pair_batch["rejected"])
    ref = losses.bradley_terry_loss(r_c, r_r)
    np.testing.assert_allclose(obj, ref.sum + 0.1 * jnp.sum((r_c + r_r) ** 2), rtol=1e-5)
    assert sums["count"] == 8 and sums["correct_sum"] == ref.accuracy_sum == jnp.sum(r_c > r_r)


def test_dpo_step0_is_ln2_and_split_invariant(pair_batch):
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    config = dpo_config.get_config("tiny")
    loss_fn = dpo.make_loss_fn(config, graphdef)
    frozen = {"reference": params}
    grad = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, None, frozen), has_aux=True))
    (obj, sums), _ = grad(params, pair_batch)
    assert math.isclose(float(obj / sums["count"]), math.log(2), rel_tol=1e-6)  # π = π_ref: every ρ is 0
    # a policy ≠ reference: the loss and gradient of the whole batch equal the sums over two halves
    moved = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)
    (whole_obj, _), whole = grad(moved, pair_batch)
    halves = [grad(moved, jax.tree.map(lambda x: x[i::2], pair_batch)) for i in range(2)]
    split = jax.tree.map(jnp.add, halves[0][1], halves[1][1])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), whole, split)
    total = sum(float(h[0][0]) for h in halves)
    assert math.isclose(total, float(whole_obj), rel_tol=1e-5) and total / 8 != pytest.approx(math.log(2))


def test_dpo_against_the_datas_reference_uses_the_chains_own_logprobs():
    """dpo.reference='data': each answer token carries log P(x_t | state) of the true chain, and the
    loss is dpo_loss with those summed as the reference log-probabilities."""
    config = dpo_config.get_config("tiny")
    config.dpo.reference, config.data.markov_preference.ref_logprobs = "data", True
    source = D.build_source(config.data, split="valid", seq_len=12, seed=0, tokenizer=TOK)
    batch = next(iter(D.build_iterator(config.data, split="valid", batch_size=8, seq_len=12, seed=0)))
    contract.check({k: v for k, v in batch.items() if k != "_errors"}, "preference_ref")
    p = config.data.markov_preference.prompt_len
    for side, answers in (("chosen", source.pairs.chosen), ("rejected", source.pairs.rejected)):
        want = source.bench.token_logprobs(answers[:8], source.start_states[:8])
        got = batch[side]["ref_logprobs"][:, p - 1:p - 1 + want.shape[1]]  # aligned with targets
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert np.all(batch[side]["ref_logprobs"][batch[side]["loss_mask"] == 0] == 0)
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    assert dpo.frozen_models(config, CFG) == {} and dpo.batch_kind(config) == "preference_ref"
    obj, sums = jax.jit(dpo.make_loss_fn(config, graphdef))(params, batch, None, {})
    pol_c, pol_r, _ = dpo.answer_logprobs(model, batch)
    ref_c, ref_r = (losses.sequence_logprobs(batch[s]["ref_logprobs"], batch[s]["loss_mask"]) for s in ("chosen", "rejected"))
    want = losses.dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=config.dpo.beta)
    np.testing.assert_allclose(obj, want.sum, rtol=1e-5)
    assert float(sums["count"]) == 8


def test_dpo_training_moves_the_policy_and_never_the_reference(pair_batch):
    """Three train steps on one device: the first loss is ln 2 (π = π_ref), the policy moves, and the
    frozen reference stays bit-identical."""
    config = dpo_config.get_config("tiny")
    optimizer, schedule = make_optimizer(config.optimizer, 3)
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    setup = train.plan_state(CFG, optimizer, mesh, config.mesh.rules, 0, frozen={"reference": CFG})
    state = train.init_state(CFG, optimizer, setup, 0)
    frozen = {"reference": train.init_frozen(setup, "reference", 0)}  # the policy's own initialization
    before = jax.tree.map(np.array, frozen)
    start = jax.tree.map(np.array, state.params)
    step = train.jit_train_step(train.make_train_step(dpo.make_loss_fn(config, setup.graphdef), optimizer, schedule),
                                setup)
    batch = train.global_batch(pair_batch, mesh)
    for i in range(3):
        state, metrics = step(state, batch, *train.frozen_args(setup, frozen))
        if i == 0:
            assert float(metrics["loss"]) == pytest.approx(math.log(2), rel=1e-6)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, frozen), before)
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), state.params, start)
    assert max(jax.tree.leaves(moved)) > 0 and float(metrics["loss"]) < math.log(2)


# -- end to end -------------------------------------------------------------------------------------


def test_tiny_reward_and_dpo_runs_end_to_end(tmp_path):
    """`python -m lm.cli.train --config=configs/{reward,dpo}.py:tiny` (run side by side) write the new keys."""
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    procs = {name: subprocess.Popen([sys.executable, "-m", "lm.cli.train", f"--config=configs/{name}.py:tiny",
                                     f"--workdir={tmp_path / name}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name in ("reward", "dpo")}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {err[-3000:]}"
    summary = json.load(open(tmp_path / "dpo" / "summary.json"))
    for key in ("optimal_objective", "policy_objective", "reference_objective", "fraction_of_optimal_gain"):
        assert math.isfinite(summary[key]), key
    assert summary["optimal_objective"] > summary["chain_objective"]  # π* beats the chain itself
    summary = json.load(open(tmp_path / "reward" / "summary.json"))
    assert 0 <= summary["pairwise_accuracy"] <= 1 and summary["pairwise_accuracy_n"] == 32
    assert 0.5 < summary["bayes_pairwise_accuracy"] < 1
