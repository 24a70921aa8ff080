"""Tests for lm.losses.preference: float64 numpy references, invariances and known numbers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.losses import bradley_terry_loss, dpo_loss, dpo_metrics, mean_of, orpo_loss, simpo_loss

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "reference_free")


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def reference_dpo(pc, pr, rc, rr, beta, loss_type, eps, nc, nr):
    """Per-pair loss and the implicit rewards in float64 numpy, from the formulas."""
    pc, pr, rc, rr, nc, nr = (np.asarray(v, np.float64) for v in (pc, pr, rc, rr, nc, nr))
    if loss_type == "reference_free":
        rc, rr = 0.0 * rc, 0.0 * rr
    rho_c, rho_r = pc - rc, pr - rr
    z = beta * (rho_c - rho_r)
    if loss_type in ("sigmoid", "reference_free"):
        loss = -(1 - eps) * np_log_sigmoid(z) - eps * np_log_sigmoid(-z)
    elif loss_type == "robust":
        loss = (-(1 - eps) * np_log_sigmoid(z) + eps * np_log_sigmoid(-z)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        loss = np.maximum(0.0, 1 - z)
    else:
        loss = (rho_c / nc - rho_r / nr - 1 / (2 * beta)) ** 2
    return loss, beta * rho_c, beta * rho_r


def random_pairs(seed, batch=12):
    rng = np.random.default_rng(seed)
    logps = [-rng.uniform(5, 40, batch).astype(np.float32) for _ in range(4)]
    counts = [rng.integers(1, 30, batch).astype(np.float32) for _ in range(2)]
    weights = rng.uniform(0, 2, batch).astype(np.float32) * (rng.random(batch) > 0.25)
    return logps, counts, weights


def call(logps, counts, weights, **kw):
    return dpo_loss(*logps, chosen_counts=counts[0], rejected_counts=counts[1], weights=weights, **kw)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_matches_numpy_reference(loss_type, eps):
    logps, counts, w = random_pairs(1)
    beta = 0.3
    out = call(logps, counts, w, beta=beta, loss_type=loss_type, label_smoothing=eps)
    loss, rew_c, rew_r = reference_dpo(*logps, beta, loss_type, eps, *counts)
    w64 = w.astype(np.float64)
    np.testing.assert_allclose(out.per_pair_loss, w64 * loss, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(out.sum, (w64 * loss).sum(), rtol=2e-5)
    np.testing.assert_allclose(out.count, w64.sum(), rtol=1e-6)
    np.testing.assert_allclose(out.chosen_rewards_sum, (w64 * rew_c).sum(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.rejected_rewards_sum, (w64 * rew_r).sum(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.margin_sum, (w64 * (rew_c - rew_r)).sum(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.accuracy_sum, (w64 * (rew_c > rew_r)).sum(), rtol=1e-6)
    metrics = dpo_metrics(out)
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"}
    margins = (w64 * (rew_c - rew_r)).sum() / w64.sum()
    np.testing.assert_allclose(metrics["rewards/margins"], margins, rtol=1e-5)
    assert out.metrics() == metrics and all(v.dtype == jnp.float32 for v in out)


def test_policy_equal_to_reference_gives_ln2_margin_0_accuracy_0():
    logps, _, _ = random_pairs(2)
    out = dpo_loss(logps[0], logps[1], logps[0], logps[1], beta=0.1)
    np.testing.assert_allclose(out.mean, math.log(2), rtol=1e-6)
    assert float(out.margin_sum) == 0.0 and float(out.accuracy_sum) == 0.0  # a tie is not a win
    assert float(out.chosen_rewards_sum) == 0.0 and float(out.rejected_rewards_sum) == 0.0


def test_beta_is_applied_once():
    """The sigmoid loss is −log σ(β·h), not −log σ(β²·h) (the double-β bug)."""
    beta, h = 0.5, np.array([2.0, -1.0, 0.7], np.float32)
    zeros = np.zeros(3, np.float32)
    out = dpo_loss(h, zeros, zeros, zeros, beta=beta)
    np.testing.assert_allclose(out.per_pair_loss, -np_log_sigmoid(beta * h), rtol=1e-6)
    assert not np.allclose(out.per_pair_loss, -np_log_sigmoid(beta**2 * h), rtol=1e-3)
    np.testing.assert_allclose(out.chosen_rewards_sum, beta * h.sum(), rtol=1e-6)


@pytest.mark.parametrize("eps", [0.1, 0.35, 0.8])
def test_cdpo_is_symmetric_in_label_and_flip(eps):
    """cDPO at (Δ, ε) equals cDPO at (−Δ, 1−ε): smoothing ε toward the flipped label."""
    rng = np.random.default_rng(3)
    delta, zeros = rng.normal(0, 5, 16).astype(np.float32), np.zeros(16, np.float32)
    a = dpo_loss(delta, zeros, zeros, zeros, beta=0.7, label_smoothing=eps)
    b = dpo_loss(-delta, zeros, zeros, zeros, beta=0.7, label_smoothing=1 - eps)
    np.testing.assert_allclose(a.per_pair_loss, b.per_pair_loss, rtol=1e-5, atol=1e-6)


def test_robust_loss_is_unbiased_under_label_noise():
    """With labels flipped at rate ε, E[robust loss] equals the clean sigmoid loss (its purpose)."""
    eps, beta = 0.3, 0.4
    h, zeros = np.linspace(-6, 6, 13).astype(np.float32), np.zeros(13, np.float32)
    rob = lambda x: dpo_loss(x, zeros, zeros, zeros, beta=beta, loss_type="robust", label_smoothing=eps)
    expected = (1 - eps) * rob(h).per_pair_loss + eps * rob(-h).per_pair_loss
    clean = dpo_loss(h, zeros, zeros, zeros, beta=beta).per_pair_loss
    np.testing.assert_allclose(expected, clean, rtol=1e-5, atol=1e-6)


def test_ipo_is_minimized_at_half_inverse_beta():
    beta, n_c, n_r = 0.25, 4.0, 8.0
    target = 1 / (2 * beta)  # h' at the minimum
    one = lambda v: jnp.array([v], jnp.float32)
    loss = lambda pc: dpo_loss(pc, one(-8.0), one(0.0), one(0.0), beta=beta, loss_type="ipo",
                               chosen_counts=one(n_c), rejected_counts=one(n_r)).sum
    at_min = (target - 8.0 / n_r) * n_c  # ρ_c/n_c − ρ_r/n_r = target
    np.testing.assert_allclose(jax.grad(loss)(one(at_min)), 0.0, atol=1e-5)
    np.testing.assert_allclose(loss(one(at_min)), 0.0, atol=1e-6)
    grid = np.linspace(at_min - 3, at_min + 3, 61).astype(np.float32)
    full = lambda v: np.full(61, v, np.float32)
    values = dpo_loss(grid, full(-8.0), full(0.0), full(0.0), beta=beta, loss_type="ipo",
                      chosen_counts=full(n_c), rejected_counts=full(n_r)).per_pair_loss
    assert abs(grid[int(np.argmin(values))] - at_min) < 1e-6


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_split_batch_gives_whole_batch_sums_and_gradient(loss_type):
    logps, counts, w = random_pairs(4)
    kw = dict(beta=0.2, loss_type=loss_type, label_smoothing=0.1)

    def total(pol_c, sl):
        part = lambda v: v[sl]
        return call([pol_c[sl], *map(part, logps[1:])], list(map(part, counts)), w[sl], **kw)

    whole = total(jnp.asarray(logps[0]), slice(None))
    halves = [total(jnp.asarray(logps[0]), s) for s in (slice(0, 5), slice(5, None))]
    for field in ("sum", "count", "chosen_rewards_sum", "rejected_rewards_sum", "accuracy_sum", "margin_sum"):
        np.testing.assert_allclose(sum(getattr(h, field) for h in halves), getattr(whole, field),
                                   rtol=1e-5, atol=1e-5)

    def split_mean(pol_c):
        parts = [total(pol_c, s) for s in (slice(0, 5), slice(5, None))]
        return mean_of(sum(p.sum for p in parts), sum(p.count for p in parts))

    g_whole = jax.grad(lambda p: total(p, slice(None)).mean)(jnp.asarray(logps[0]))
    np.testing.assert_allclose(jax.grad(split_mean)(jnp.asarray(logps[0])), g_whole, rtol=1e-5, atol=1e-7)
    assert np.any(np.asarray(g_whole) != 0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_zero_count_gives_zero_loss_and_gradient_even_with_bad_inputs(loss_type):
    bad = jnp.array([-jnp.inf, jnp.nan, 3.0], jnp.float32)
    zeros = jnp.zeros(3, jnp.float32)

    def mean(pol_c):
        return dpo_loss(pol_c, bad, bad, zeros, beta=0.1, loss_type=loss_type, weights=zeros,
                        chosen_counts=zeros, rejected_counts=zeros).mean

    value, grad = jax.value_and_grad(mean)(bad)
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0.0)
    bt = jax.value_and_grad(lambda r: bradley_terry_loss(r, bad, weights=zeros).mean)(bad)
    assert float(bt[0]) == 0.0 and np.all(np.asarray(bt[1]) == 0.0)


def test_rewards_and_weights_carry_no_gradient():
    logps, counts, w = random_pairs(5)
    for field in ("chosen_rewards_sum", "margin_sum", "accuracy_sum"):
        stat = lambda p: getattr(call([p, *logps[1:]], counts, w, beta=0.1), field)
        g = jax.grad(stat)(jnp.asarray(logps[0]))
        assert np.all(np.asarray(g) == 0.0), field
    g_w = jax.grad(lambda ww: call(logps, counts, ww, beta=0.1).sum)(jnp.asarray(w))
    assert np.all(np.asarray(g_w) == 0.0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_bfloat16_inputs_give_float32_close_to_float32(loss_type):
    logps, counts, w = random_pairs(6)
    logps16 = [jnp.asarray(v, jnp.bfloat16) for v in logps]
    out16 = call(logps16, counts, w, beta=0.1, loss_type=loss_type)
    out32 = call([np.asarray(v, np.float32) for v in logps16], counts, w, beta=0.1, loss_type=loss_type)
    assert all(v.dtype == jnp.float32 for v in out16)
    for a, b in zip(out16, out32):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_named():
    x = np.zeros(2, np.float32)
    with pytest.raises(ValueError, match="loss_type must be one of.*sigmoid.*ipo"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, beta=0.1, label_smoothing=1.0)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="chosen_counts and rejected_counts"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="ipo")
    with pytest.raises(ValueError, match="needs ref_chosen_logps"):
        dpo_loss(x, x, None, None, beta=0.1)
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        dpo_loss(x, np.zeros(3, np.float32), x, x, beta=0.1)
    free = dpo_loss(x + 1, x, None, None, beta=0.1, loss_type="reference_free")
    np.testing.assert_allclose(free.sum, dpo_loss(x + 1, x, x, x, beta=0.1).sum)


def test_bradley_terry_matches_numpy_with_margin_and_strict_accuracy():
    rng = np.random.default_rng(7)
    rc, rr = rng.normal(size=10).astype(np.float32), rng.normal(size=10).astype(np.float32)
    rr[:3] = rc[:3]  # ties: accuracy 0, loss ln 2 without a margin
    w = rng.uniform(0.5, 2, 10).astype(np.float32)
    margin = rng.uniform(0, 1, 10).astype(np.float32)
    for m in (0.0, margin):
        out = bradley_terry_loss(rc, rr, w, margin=m)
        d = rc.astype(np.float64) - rr
        ref = -np_log_sigmoid(d - m)
        np.testing.assert_allclose(out.per_pair_loss, w * ref, rtol=1e-5)
        np.testing.assert_allclose(out.sum, (w * ref).sum(), rtol=1e-5)
        np.testing.assert_allclose(out.accuracy_sum, (w * (d > 0)).sum(), rtol=1e-6)
        np.testing.assert_allclose(out.margin_sum, (w * d).sum(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bradley_terry_loss(rc[:3], rr[:3]).mean, math.log(2), rtol=1e-6)
    assert float(bradley_terry_loss(rc[:3], rr[:3]).accuracy) == 0.0
    # a margin makes the loss larger and its gradient pushes r_c up harder
    g0 = jax.grad(lambda r: bradley_terry_loss(r, rr).sum)(jnp.asarray(rc))
    g1 = jax.grad(lambda r: bradley_terry_loss(r, rr, margin=1.0).sum)(jnp.asarray(rc))
    np.testing.assert_allclose(g0, -1 / (1 + np.exp(rc - rr.astype(np.float64))), rtol=1e-5)
    assert np.all(np.asarray(g1) < np.asarray(g0))


# ----------------------------------------------------------------------------- SimPO and ORPO

def test_simpo_matches_the_paper_and_trl():
    """SimPO (Meng et al. 2024, eq. 6): −log σ(β/|y_w|·log π(y_w) − β/|y_l|·log π(y_l) − γ); TRL's
    CPOTrainer (loss_type='simpo'): logits = (mean logp_c − mean logp_r) − γ/β, loss = −log σ(β·logits)."""
    (pc, pr, _, _), (nc, nr), weights = random_pairs(21)
    beta, gamma, eps = 2.0, 0.7, 0.1
    out = simpo_loss(pc, pr, nc, nr, beta=beta, gamma=gamma, label_smoothing=eps, weights=weights)
    c, r = np.float64(pc) / nc, np.float64(pr) / nr
    paper = -(1 - eps) * np_log_sigmoid(beta * c - beta * r - gamma) - eps * np_log_sigmoid(-(beta * c - beta * r - gamma))
    trl_logits = (c - r) - gamma / beta
    trl = -np_log_sigmoid(beta * trl_logits) * (1 - eps) - np_log_sigmoid(-beta * trl_logits) * eps
    np.testing.assert_allclose(paper, trl, rtol=1e-12)
    np.testing.assert_allclose(out.per_pair_loss, weights * paper, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.sum, np.sum(weights * paper), rtol=1e-5)
    assert out.count == np.float32(weights.sum())
    np.testing.assert_allclose(out.chosen_rewards_sum, np.sum(weights * beta * c), rtol=1e-5)
    grad = jax.grad(lambda x: simpo_loss(x, pr, nc, nr, beta=beta, gamma=gamma, weights=weights).sum)(jnp.asarray(pc))
    z = beta * c - beta * r - gamma
    np.testing.assert_allclose(grad, -weights * (1 - 1 / (1 + np.exp(-z))) * beta / nc, rtol=1e-4, atol=1e-7)


def test_orpo_matches_the_paper_and_trl():
    """ORPO (Hong et al. 2024, eq. 6–7): L_SFT + λ·(−log σ(log odds(y_w)/odds(y_l))), odds = P/(1−P),
    P = exp(mean log-prob); TRL's ORPOTrainer: log_odds = (c − r) − (log1p(−e^c) − log1p(−e^r))."""
    (pc, pr, _, _), (nc, nr), weights = random_pairs(22)
    pc, pr = pc / 20, pr / 20  # mean log-probs from −2 to −0.01: probabilities up to 0.99
    lam = 0.4
    out = orpo_loss(pc, pr, nc, nr, lam=lam, weights=weights)
    c, r = np.float64(pc) / nc, np.float64(pr) / nr
    odds = lambda m: np.exp(m) / (1 - np.exp(m))  # noqa: E731
    paper = -c - lam * np_log_sigmoid(np.log(odds(c) / odds(r)))
    trl_log_odds = (c - r) - (np.log1p(-np.exp(c)) - np.log1p(-np.exp(r)))
    np.testing.assert_allclose(np.log(odds(c) / odds(r)), trl_log_odds, rtol=1e-9)
    np.testing.assert_allclose(out.per_pair_loss, weights * paper, rtol=1e-5, atol=1e-6)
    assert out.count == np.float32(weights.sum())
    np.testing.assert_allclose(out.nll_sum, np.sum(weights * -c), rtol=1e-5)
    np.testing.assert_allclose(out.log_odds_sum, np.sum(weights * trl_log_odds), rtol=1e-4)
    assert np.isfinite(orpo_loss(jnp.zeros(2), jnp.full(2, -3.0), jnp.ones(2), jnp.ones(2)).sum)  # P = 1: finite


@pytest.mark.parametrize("fn", [simpo_loss, orpo_loss])
def test_simpo_orpo_split_and_zero_weight(fn):
    (pc, pr, _, _), (nc, nr), weights = random_pairs(23)
    kw = dict(beta=1.5) if fn is simpo_loss else dict(lam=0.3)
    whole = fn(pc, pr, nc, nr, weights=weights, **kw)
    halves = [fn(pc[s], pr[s], nc[s], nr[s], weights=weights[s], **kw) for s in (slice(0, 5), slice(5, None))]
    np.testing.assert_allclose(mean_of(sum(h.sum for h in halves), sum(h.count for h in halves)), whole.mean, rtol=1e-6)
    nan = jnp.full(3, jnp.nan)
    loss, grad = jax.value_and_grad(lambda x: fn(x, nan, nan, nan, weights=jnp.zeros(3), **kw).mean)(nan)
    assert loss == 0.0 and np.all(np.asarray(grad) == 0.0)
    with pytest.raises(ValueError, match="token counts"):
        fn(pc, pr, None, nr, **kw)
