"""Pairwise preference losses: a Bradley–Terry reward-model loss, the DPO family, and SimPO and ORPO
(which need no reference model).

A preference pair is a prompt with a *chosen* response y_c and a *rejected* one y_r. The
Bradley–Terry model says ``P(y_c ≻ y_r) = σ(r(y_c) − r(y_r))``; its negative log-likelihood
trains a reward model. DPO (Rafailov et al. 2023) puts the implicit reward
``β·ρ(y) = β·(log π(y) − log π_ref(y))`` of the KL-regularized optimum into the same
likelihood, so the policy is trained directly on pairs.

Everything here is per pair, shapes ``[B]``; sequence log-probabilities are the sums over a
response's tokens (:func:`lm.losses.sequence_logprobs`). Like every loss in ``lm.losses`` the
results are float32 **sums** and a **count** (the total of the pair weights), divided once with
:func:`mean_of` after summing over micro-batches and devices. Weights never carry a gradient, and
a pair of weight 0 adds exactly 0 to every sum and to every gradient, even when its inputs are
inf or NaN. ``log σ`` is computed as ``jax.nn.log_sigmoid`` (stable for any argument).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lm.losses.sums import F32, mean_of, prepare_mask

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "reference_free")


class BradleyTerryOutput(NamedTuple):
    """Summed statistics of :func:`bradley_terry_loss` (all float32)."""
    sum: jax.Array             # []: Σ w·(−log σ(r_c − r_r − margin))
    count: jax.Array           # []: Σ w
    accuracy_sum: jax.Array    # []: Σ w·[r_c > r_r]  (strict; no gradient)
    margin_sum: jax.Array      # []: Σ w·(r_c − r_r)  (no gradient)
    per_pair_loss: jax.Array   # [B]: w·loss, exactly 0 where w = 0

    @property
    def mean(self):
        """sum / count, 0 when count is 0."""
        return mean_of(self.sum, self.count)

    @property
    def accuracy(self):
        return mean_of(self.accuracy_sum, self.count)


class DPOOutput(NamedTuple):
    """Summed statistics of :func:`dpo_loss` (all float32); ρ = log π − log π_ref."""
    sum: jax.Array                   # []: Σ w·loss
    count: jax.Array                 # []: Σ w
    chosen_rewards_sum: jax.Array    # []: Σ w·β·ρ_c         (no gradient)
    rejected_rewards_sum: jax.Array  # []: Σ w·β·ρ_r         (no gradient)
    accuracy_sum: jax.Array          # []: Σ w·[β·ρ_c > β·ρ_r] (strict; no gradient)
    margin_sum: jax.Array            # []: Σ w·β·(ρ_c − ρ_r)   (no gradient)
    per_pair_loss: jax.Array         # [B]: w·loss, exactly 0 where w = 0

    @property
    def mean(self):
        """sum / count, 0 when count is 0."""
        return mean_of(self.sum, self.count)

    def metrics(self) -> dict:
        """The TRL-named means; see :func:`dpo_metrics`."""
        return dpo_metrics(self)


def dpo_metrics(sums) -> dict:
    """TRL-named means from summed DPO statistics (a :class:`DPOOutput`, or any object with its
    fields, e.g. the field-wise total over micro-batches and devices)::

        rewards/chosen      Σ w·β·ρ_c / Σ w
        rewards/rejected    Σ w·β·ρ_r / Σ w
        rewards/accuracies  Σ w·[β·ρ_c > β·ρ_r] / Σ w
        rewards/margins     Σ w·β·(ρ_c − ρ_r) / Σ w

    Each is 0 when the count is 0.
    """
    return {
        "rewards/chosen": mean_of(sums.chosen_rewards_sum, sums.count),
        "rewards/rejected": mean_of(sums.rejected_rewards_sum, sums.count),
        "rewards/accuracies": mean_of(sums.accuracy_sum, sums.count),
        "rewards/margins": mean_of(sums.margin_sum, sums.count),
    }


def _pair_array(name, value, shape=None):
    value = jnp.asarray(value)
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise ValueError(f"{name} must be a float array, got dtype {value.dtype}")
    value = value.astype(F32)
    if value.ndim != 1 or (shape is not None and value.shape != shape):
        want = "[B]" if shape is None else f"{list(shape)} like the first input"
        raise ValueError(f"{name} must have shape {want}, got {value.shape}")
    return value


def _concrete(value):
    """A Python float for a concrete scalar, None for a traced one (not checked then)."""
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def _weighted(weights, keep, values):
    """Σ w·v over kept pairs (a masked v that is inf/NaN contributes 0)."""
    return jnp.sum(jnp.where(keep, values, 0.0) * weights)


def _pair_output(loss: jax.Array, weights: jax.Array, keep: jax.Array, reward_c: jax.Array,
                 reward_r: jax.Array) -> DPOOutput:
    """DPOOutput of per-pair `loss` [B] (0 where not `keep`, times `weights`) and the implicit rewards
    of each side [B], whose sums, accuracy and margin are metrics (no gradient)."""
    per_pair = jnp.where(keep, loss, 0.0) * weights
    stop = jax.lax.stop_gradient
    reward_c, reward_r = stop(reward_c), stop(reward_r)
    return DPOOutput(
        sum=jnp.sum(per_pair), count=jnp.sum(weights),
        chosen_rewards_sum=_weighted(weights, keep, reward_c),
        rejected_rewards_sum=_weighted(weights, keep, reward_r),
        accuracy_sum=_weighted(weights, keep, (reward_c > reward_r).astype(F32)),
        margin_sum=_weighted(weights, keep, reward_c - reward_r),
        per_pair_loss=per_pair)


def bradley_terry_loss(chosen_rewards, rejected_rewards, weights=None, margin=0.0) -> BradleyTerryOutput:
    """Bradley–Terry negative log-likelihood of a reward model on preference pairs.

    Per pair ``loss = −log σ(r_c − r_r − m)``: the reward model's probability that the chosen
    response wins, asked to win by at least the margin ``m`` (m = 0: plain Bradley–Terry;
    a per-pair m ``[B]`` as in Llama 2's rating-strength margins). The gradient with respect to
    ``r_c`` is ``−σ(−(r_c − r_r − m))``.

    Args:
      chosen_rewards, rejected_rewards: ``[B]`` scalar rewards, any float dtype.
      weights: ``[B]`` pair weights (default 1); no gradient.
      margin: scalar or ``[B]``.
    Returns a :class:`BradleyTerryOutput` of sums; ``accuracy_sum`` counts strict wins
    (a tie scores 0).
    """
    chosen = _pair_array("chosen_rewards", chosen_rewards)
    rejected = _pair_array("rejected_rewards", rejected_rewards, chosen.shape)
    weights = prepare_mask(weights, chosen.shape)
    keep = weights != 0
    diff = jnp.where(keep, chosen - rejected, 0.0)  # masked inf/NaN never reach the loss
    margin = jnp.broadcast_to(jnp.asarray(margin, F32), chosen.shape)
    per_pair = jnp.where(keep, -jax.nn.log_sigmoid(diff - margin), 0.0) * weights
    stop = jax.lax.stop_gradient
    return BradleyTerryOutput(
        sum=jnp.sum(per_pair), count=jnp.sum(weights),
        accuracy_sum=stop(_weighted(weights, keep, (chosen > rejected).astype(F32))),
        margin_sum=stop(_weighted(weights, keep, diff)),
        per_pair_loss=per_pair)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             beta, loss_type="sigmoid", label_smoothing=0.0, chosen_counts=None, rejected_counts=None,
             weights=None) -> DPOOutput:
    """Direct preference optimization and its variants, on summed sequence log-probabilities.

    With the log-ratios ``ρ_c = log π(y_c) − log π_ref(y_c)``, ``ρ_r`` likewise, ``h = ρ_c − ρ_r``,
    ε = ``label_smoothing`` and β applied exactly once, the per-pair loss is:

      sigmoid         −(1−ε)·log σ(βh) − ε·log σ(−βh)     (DPO; ε > 0: conservative DPO, which
                      treats each label as flipped with probability ε)
      robust          [−(1−ε)·log σ(βh) + ε·log σ(−βh)] / (1 − 2ε)   (Chowdhury et al. 2024: an
                      unbiased loss under label noise ε; requires ε < 1/2)
      hinge           max(0, 1 − βh)                        (SLiC)
      ipo             (h' − 1/(2β))²,  h' = ρ_c/n_c − ρ_r/n_r  (Azar et al.; log-ratios averaged
                      over the response token counts n, so ``chosen_counts`` and
                      ``rejected_counts`` are required; minimized at h' = 1/(2β))
      reference_free  the sigmoid loss with log π_ref = 0 (the ref arguments are ignored and
                      may be None)

    Args:
      policy_chosen_logps, policy_rejected_logps: ``[B]`` Σ_t log π(y_t | ·) of each response.
      ref_chosen_logps, ref_rejected_logps: ``[B]`` the same under the frozen reference model;
        they get no gradient here only if the caller stops it (they normally come from a
        model without gradient).
      beta: β > 0, the KL-regularization strength.
      chosen_counts, rejected_counts: ``[B]`` response token counts (ipo only). A kept pair
        with a count of 0 divides its log-ratio by 0: its loss is +inf (NaN only where that
        log-ratio is exactly 0 too), loudly, never a silent 0; give such a pair weight 0.
      weights: ``[B]`` pair weights (default 1); no gradient.
    Returns a :class:`DPOOutput`: the loss sum and count, and the implicit-reward sums (no
    gradient; β·ρ with the unnormalized ρ for every loss type) that :func:`dpo_metrics` turns
    into TRL's ``rewards/*`` metrics.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    beta_value, eps_value = _concrete(beta), _concrete(label_smoothing)
    if beta_value is not None and not beta_value > 0:
        raise ValueError(f"beta must be > 0, got {beta_value}")
    eps_limit = 0.5 if loss_type == "robust" else 1.0
    if eps_value is not None and not 0.0 <= eps_value < eps_limit:
        raise ValueError(f"label_smoothing must be in [0, {eps_limit}) for loss_type {loss_type!r}, "
                         f"got {eps_value}")
    pol_c = _pair_array("policy_chosen_logps", policy_chosen_logps)
    shape = pol_c.shape
    pol_r = _pair_array("policy_rejected_logps", policy_rejected_logps, shape)
    if loss_type == "reference_free":
        ref_c = ref_r = jnp.zeros(shape, F32)
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"loss_type {loss_type!r} needs ref_chosen_logps and ref_rejected_logps "
                             "(only 'reference_free' ignores them)")
        ref_c = _pair_array("ref_chosen_logps", ref_chosen_logps, shape)
        ref_r = _pair_array("ref_rejected_logps", ref_rejected_logps, shape)
    weights = prepare_mask(weights, shape)
    keep = weights != 0
    # Masked pairs become 0 before any nonlinearity: their inf/NaN cannot leak into gradients.
    rho_c = jnp.where(keep, pol_c - ref_c, 0.0)
    rho_r = jnp.where(keep, pol_r - ref_r, 0.0)
    beta = jnp.asarray(beta, F32)
    eps = jnp.asarray(label_smoothing, F32)
    logits = beta * (rho_c - rho_r)  # β·h: the only place β multiplies the log-ratios
    if loss_type in ("sigmoid", "reference_free"):
        loss = -(1.0 - eps) * jax.nn.log_sigmoid(logits) - eps * jax.nn.log_sigmoid(-logits)
    elif loss_type == "robust":
        loss = ((-(1.0 - eps) * jax.nn.log_sigmoid(logits) + eps * jax.nn.log_sigmoid(-logits))
                / (1.0 - 2.0 * eps))
    elif loss_type == "hinge":
        loss = jax.nn.relu(1.0 - logits)
    else:  # ipo
        if chosen_counts is None or rejected_counts is None:
            raise ValueError("loss_type 'ipo' needs chosen_counts and rejected_counts (response token "
                             "counts, [B]): IPO averages the log-ratios over tokens")
        n_c = jnp.where(keep, jnp.broadcast_to(jnp.asarray(chosen_counts, F32), shape), 1.0)
        n_r = jnp.where(keep, jnp.broadcast_to(jnp.asarray(rejected_counts, F32), shape), 1.0)
        loss = (rho_c / n_c - rho_r / n_r - 1.0 / (2.0 * beta)) ** 2
    return _pair_output(loss, weights, keep, beta * rho_c, beta * rho_r)


class ORPOOutput(NamedTuple):
    """Summed statistics of :func:`orpo_loss` (all float32)."""
    sum: jax.Array               # []: Σ w·(NLL + λ·(−log σ(log-odds ratio)))
    count: jax.Array             # []: Σ w
    nll_sum: jax.Array           # []: Σ w·NLL_c, the chosen answer's mean token NLL (no gradient)
    odds_loss_sum: jax.Array     # []: Σ w·(−log σ(log-odds ratio)) (no gradient)
    log_odds_sum: jax.Array      # []: Σ w·(log odds(y_c) − log odds(y_r)) (no gradient)
    accuracy_sum: jax.Array      # []: Σ w·[log-odds ratio > 0] (no gradient)
    per_pair_loss: jax.Array     # [B]: w·loss, exactly 0 where w = 0

    @property
    def mean(self):
        return mean_of(self.sum, self.count)


def _mean_logps(name, logps, counts, keep, shape):
    """Length-normalized log-probs Σ_t log π / n of kept pairs (1 where masked)."""
    if counts is None:
        raise ValueError(f"{name} needs the response token counts ([B]): the loss is length-normalized")
    n = jnp.broadcast_to(jnp.asarray(counts, F32), shape)
    return jnp.where(keep, logps / jnp.where(keep, n, 1.0), 0.0)


def simpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_counts, rejected_counts, *, beta, gamma=0.5,
               label_smoothing=0.0, weights=None) -> DPOOutput:
    """SimPO (Meng et al. 2024): preference optimization without a reference model.

    The implicit reward is the length-normalized log-probability, ``r(y) = (β/|y|)·log π(y)``, and
    the Bradley–Terry likelihood asks the chosen answer to win by a target margin γ::

        loss = −(1−ε)·log σ(r_c − r_r − γ) − ε·log σ(−(r_c − r_r − γ))      (ε = label_smoothing)

    (TRL's CPOTrainer with ``loss_type='simpo'``, ``cpo_alpha=0``: its ``simpo_gamma`` is this γ.)
    Args: summed log-probs ``[B]`` of each answer, their scored-token counts ``[B]`` (a kept pair
    with a count of 0 divides by 0: inf/NaN, loudly), β > 0, γ ≥ 0, pair weights ``[B]``.
    Returns a :class:`DPOOutput` whose reward sums are of ``r = β·mean log π``.
    """
    beta_value = _concrete(beta)
    if beta_value is not None and not beta_value > 0:
        raise ValueError(f"beta must be > 0, got {beta_value}")
    eps_value = _concrete(label_smoothing)
    if eps_value is not None and not 0.0 <= eps_value < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {eps_value}")
    pol_c = _pair_array("policy_chosen_logps", policy_chosen_logps)
    shape = pol_c.shape
    pol_r = _pair_array("policy_rejected_logps", policy_rejected_logps, shape)
    weights = prepare_mask(weights, shape)
    keep = weights != 0
    beta = jnp.asarray(beta, F32)
    reward_c = beta * _mean_logps("simpo_loss", pol_c, chosen_counts, keep, shape)
    reward_r = beta * _mean_logps("simpo_loss", pol_r, rejected_counts, keep, shape)
    z = reward_c - reward_r - jnp.asarray(gamma, F32)
    eps = jnp.asarray(label_smoothing, F32)
    loss = -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
    return _pair_output(loss, weights, keep, reward_c, reward_r)


def orpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_counts, rejected_counts, *, lam=0.1,
              weights=None) -> ORPOOutput:
    """ORPO (Hong et al. 2024): supervised fine-tuning plus an odds-ratio preference term, no reference.

    With the length-normalized probability ``P(y) = exp(log π(y)/|y|)`` and ``odds(y) =
    P(y)/(1 − P(y))``, per pair::

        loss = NLL_c + λ·(−log σ(log odds(y_c) − log odds(y_r))),    NLL_c = −log π(y_c)/|y_c|

    (``log odds = ℓ − log(1 − e^ℓ)`` with ℓ the mean log-prob, computed as ``ℓ − log(−expm1(ℓ))``,
    ℓ capped at −1e-6 so that a certain answer has finite odds). TRL's ORPOTrainer has the same
    odds term with ``beta`` = λ; its NLL is the token mean over the batch's chosen answers, here
    each pair's own mean (so the (sum, count) over pairs splits exactly).
    """
    lam_value = _concrete(lam)
    if lam_value is not None and not lam_value >= 0:
        raise ValueError(f"lam must be >= 0, got {lam_value}")
    pol_c = _pair_array("policy_chosen_logps", policy_chosen_logps)
    shape = pol_c.shape
    pol_r = _pair_array("policy_rejected_logps", policy_rejected_logps, shape)
    weights = prepare_mask(weights, shape)
    keep = weights != 0
    mean_c = jnp.minimum(_mean_logps("orpo_loss", pol_c, chosen_counts, keep, shape), -1e-6)
    mean_r = jnp.minimum(_mean_logps("orpo_loss", pol_r, rejected_counts, keep, shape), -1e-6)
    log_odds = (mean_c - jnp.log(-jnp.expm1(mean_c))) - (mean_r - jnp.log(-jnp.expm1(mean_r)))
    odds_loss = -jax.nn.log_sigmoid(log_odds)
    nll = -mean_c
    loss = nll + jnp.asarray(lam, F32) * odds_loss
    per_pair = jnp.where(keep, loss, 0.0) * weights
    stop = jax.lax.stop_gradient
    return ORPOOutput(
        sum=jnp.sum(per_pair), count=jnp.sum(weights),
        nll_sum=stop(_weighted(weights, keep, nll)), odds_loss_sum=stop(_weighted(weights, keep, odds_loss)),
        log_odds_sum=stop(_weighted(weights, keep, log_odds)),
        accuracy_sum=stop(_weighted(weights, keep, (log_odds > 0).astype(F32))),
        per_pair_loss=per_pair)
