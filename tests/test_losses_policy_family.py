"""The KL estimators' gradients by exact enumeration, and the GRPO family of lm.losses.policy_loss
against the published formulas and TRL's GRPOTrainer formulas recomputed here in numpy (TRL is
not needed at test time)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.losses import (equal_reward_groups, group_advantages, kl_rewards, overlong_penalty, policy_loss,
                       value_loss)

V = 7  # vocabulary of the enumerated policy


# ----------------------------------------------------------------------------- KL by exact enumeration

def _policy_and_reference(seed=0):
    rng = np.random.default_rng(seed)
    theta = jnp.asarray(rng.normal(size=V) * 1.5, jnp.float32)
    ref = jax.nn.log_softmax(jnp.asarray(rng.normal(size=V) * 1.5, jnp.float32))
    return theta, ref


def _reverse_kl(theta, ref):
    logp = jax.nn.log_softmax(theta)
    return jnp.sum(jnp.exp(logp) * (logp - ref))


def _forward_kl(theta, ref):
    logp = jax.nn.log_softmax(theta)
    return jnp.sum(jnp.exp(ref) * (ref - logp))


def _enumerated_loss(theta, ref, beta, estimator, placement):
    """Every token v of the vocabulary a row [1 token] weighted by π(v) (constant): the batch's
    weighted sums are exact expectations over on-policy samples. Zero advantages."""
    logp = jax.nn.log_softmax(theta)[:, None]                       # [V, 1]
    weights = jax.lax.stop_gradient(jnp.exp(logp))                  # π(v) as the mask
    old = jax.lax.stop_gradient(logp)
    refs = ref[:, None]
    if placement == "loss":
        out = policy_loss(logp, old, jnp.zeros(V), weights, ref_logprobs=refs, kl_coef=beta,
                          kl_estimator=estimator)
    else:  # in the reward: A_t = −β·k1_t, no penalty term in the loss
        out = policy_loss(logp, old, kl_rewards(logp, refs, weights, beta), weights, ref_logprobs=refs)
    return out.mean, out


@pytest.mark.parametrize("estimator, placement, expected", [
    ("k1", "loss", "zero"), ("k2", "loss", "reverse"), ("k3", "loss", "forward"), ("k1", "reward", "reverse")])
def test_kl_penalty_gradients_by_exact_enumeration(estimator, placement, expected):
    theta, ref = _policy_and_reference()
    beta = 0.7
    grad = jax.grad(lambda t: _enumerated_loss(t, ref, beta, estimator, placement)[0])(theta)
    want = {"zero": jnp.zeros(V), "reverse": beta * jax.grad(_reverse_kl)(theta, ref),
            "forward": beta * jax.grad(_forward_kl)(theta, ref)}[expected]
    np.testing.assert_allclose(grad, want, atol=1e-5)
    assert float(jnp.abs(jax.grad(_reverse_kl)(theta, ref)).max()) > 0.05  # a gradient worth telling apart
    # the reported KL metric is the true KL(π‖π_ref) on such a batch
    _, out = _enumerated_loss(theta, ref, beta, estimator, placement)
    np.testing.assert_allclose(out.kl_sum / out.token_count, _reverse_kl(theta, ref), rtol=1e-5)


def test_policy_loss_default_estimator_gives_the_reverse_kl_gradient():
    theta, ref = _policy_and_reference(1)
    logp = lambda t: jax.nn.log_softmax(t)[:, None]  # noqa: E731
    grad = jax.grad(lambda t: policy_loss(logp(t), jax.lax.stop_gradient(logp(t)), jnp.zeros(V),
                                          jax.lax.stop_gradient(jnp.exp(logp(t))), ref_logprobs=ref[:, None],
                                          kl_coef=1.0).mean)(theta)
    np.testing.assert_allclose(grad, jax.grad(_reverse_kl)(theta, ref), atol=1e-5)


# ----------------------------------------------------------------------------- TRL's formulas in numpy

def trl_group_advantages(rewards, group_size, scale_rewards):
    """TRL GRPOTrainer._generate_and_score_completions: torch.std (ddof=1), eps 1e-4."""
    grouped = rewards.reshape(-1, group_size)
    mean = np.repeat(grouped.mean(1), group_size)
    adv = rewards - mean
    if scale_rewards == "group":
        adv = adv / (np.repeat(grouped.std(1, ddof=1), group_size) + 1e-4)
    elif scale_rewards == "batch":
        adv = adv / (rewards.std(ddof=1) + 1e-4)
    return adv


def trl_grpo_loss(xp, detach, logp, old, ref, adv, mask, *, loss_type, eps_low, eps_high, beta, level,
                  tau_pos=1.0, tau_neg=1.05, max_completion_length=None):
    """GRPOTrainer._compute_loss (TRL ≥ 0.23), one process, no gradient accumulation."""
    log_ratio = logp - old
    if level == "token":
        log_w = log_ratio
    else:
        log_w = ((log_ratio * mask).sum(-1) / xp.maximum(mask.sum(-1), 1.0))[:, None]
    coef_1 = xp.exp(log_w)
    a = adv[:, None]
    if loss_type == "cispo":
        per_token = -detach(xp.minimum(coef_1, eps_high)) * a * logp
    elif loss_type == "sapo":
        temps = xp.where(a > 0, tau_pos, tau_neg)
        per_token = -(1 / (1 + xp.exp(-temps * (coef_1 - 1)))) * 4 / temps * a
    else:
        coef_2 = xp.clip(coef_1, 1 - eps_low, 1 + eps_high)
        per_token = -xp.minimum(coef_1 * a, coef_2 * a)
    if beta:
        per_token = per_token + beta * (xp.exp(ref - logp) - (ref - logp) - 1)
    per_token = per_token * xp.ones_like(mask)  # sequence level: [B, 1] → [B, T]
    if loss_type in ("grpo", "sapo"):
        return ((per_token * mask).sum(-1) / xp.maximum(mask.sum(-1), 1.0)).mean()
    if loss_type == "bnpo":
        return (per_token * mask).sum() / xp.maximum(mask.sum(), 1.0)
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.shape[0] * max_completion_length)
    return (per_token * mask).sum() / mask.sum()  # dapo, cispo: num_items_in_batch on one process


def _random_batch(seed, B=8, T=10):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, size=B)          # every row scores ≥ 1 token (see test docstring)
    mask = (np.arange(T) < lengths[:, None]).astype(np.float64)
    logp = -rng.exponential(size=(B, T))
    old = logp + rng.normal(0, 0.3, size=(B, T))      # ratios well away from 1: clipping acts
    ref = logp + rng.normal(0, 0.5, size=(B, T))
    rewards = rng.integers(0, 3, size=B).astype(np.float64)
    return logp, old, ref, rewards, mask


@pytest.mark.parametrize("loss_type, scale", [("grpo", "group"), ("bnpo", "batch"), ("dapo", "group"),
                                               ("dr_grpo", "none"), ("cispo", "group"), ("sapo", "batch")])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_family_equals_trl(loss_type, level, scale):
    """Loss and gradient of lm's option = TRL's formula for the same option (every row has a
    scored token: TRL's 'grpo' mean also counts empty rows as 0, lm counts only scored rows)."""
    logp, old, ref, rewards, mask = _random_batch(hash((loss_type, level, scale)) % 1000)
    B, T = mask.shape
    G, eps_low, eps_high, beta = 4, 0.2, 0.28, 0.04
    adv = trl_group_advantages(rewards, G, scale)
    ours_adv = group_advantages(jnp.asarray(rewards, jnp.float32), G, scale=scale, eps=1e-4, ddof=1)
    np.testing.assert_allclose(ours_adv, adv, rtol=1e-5, atol=1e-6)
    trl_eps_high = 1 + eps_high if loss_type == "cispo" else eps_high  # TRL's CISPO cap is the ratio itself
    kw = dict(loss_type=loss_type, eps_low=eps_low, eps_high=trl_eps_high, beta=beta, level=level,
              max_completion_length=T)
    want = trl_grpo_loss(np, lambda x: x, logp, old, ref, adv, mask, **kw)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731

    def ours(lp):
        return policy_loss(lp, f32(old), ours_adv, f32(mask), clip_eps=eps_low, clip_eps_high=eps_high,
                           ref_logprobs=f32(ref), kl_coef=beta, kl_estimator="k3", loss_type=loss_type,
                           importance_sampling_level=level).mean

    np.testing.assert_allclose(ours(f32(logp)), want, rtol=2e-5, atol=1e-6)
    trl_grad = jax.grad(lambda lp: trl_grpo_loss(jnp, jax.lax.stop_gradient, lp, f32(old), f32(ref), f32(adv),
                                                 f32(mask), **kw))(f32(logp))
    np.testing.assert_allclose(jax.grad(ours)(f32(logp)), trl_grad, rtol=2e-4, atol=1e-6)


def test_gspo_is_the_published_sequence_objective():
    """GSPO (Zheng et al. 2025): J = mean_i min(s_i·A_i, clip(s_i, 1−ε, 1+ε)·A_i) with
    s_i = (π(y_i)/π_old(y_i))^(1/|y_i|)."""
    logp, old, _, rewards, mask = _random_batch(3)
    adv = np.asarray(group_advantages(jnp.asarray(rewards, jnp.float32), 4))
    s = np.exp(((logp - old) * mask).sum(1) / mask.sum(1))
    want = -np.mean(np.minimum(s * adv, np.clip(s, 0.8, 1.2) * adv))
    out = policy_loss(jnp.asarray(logp, jnp.float32), old, adv, mask, loss_type="grpo",
                      importance_sampling_level="sequence")
    np.testing.assert_allclose(out.mean, want, rtol=1e-5, atol=1e-6)


def test_cispo_keeps_every_gradient_and_sapo_matches_the_unclipped_gradient_at_ratio_one():
    logp, _, _, rewards, mask = _random_batch(4)
    adv = jnp.asarray(rewards - rewards.mean(), jnp.float32)
    lp = jnp.asarray(logp, jnp.float32)
    far = lp - 2.0  # every ratio e² ≫ 1 + ε: the hard clip removes the positive-advantage gradients
    cispo = jax.grad(lambda x: policy_loss(x, far, adv, mask, loss_type="cispo", clip_eps_high=0.5).sum)(lp)
    clipped = jax.grad(lambda x: policy_loss(x, far, adv, mask, loss_type="dapo").sum)(lp)
    pos = np.asarray(adv > 0)[:, None] & (mask > 0)
    assert np.all(np.asarray(cispo)[pos] != 0) and np.all(np.asarray(clipped)[pos] == 0)
    np.testing.assert_allclose(cispo, -1.5 * np.asarray(adv)[:, None] * mask, rtol=1e-6)  # w capped at 1.5
    plain = jax.grad(lambda x: policy_loss(x, jax.lax.stop_gradient(x), adv, mask).sum)(lp)
    sapo = jax.grad(lambda x: policy_loss(x, jax.lax.stop_gradient(x), adv, mask, loss_type="sapo",
                                          normalize="token").sum)(lp)
    np.testing.assert_allclose(sapo, plain, rtol=1e-6, atol=1e-7)


def test_dynamic_sampling_groups_and_overlong_penalty():
    rewards = jnp.array([1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0, 0.5, 0.5])
    np.testing.assert_array_equal(equal_reward_groups(rewards, 3), [False, True, True, False])
    np.testing.assert_array_equal(group_advantages(rewards, 3).reshape(4, 3)[1:3], 0.0)
    lengths = np.arange(0, 22)
    max_len, cache = 20, 4
    trl = [0.0 if n <= max_len - cache else (max_len - cache - n) / cache if n <= max_len else -1.0
           for n in lengths]  # TRL's get_soft_overlong_punishment
    np.testing.assert_allclose(overlong_penalty(lengths, max_len, cache), trl, rtol=1e-6)
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(lengths, 4, 8)


# ----------------------------------------------------------------------------- value loss clip count

def test_value_loss_counts_only_tokens_whose_prediction_clipping_changed():
    """V_clip = clip(V, V_old − ε, V_old + ε) (TRL) is V itself, bit for bit, inside the band: float
    rounding of V_old + clip(V − V_old) never makes a token count as clipped."""
    rng = np.random.default_rng(0)
    n = 20_000
    old = jnp.asarray(rng.normal(0, 3, size=(1, n)), jnp.float32)
    values = old + jnp.asarray(rng.uniform(-0.19, 0.19, size=(1, n)), jnp.float32)   # all inside ±0.2
    returns = jnp.asarray(rng.normal(0, 3, size=(1, n)), jnp.float32)
    out = value_loss(values, old, returns, jnp.ones((1, n)), clip_eps=0.2)
    assert out.clip_fraction_sum == 0
    grad = jax.grad(lambda v: value_loss(v, old, returns, jnp.ones((1, n)), clip_eps=0.2).sum)(values)
    np.testing.assert_allclose(grad, values - returns, rtol=1e-6, atol=1e-6)  # every token keeps its gradient
