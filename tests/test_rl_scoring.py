"""RL scoring without a filter is the chunked log-prob computation (lm/objectives/_rl.py:
hidden_scores): its log-probs and entropy equal the explicit-logits path at the temperature, the
filtered path is unchanged, PPO's values come from the same hidden states, and the compiled score
step of GRPO and PPO (policy, old policy and reference passes) holds no float32 [B, T, V] (or
[B·T, V]) logits."""

import jax
import numpy as np
import pytest
from flax import nnx

import lm.data as D
from configs import grpo as grpo_config, ppo as ppo_config
from lm import objectives, train
from lm.model import ModelConfig, Transformer
from lm.model.heads import ValueModel
from lm.objectives import _rl, ppo
from lm.parallel import sharding as shd
from lm.train.optim import make_optimizer

TOK = D.ByteTokenizer()
MODEL = ModelConfig(vocab_size=TOK.vocab_size, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64,
                    scan_layers=False)
ROWS, SEQ_LEN, NEW = 8, 24, 8
PLAIN = {"temperature": np.float32(0.7), "top_k": np.int32(0), "top_p": np.float32(1.0), "min_p": np.float32(0.0)}
FILTERED = dict(PLAIN, top_p=np.float32(0.9))


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, TOK.vocab_size, (ROWS, SEQ_LEN + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": np.broadcast_to(np.arange(SEQ_LEN, dtype=np.int32), (ROWS, SEQ_LEN)),
            "segment_ids": np.ones((ROWS, SEQ_LEN), np.int32)}


@pytest.mark.parametrize("knobs", [PLAIN, FILTERED], ids=["plain", "top_p"])
def test_scores_equal_the_explicit_logits_path(knobs):
    graphdef, params = nnx.split(Transformer(MODEL, rngs=nnx.Rngs(1)))
    batch = _batch()
    lp, ent = jax.jit(lambda p, b: _rl.policy_forward(graphdef, p, b, knobs, 16))(params, batch)
    logits = nnx.merge(graphdef, params)(batch["inputs"], batch["positions"], batch["segment_ids"])
    ref_lp, ref_ent = _rl.token_scores(logits, batch["targets"], knobs)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(ref_lp), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), np.asarray(ref_ent), atol=1e-5)
    # PPO: the log-probs and the value head read the same hidden states
    vgraph, vparams = nnx.split(ValueModel(MODEL, rngs=nnx.Rngs(2)))
    plp, _, values = jax.jit(lambda p, b: ppo._forward(vgraph, p, b, knobs, 16))(vparams, batch)
    vlogits, ref_values = nnx.merge(vgraph, vparams).logits_and_values(batch["inputs"], batch["positions"],
                                                                        batch["segment_ids"])
    np.testing.assert_allclose(np.asarray(plp), np.asarray(_rl.token_scores(vlogits, batch["targets"], knobs)[0]),
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(values), np.asarray(ref_values), atol=1e-6)


def _logits_shapes(hlo: str) -> list[str]:
    v = TOK.vocab_size
    return [s for s in (f"f32[{ROWS},{SEQ_LEN},{v}]", f"f32[{ROWS * SEQ_LEN},{v}]") if s in hlo]


def test_explicit_path_would_show_in_the_hlo():
    """The search below can fail: the explicit-logits scorer's HLO holds the [B, T, V] logits."""
    graphdef, params = nnx.split(Transformer(MODEL, rngs=nnx.Rngs(1)))

    def explicit(p, b):
        logits = nnx.merge(graphdef, p)(b["inputs"], b["positions"], b["segment_ids"])
        return _rl.token_scores(logits, b["targets"], PLAIN)

    assert _logits_shapes(jax.jit(explicit).lower(params, _batch()).compile().as_text())


@pytest.mark.parametrize("name,get_config", [("grpo", grpo_config.get_config), ("ppo", ppo_config.get_config)])
def test_compiled_score_step_holds_no_logits(name, get_config):
    config = get_config()
    config.train.batch_size, config.train.seq_len = ROWS, SEQ_LEN
    config.rl.group_size, config.rl.max_new_tokens = 4, NEW
    config.loss.chunk_size = 16  # tokens per chunk: [16, V] logits at a time
    objective = objectives.get(name)
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    opt, _ = make_optimizer(config.optimizer, 10)
    frozen = objectives.frozen_models(objective, config, MODEL)
    setup = train.plan_state(objectives.make_model(objective, config, MODEL) or MODEL, opt, mesh, config.mesh.rules,
                             0, frozen={k: f.make_model for k, f in frozen.items()})
    score = objective.make_prepare_batch(config, setup, TOK).score

    def spec(shape, dtype, sharding=None):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    abstract = lambda tree, shardings: jax.tree.map(lambda x, s: spec(x.shape, x.dtype, s), tree, shardings)
    seq = {k: spec((ROWS, SEQ_LEN), np.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
    seq["loss_mask"] = spec((ROWS, SEQ_LEN), np.float32)
    out = {"tokens": spec((ROWS, NEW), np.int32), "lengths": spec((ROWS,), np.int32),
           "sample_logprobs": spec((ROWS, NEW), np.float32)}
    rows = spec((ROWS,), np.float32)
    hlo = score.lower(abstract(setup.abstract_state.params, setup.state_shardings.params), seq, out, rows, rows,
                      abstract(setup.abstract_frozen, setup.frozen_shardings)).compile().as_text()
    assert f"f32[16,{TOK.vocab_size}]" in hlo  # the [16, V] chunks are there
    assert not _logits_shapes(hlo), f"{name}'s score step builds logits {_logits_shapes(hlo)}"
