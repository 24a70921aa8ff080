"""SimPO and ORPO as objectives: configs/simpo.py and configs/orpo.py load, and their loss on a pair
batch is lm.losses' loss of the model's own answer log-probabilities (no frozen model)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lm.data as D
from configs import orpo as orpo_config
from configs import simpo as simpo_config
from lm import losses, objectives
from lm.cli.train import build_model_config
from lm.model import Transformer


@pytest.mark.parametrize("name, module", [("simpo", simpo_config), ("orpo", orpo_config)])
def test_no_reference_objectives_compute_their_loss(name, module):
    config = module.get_config("tiny")
    objective = objectives.get(name)
    assert objectives.frozen_models(objective, config, None) == {} and objectives.batch_kind(objective) == "preference"
    tok = D.ByteTokenizer()
    model = Transformer(build_model_config(config, tok.vocab_size), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    batch = next(iter(D.build_iterator(config.data, split="valid", batch_size=8, seq_len=config.train.seq_len,
                                       seed=0)))
    obj, sums = jax.jit(objective.make_loss_fn(config, graphdef))(params, batch, None, {})

    def answer(side):
        b = batch[side]
        logits = model(b["inputs"], b["positions"], b["segment_ids"])
        lp = losses.cross_entropy(logits, b["targets"], b["loss_mask"]).target_logprobs
        return losses.sequence_logprobs(lp, b["loss_mask"]), jnp.sum(b["loss_mask"], axis=-1)

    (pc, nc), (pr, nr) = answer("chosen"), answer("rejected")
    if name == "simpo":
        want = losses.simpo_loss(pc, pr, nc, nr, beta=config.simpo.beta, gamma=config.simpo.gamma)
    else:
        want = losses.orpo_loss(pc, pr, nc, nr, lam=config.orpo.lam)
    np.testing.assert_allclose(obj, want.sum, rtol=1e-5)
    assert sums["count"] == 8 and np.isfinite(float(obj))
