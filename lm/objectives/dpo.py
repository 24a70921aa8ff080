"""Direct preference optimization (DPO) and its variants: the policy is trained on preference pairs
directly, against a frozen reference policy (seed documents' RLHF/DPO stage).

With ρ(y) = log π_θ(y | x) − log π_ref(y | x), the summed log-probabilities of an answer's scored
tokens (teacher forcing: lm.objectives._logprobs.token_logprobs, chunked, summed by
lm.losses.sequence_logprobs under the answer's loss mask), the loss is `lm.losses.dpo_loss`:

    sigmoid  −(1−ε)·log σ(β(ρ_c − ρ_r)) − ε·log σ(−β(ρ_c − ρ_r))     (ε = label_smoothing: cDPO)
    robust, hinge (SLiC), ipo, reference_free                         (lm/losses/preference.py)

summed over pairs, count = Σ w (w = 1 for a pair whose rows both score a token). Its minimizer,
with enough pairs labelled by Bradley–Terry with a reward r, is π* ∝ π_ref·exp(r/β): the optimum
of E_π[r] − β·KL(π‖π_ref).

The reference (config.dpo.reference):
  'model'  the frozen starting policy: `frozen_models` gives {'reference':
           FrozenModel(path=config.train.init_from)}, the same run whose parameters start the
           policy, so at step 0 π = π_ref, every ρ is 0 and the sigmoid loss is ln 2. Its
           log-probabilities are computed on the fly, in the same step, without gradient.
  'data'   log-probabilities precomputed by the data for every token (`ref_logprobs`, batch kind
           'preference_ref'): on the Markov benchmark, the true chain's, so that DPO's optimum is
           exactly the benchmark's π* ∝ chain·exp(r/β) and not the pretrained model's tilt.

Metrics: TRL's names: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins (means
of β·ρ); logps/chosen, logps/rejected (mean summed log π of the answers). After training, the
`markov_optimum` evaluator (lm/evals/markov_optimum.py) measures the policy's KL-regularized
objective on the Markov benchmark against the exact optimum.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lm import losses
from lm.objectives import _logprobs
from lm.losses.preference import DPO_LOSS_TYPES
from lm.objectives.reward import both_sides, pair_weights
from lm.train.state import FrozenModel

REFERENCES = ("model", "data")


def batch_kind(config: Any) -> str:
    return "preference_ref" if config.dpo.reference == "data" else "preference"


def frozen_models(config: Any, model_cfg) -> dict:
    """The reference policy: the starting model (train.init_from), frozen. With no init_from it is
    freshly initialized from config.seed, i.e. the same parameters the policy starts from. None
    when the reference log-probabilities come with the data or there is no reference."""
    if config.dpo.reference == "data" or config.dpo.loss_type == "reference_free":
        return {}
    return {"reference": FrozenModel(make_model=model_cfg, path=config.train.init_from)}


def answer_logprobs(model, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(Σ log π over chosen [B], over rejected [B], scored-token counts [2B]) in one [2B, T] pass
    (chunked token log-probs, lm/objectives/_logprobs.py: no [2B, T, V] logits)."""
    both = both_sides(batch)
    per_token = _logprobs.token_logprobs(model, both).logprobs
    logps = losses.sequence_logprobs(per_token, both["loss_mask"])
    b = batch["chosen"]["inputs"].shape[0]
    return logps[:b], logps[b:], jnp.sum(both["loss_mask"], axis=-1)


def make_loss_fn(config: Any, graphdef: Any):
    """loss_fn(params, batch, rng, frozen) -> (objective_sum, sums); frozen['reference'] are the
    reference policy's parameters (same structure as the policy's)."""
    dc = config.dpo
    if dc.loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"config.dpo.loss_type must be one of {DPO_LOSS_TYPES}, "
                         f"got {dc.loss_type!r}")
    if dc.reference not in REFERENCES:
        raise ValueError(f"config.dpo.reference must be one of {REFERENCES}, got {dc.reference!r}")
    if dc.reference == "data" and not (config.data.source == "markov_preference"
                                       and config.data.markov_preference.ref_logprobs):
        raise ValueError("config.dpo.reference='data' needs batches with reference log-probabilities: "
                         "data.source='markov_preference' with data.markov_preference.ref_logprobs=True")

    def loss_fn(params, batch, rng, frozen=None):
        del rng
        pol_c, pol_r, counts = answer_logprobs(nnx.merge(graphdef, params), batch)
        if dc.loss_type == "reference_free":
            ref_c = ref_r = None
        elif dc.reference == "data":
            ref_c, ref_r = (losses.sequence_logprobs(batch[side]["ref_logprobs"], batch[side]["loss_mask"])
                            for side in ("chosen", "rejected"))
        else:
            if not frozen or "reference" not in frozen:
                raise ValueError("the dpo objective needs the frozen reference policy (frozen['reference'])")
            reference = nnx.merge(graphdef, jax.lax.stop_gradient(frozen["reference"]))
            ref_c, ref_r, _ = answer_logprobs(reference, batch)
        b = pol_c.shape[0]
        weights = pair_weights(batch)
        out = losses.dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=dc.beta, loss_type=dc.loss_type,
                              label_smoothing=dc.label_smoothing, chosen_counts=counts[:b],
                              rejected_counts=counts[b:], weights=weights)
        return out.sum, pair_sums(out, weights, pol_c, pol_r)

    return loss_fn


def pair_sums(out: Any, weights: jax.Array, pol_c: jax.Array, pol_r: jax.Array) -> dict:
    """The sums a preference objective logs under TRL's names, from a DPOOutput-shaped `out` and the
    policy's answer log-probs of each side [B] (weighted like the loss; metrics, no gradient)."""
    stop = jax.lax.stop_gradient
    return {"count": out.count, "rewards/chosen_sum": out.chosen_rewards_sum,
            "rewards/rejected_sum": out.rejected_rewards_sum,
            "rewards/accuracies_sum": out.accuracy_sum, "rewards/margins_sum": out.margin_sum,
            "logps/chosen_sum": stop(jnp.sum(weights * pol_c)),
            "logps/rejected_sum": stop(jnp.sum(weights * pol_r))}
