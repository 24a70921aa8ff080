"""Tests for the RL losses (lm.losses.policy) and advantage estimates (lm.losses.advantages):
float64 numpy references, the (sum, count) split invariance, and hand-made cases."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.losses import gae, group_advantages, kl_divergence, mean_of, policy_loss, value_loss, whiten

NORMALIZE = ["token", "sequence", "constant"]


# ----------------------------------------------------------------------------- references

def ref_group_advantages(rewards, group_size, scale, eps=1e-6):
    r = np.asarray(rewards, np.float64)
    out = np.empty_like(r)
    batch_std = np.sqrt(np.mean((r - r.mean()) ** 2))
    for start in range(0, len(r), group_size):
        g = r[start:start + group_size]
        centred = g - g.mean()
        std = {"group": np.sqrt(np.mean(centred**2)), "batch": batch_std}.get(scale)
        out[start:start + group_size] = centred if std is None else centred / (std + eps)
    return out


def ref_policy_loss(logp, old, adv, mask, clip_eps, high, ref, kl_coef, estimator, normalize, max_len):
    """float64 loops: (sum, count, clip_sum, kl_sum, ratio_sum, per_token, grad of the mean)."""
    B, T = mask.shape
    high = clip_eps if high is None else high
    per_token, dloss = np.zeros((B, T)), np.zeros((B, T))
    clip_sum = kl_sum = ratio_sum = 0.0
    for b in range(B):
        for t in range(T):
            m = mask[b, t]
            if m == 0:
                continue
            a = adv[b] if adv.ndim == 1 else adv[b, t]
            ratio = np.exp(logp[b, t] - old[b, t])
            unclipped, clipped = ratio * a, np.clip(ratio, 1 - clip_eps, 1 + high) * a
            active = clipped < unclipped
            loss, grad = -min(unclipped, clipped), (0.0 if active else -ratio * a)
            if ref is not None:
                log_rho = ref[b, t] - logp[b, t]
                k3 = np.exp(log_rho) - log_rho - 1
                kl = {"k1": -log_rho, "k2": 0.5 * log_rho**2, "k3": k3}[estimator]
                dkl = {"k1": 1.0, "k2": -log_rho, "k3": 1.0 - np.exp(log_rho)}[estimator]
                loss, grad, kl_sum = loss + kl_coef * kl, grad + kl_coef * dkl, kl_sum + m * k3
            per_token[b, t], dloss[b, t] = m * loss, m * grad
            clip_sum, ratio_sum = clip_sum + m * active, ratio_sum + m * ratio
    row_w = mask.sum(1)
    if normalize == "sequence":
        scored = row_w != 0
        total = np.sum(per_token.sum(1)[scored] / row_w[scored])
        count = scored.sum()
        dloss = dloss / np.where(scored, row_w, 1.0)[:, None]
    else:
        total = per_token.sum()
        count = mask.sum() if normalize == "token" else B * (max_len or T)
    grad = dloss / count if count else dloss * 0
    return total, count, clip_sum, kl_sum, ratio_sum, per_token, grad


def ref_gae(rewards, values, mask, gamma, lam):
    """A plain loop over each row's scored positions, last to first."""
    adv = np.zeros(rewards.shape)
    for b in range(rewards.shape[0]):
        steps = [t for t in range(rewards.shape[1]) if mask[b, t] != 0]
        next_value = next_adv = 0.0
        for t in reversed(steps):
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            adv[b, t] = next_adv = delta + gamma * lam * next_adv
            next_value = values[b, t]
    return adv, np.where(mask != 0, adv + values, 0.0)


def random_mask(rng, B, T):
    """Float weights with prompt zeros, holes, a fully masked row and a single-token row."""
    mask = rng.choice([0.0, 0.5, 1.0, 2.0], p=[0.3, 0.1, 0.5, 0.1], size=(B, T))
    mask[:, :2] = 0.0     # prompt
    mask[1] = 0.0         # fully masked row
    mask[2] = 0.0
    mask[2, 4] = 1.0      # one scored token
    return mask


def rollout(seed, B=6, T=9):
    rng = np.random.default_rng(seed)
    mask = random_mask(rng, B, T)
    logp = -rng.exponential(1.0, size=(B, T))
    old = logp + rng.normal(0, 0.3, size=(B, T))     # ratios ≈ 0.5 … 2: both sides clip
    ref = logp + rng.normal(0, 0.5, size=(B, T))
    adv_seq = rng.normal(size=B)
    adv_tok = rng.normal(size=(B, T))
    garbage = lambda x: np.where(mask != 0, x, np.nan)  # noqa: E731 masked inputs never matter
    return dict(logp=garbage(logp), old=garbage(old), ref=garbage(ref), adv_seq=adv_seq,
                adv_tok=garbage(adv_tok), mask=mask)


def run_policy(r, adv, **kw):
    """The loss on rollout ``r`` and the gradient of its mean with respect to the log-probs."""
    def mean(lp):
        out = policy_loss(lp, r["old"], adv, r["mask"], ref_logprobs=r["ref"], **kw)
        return out.mean, out
    (_, out), grad = jax.value_and_grad(mean, has_aux=True)(jnp.asarray(r["logp"], jnp.float32))
    return out, grad


# ----------------------------------------------------------------------------- group advantages

@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_numpy(scale):
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=12) * 3
    rewards[4:8] = 1.5                                   # a group of equal rewards → 0
    adv = group_advantages(jnp.asarray(rewards, jnp.float32), 4, scale=scale)
    assert adv.shape == (12,) and adv.dtype == jnp.float32
    np.testing.assert_allclose(adv, ref_group_advantages(rewards, 4, scale), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(adv).reshape(3, 4).sum(1), 0.0, atol=1e-5)
    np.testing.assert_array_equal(adv[4:8], 0.0)
    if scale == "group":                                  # population std 1 in each varied group
        np.testing.assert_allclose(np.asarray(adv).reshape(3, 4)[[0, 2]].std(1), 1.0, rtol=1e-5)


def test_group_advantages_carry_no_gradient():
    rewards = jnp.array([0.0, 1.0, 3.0, 2.0])
    grad = jax.grad(lambda r: jnp.sum(group_advantages(r, 2) * jnp.arange(4.0)))(rewards)
    np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("rewards, group_size, scale, match", [
    (np.zeros(6), 4, "group", "not a multiple of group_size=4"),
    (np.zeros(6), 0, "group", "group_size must be a positive int"),
    (np.zeros(6), 2.0, "group", "group_size must be a positive int"),
    (np.zeros((2, 3)), 3, "group", r"rewards must be \[B\]"),
    (np.zeros(6), 3, "std", "scale must be one of"),
])
def test_group_advantages_errors(rewards, group_size, scale, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, group_size, scale=scale)


# ----------------------------------------------------------------------------- policy loss

@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_policy_loss_matches_numpy(normalize, estimator):
    for seed, adv_key, high, kl_coef in [(1, "adv_seq", None, 0.1), (2, "adv_tok", 0.28, 0.5),
                                         (3, "adv_seq", 0.28, 0.0)]:
        r = rollout(seed)
        max_len = 12 if normalize == "constant" and seed == 2 else None
        out, grad = run_policy(r, r[adv_key], clip_eps=0.2, clip_eps_high=high, kl_coef=kl_coef,
                               kl_estimator=estimator, normalize=normalize, max_len=max_len)
        total, count, clip_sum, kl_sum, ratio_sum, per_token, ref_grad = ref_policy_loss(
            r["logp"], r["old"], r[adv_key], r["mask"], 0.2, high, r["ref"], kl_coef, estimator,
            normalize, max_len)
        assert all(v.dtype == jnp.float32 for v in out)
        np.testing.assert_allclose(out.sum, total, rtol=1e-5, atol=1e-6)
        assert out.count == count
        assert out.clip_fraction_sum == clip_sum and clip_sum > 0
        np.testing.assert_allclose(out.kl_sum, kl_sum, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.ratio_sum, ratio_sum, rtol=1e-5)
        assert out.token_count == r["mask"].sum()
        np.testing.assert_allclose(out.per_token_loss, per_token, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.mean, total / count, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_grpo_at_ratio_one_is_minus_the_mean_advantage():
    rng = np.random.default_rng(4)
    B, T = 6, 9
    adv = group_advantages(jnp.asarray(rng.normal(size=B), jnp.float32), 3)
    logp = jnp.asarray(-rng.exponential(size=(B, T)), jnp.float32)
    same_length = np.zeros((B, T))
    same_length[:, 3:] = 1.0                      # a 3-token prompt, then 6 scored tokens per row
    out = policy_loss(logp, logp, adv, same_length, normalize="sequence")
    assert abs(float(out.mean)) < 1e-6            # advantages sum to 0 in each group
    assert out.ratio_sum == same_length.sum() and out.clip_fraction_sum == 0
    lengths = np.array([7, 1, 0, 9, 2, 5])
    mask = (np.arange(T) < lengths[:, None]).astype(np.float64)
    a = np.asarray(adv, np.float64)
    expected = {"sequence": -a[lengths > 0].mean(), "token": -(lengths * a).sum() / lengths.sum(),
                "constant": -(lengths * a).sum() / (B * T)}
    for normalize, value in expected.items():
        np.testing.assert_allclose(policy_loss(logp, logp, adv, mask, normalize=normalize).mean,
                                   value, rtol=1e-5, atol=1e-7)


def per_token_kl(logp, ref, estimator):
    zeros = jnp.zeros(logp.shape[:1])
    out = policy_loss(logp, logp, zeros, jnp.ones(logp.shape), ref_logprobs=ref, kl_coef=1.0,
                      kl_estimator=estimator)
    return out.per_token_loss, out.kl_sum


def test_k3_is_nonnegative_and_both_estimators_vanish_at_the_reference():
    rng = np.random.default_rng(5)
    logp = jnp.asarray(-rng.exponential(size=(6, 9)), jnp.float32)
    ref = logp + jnp.asarray(rng.normal(0, 1.0, size=(6, 9)), jnp.float32)
    k1, _ = per_token_kl(logp, ref, "k1")
    k2, _ = per_token_kl(logp, ref, "k2")
    k3, _ = per_token_kl(logp, ref, "k3")
    assert (k1 < 0).any() and (k3 >= 0).all() and (k3 > 0).any() and (k2 >= 0).all()
    for estimator in ("k1", "k2", "k3"):
        per_token, kl_sum = per_token_kl(logp, logp, estimator)
        np.testing.assert_array_equal(per_token, 0.0)
        assert kl_sum == 0.0


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_are_unbiased(estimator):
    """Weighting each vocabulary entry v by π(v) (the mask as weights) gives the exact
    expectation over samples from π: the reported KL (k3) is then KL(π‖π_ref) whatever the
    penalty's estimator."""
    rng = np.random.default_rng(6)
    pi_logits, ref_logits = rng.normal(size=(2, 6, 9)) * 2
    logp = jax.nn.log_softmax(jnp.asarray(pi_logits, jnp.float32))
    ref = jax.nn.log_softmax(jnp.asarray(ref_logits, jnp.float32))
    out = policy_loss(logp, logp, jnp.zeros(6), jnp.exp(logp), ref_logprobs=ref,
                      kl_estimator=estimator)
    np.testing.assert_allclose(out.kl_sum, kl_divergence(pi_logits, ref_logits).sum, rtol=1e-5)


def test_clip_fraction_on_hand_made_tokens():
    #        ratio: 1.5  1.5  0.5  0.5  1.1  1.1  2.0  1.5(masked)
    ratio = jnp.array([[1.5, 1.5, 0.5, 0.5, 1.1, 1.1, 2.0, 1.5]])
    adv = jnp.array([[1.0, -1.0, -1.0, 1.0, 1.0, -1.0, 0.0, 1.0]])
    mask = jnp.array([[1.0, 1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    old = jnp.zeros((1, 8))
    out = policy_loss(jnp.log(ratio), old, adv, mask, normalize="constant", max_len=1)
    assert out.clip_fraction_sum == 1.0 + 2.0        # token 0 (A > 0, above) and 2 (A < 0, below)
    np.testing.assert_allclose(out.clip_fraction, 3.0 / 8.0)
    np.testing.assert_allclose(out.per_token_loss,
                               [[-1.2, 1.5, 2 * 0.8, -0.5, -1.1, 1.1, 0.0, 0.0]], rtol=1e-6)
    grad = jax.grad(lambda lp: policy_loss(lp, old, adv, mask, normalize="constant", max_len=1).sum)(
        jnp.log(ratio))
    np.testing.assert_allclose(grad, [[0.0, 1.5, 0.0, -0.5, -1.1, 1.1, 0.0, 0.0]], rtol=1e-6)


def test_clip_higher_is_asymmetric():
    ratio = jnp.array([[1.25, 1.25, 0.75, 0.75]])
    adv = jnp.array([1.0, -1.0, -1.0, 1.0])[None]
    old, mask = jnp.zeros((1, 4)), jnp.ones((1, 4))
    sym = policy_loss(jnp.log(ratio), old, adv, mask, clip_eps=0.2)
    dapo = policy_loss(jnp.log(ratio), old, adv, mask, clip_eps=0.2, clip_eps_high=0.28)
    np.testing.assert_allclose(sym.per_token_loss, [[-1.2, 1.25, 0.8, -0.75]], rtol=1e-6)
    np.testing.assert_allclose(dapo.per_token_loss, [[-1.25, 1.25, 0.8, -0.75]], rtol=1e-6)
    assert sym.clip_fraction_sum == 2.0 and dapo.clip_fraction_sum == 1.0
    low = policy_loss(jnp.log(ratio), old, adv, mask, clip_eps=0.3, clip_eps_high=0.2)
    np.testing.assert_allclose(low.per_token_loss, [[-1.2, 1.25, 0.75, -0.75]], rtol=1e-6)


# ----------------------------------------------------------------------------- GAE and whitening

def gae_case(seed, B=6, T=9):
    rng = np.random.default_rng(seed)
    mask = (rng.random((B, T)) < 0.7).astype(np.float64)
    mask[:, :2] = 0.0
    mask[0, 5:8] = 0.0          # a hole in the middle of a row
    mask[0, [4, 8]] = 1.0
    mask[1] = 0.0               # fully masked row
    rewards = rng.normal(size=(B, T)) * (rng.random((B, T)) < 0.3)
    return rewards, rng.normal(size=(B, T)), mask


@pytest.mark.parametrize("gamma, lam", [(0.97, 0.9), (1.0, 1.0), (0.9, 0.0), (0.5, 1.0)])
def test_gae_matches_a_python_loop(gamma, lam):
    rewards, values, mask = gae_case(7)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = ref_gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(adv)[mask == 0], 0.0)
    np.testing.assert_array_equal(np.asarray(ret)[mask == 0], 0.0)


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards, values, mask = gae_case(8)
    adv, _ = gae(rewards, values, mask, 1.0, 1.0)
    scored_rewards = np.where(mask != 0, rewards, 0.0)
    to_go = np.cumsum(scored_rewards[:, ::-1], axis=1)[:, ::-1]
    np.testing.assert_allclose(adv, np.where(mask != 0, to_go - values, 0.0), rtol=1e-5, atol=1e-5)


def test_gae_carries_no_gradient_and_skips_masked_values():
    rewards, values, mask = (jnp.asarray(v, jnp.float32) for v in gae_case(9))
    grad = jax.grad(lambda r, v: jnp.sum(sum(gae(r, v, mask, 0.9, 0.8))), argnums=(0, 1))(rewards, values)
    np.testing.assert_array_equal(grad[0], 0.0)
    np.testing.assert_array_equal(grad[1], 0.0)
    poisoned = jnp.where(mask != 0, values, jnp.nan), jnp.where(mask != 0, rewards, 1e9)
    np.testing.assert_array_equal(gae(poisoned[1], poisoned[0], mask, 0.9, 0.8)[0],
                                  gae(rewards, values, mask, 0.9, 0.8)[0])


def test_whiten():
    rng = np.random.default_rng(10)
    x = rng.normal(3.0, 2.0, size=(6, 9))
    mask = random_mask(rng, 6, 9)
    m = mask / mask.sum()
    mean = (m * x).sum()
    var = (m * (x - mean) ** 2).sum()
    out = whiten(x, mask)
    np.testing.assert_allclose(out, np.where(mask != 0, (x - mean) / np.sqrt(var + 1e-8), 0), rtol=1e-5)
    np.testing.assert_allclose((m * np.asarray(out)).sum(), 0.0, atol=1e-5)
    np.testing.assert_allclose((m * np.asarray(out) ** 2).sum(), 1.0, rtol=1e-5)
    kept = whiten(x, mask, shift_mean=False)
    np.testing.assert_allclose((m * np.asarray(kept)).sum(), mean, rtol=1e-5)
    np.testing.assert_array_equal(whiten(x, np.zeros_like(mask)), 0.0)


# ----------------------------------------------------------------------------- value loss

def ref_value_loss(values, old, returns, mask, clip_eps):
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        return 0.5 * unclipped * mask, np.zeros(mask.shape, bool), (values - returns) * mask
    v_clip = np.clip(values, old - clip_eps, old + clip_eps)  # TRL's clip_by_value
    clipped = (v_clip - returns) ** 2
    active = (clipped > unclipped) & (mask != 0)
    grad = np.where(active, 0.0, values - returns) * mask
    return 0.5 * np.maximum(clipped, unclipped) * mask, active, grad


@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("clip_eps", [0.2, None])
def test_value_loss_matches_numpy(normalize, clip_eps):
    rng = np.random.default_rng(11)
    B, T = 6, 9
    mask = random_mask(rng, B, T)
    returns = rng.normal(size=(B, T))
    old = returns + rng.normal(0, 0.5, size=(B, T))
    values = old + rng.normal(0, 0.4, size=(B, T))
    per_token, active, dloss = ref_value_loss(values, old, returns, mask, clip_eps)
    if normalize == "sequence":
        w = mask.sum(1)
        total = (per_token.sum(1)[w > 0] / w[w > 0]).sum()
        count, dloss = (w > 0).sum(), dloss / np.where(w > 0, w, 1)[:, None]
    else:
        total, count = per_token.sum(), (mask.sum() if normalize == "token" else B * T)
    poisoned = lambda x: np.where(mask != 0, x, np.inf)  # noqa: E731
    f = lambda v: value_loss(v, poisoned(old), poisoned(returns), mask, clip_eps=clip_eps,  # noqa: E731
                             normalize=normalize)
    out = f(jnp.asarray(poisoned(values), jnp.float32))
    grad = jax.grad(lambda v: f(v).mean)(jnp.asarray(poisoned(values), jnp.float32))
    np.testing.assert_allclose(out.per_token_loss, per_token, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.sum, total, rtol=1e-5)
    assert out.count == count and out.token_count == mask.sum()
    assert out.clip_fraction_sum == (mask * active).sum()
    assert (out.clip_fraction_sum > 0) == (clip_eps is not None)
    np.testing.assert_allclose(grad, dloss / count, rtol=1e-5, atol=1e-7)


def test_value_loss_clip_on_hand_made_tokens():
    old = jnp.zeros((1, 4))
    returns = jnp.array([[1.0, 1.0, -1.0, 0.3]])
    values = jnp.array([[0.5, -0.5, 0.5, 0.1]])   # moved away from, toward, past R; inside ±ε
    out = value_loss(values, old, returns, jnp.ones((1, 4)), clip_eps=0.2)
    # token 0: V_clip = 0.2, (0.2-1)² = 0.64 > 0.25 → clipped; token 1: V_clip = -0.2, 1.44 < 2.25;
    # token 2: V_clip = 0.2, 1.44 < 2.25; token 3: inside, equal terms.
    np.testing.assert_allclose(out.per_token_loss, [[0.32, 1.125, 1.125, 0.02]], rtol=1e-6)
    assert out.clip_fraction_sum == 1.0


# ----------------------------------------------------------------------------- the (sum, count) contract

def sum_mean_and_grads(loss_fn, x):
    """((sum, count, mean), gradient of the sum, gradient of the mean) of ``loss_fn(x)``."""
    out = loss_fn(x)
    jac = jax.jacrev(lambda x: jnp.stack([loss_fn(x).sum, loss_fn(x).mean]))(x)
    return (out.sum, out.count, out.mean), jac[0], jac[1]


@functools.partial(jax.jit, static_argnames="normalize")
def policy_sums(lp, old, adv, mask, ref, normalize):
    return sum_mean_and_grads(lambda x: policy_loss(
        x, old, adv, mask, ref_logprobs=ref, clip_eps_high=0.28, kl_coef=0.3, kl_estimator="k3",
        normalize=normalize), lp)


@functools.partial(jax.jit, static_argnames="normalize")
def value_sums(v, old, ret, mask, normalize):
    return sum_mean_and_grads(lambda x: value_loss(x, old, ret, mask, normalize=normalize), v)


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_split_batches_add_up_to_the_whole_batch(normalize):
    """Summing (sum, count) and the gradients of the sums over two halves of the rows, then
    dividing once, gives the whole batch's mean and gradient (rows 0:3 hold the empty row and
    the one-token row, so the halves score very different numbers of tokens)."""
    r = rollout(12)
    rng = np.random.default_rng(13)
    v, v_old, ret = (rng.normal(size=r["mask"].shape) for _ in range(3))
    for fn, args in [(policy_sums, (r["logp"], r["old"], r["adv_tok"], r["mask"], r["ref"])),
                     (value_sums, (v, v_old, ret, r["mask"]))]:
        args = [jnp.asarray(a, jnp.float32) for a in args]
        (_, _, whole_mean), _, whole_grad = fn(*args, normalize=normalize)
        total = count = 0.0
        grads = []
        for rows in (slice(0, 3), slice(3, 6)):
            (s, c, _), g, _ = fn(*(a[rows] for a in args), normalize=normalize)
            total, count = total + s, count + c
            grads.append(g)
        np.testing.assert_allclose(mean_of(total, count), whole_mean, rtol=1e-6)
        np.testing.assert_allclose(jnp.concatenate(grads) * mean_of(1.0, count), whole_grad,
                                   rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_only_logprobs_and_values_get_a_gradient(normalize):
    r = {k: jnp.asarray(np.nan_to_num(v), jnp.float32) for k, v in rollout(15).items()}
    grads = jax.grad(lambda *a: policy_loss(*a[:4], ref_logprobs=a[4], kl_coef=0.2, kl_estimator="k3",
                                            normalize=normalize).mean, argnums=(0, 1, 2, 3, 4))(
        r["logp"], r["old"], r["adv_tok"], r["mask"], r["ref"])
    assert np.abs(np.asarray(grads[0])).sum() > 0
    for g in grads[1:]:
        np.testing.assert_array_equal(g, 0.0)
    grads = jax.grad(lambda *a: value_loss(*a, normalize=normalize).mean, argnums=(0, 1, 2, 3))(
        r["logp"], r["old"], r["ref"], r["mask"])
    assert np.abs(np.asarray(grads[0])).sum() > 0
    for g in grads[1:]:
        np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_zero_count_gives_zero_loss_and_zero_gradient(normalize):
    nan = jnp.full((6, 9), jnp.nan)
    mask = jnp.zeros((6, 9))
    max_len = None
    if normalize == "constant":      # count = B·L_max is 0 only for an empty batch
        nan, mask = jnp.zeros((0, 9)), jnp.zeros((0, 9))
    loss, grad = jax.value_and_grad(lambda lp: policy_loss(
        lp, nan, nan, mask, ref_logprobs=nan, kl_coef=0.1, kl_estimator="k3", normalize=normalize,
        max_len=max_len).mean)(nan)
    assert loss == 0.0 and np.all(np.asarray(grad) == 0.0)
    loss, grad = jax.value_and_grad(lambda v: value_loss(v, nan, nan, mask, normalize=normalize).mean)(nan)
    assert loss == 0.0 and np.all(np.asarray(grad) == 0.0)
    if normalize != "constant":
        out = policy_loss(nan, nan, nan, mask, ref_logprobs=nan)
        assert out.count == 0 and out.clip_fraction == 0.0 and not np.isnan(out.kl_sum)


def test_low_precision_inputs_give_float32_results():
    r = rollout(14)
    mask = r["mask"]
    lp, old, ref = (jnp.asarray(np.nan_to_num(r[k]), jnp.bfloat16) for k in ("logp", "old", "ref"))
    out = policy_loss(lp, old, r["adv_seq"], mask, ref_logprobs=ref, kl_coef=0.1)
    f32 = policy_loss(lp.astype(jnp.float32), old.astype(jnp.float32), r["adv_seq"], mask,
                      ref_logprobs=ref.astype(jnp.float32), kl_coef=0.1)
    assert all(v.dtype == jnp.float32 for v in out)
    np.testing.assert_array_equal(out.sum, f32.sum)
    grad = jax.grad(lambda x: policy_loss(x, old, r["adv_seq"], mask).mean)(lp)
    assert grad.dtype == jnp.bfloat16


@pytest.mark.parametrize("kwargs, match", [
    (dict(normalize="mean"), "normalize must be one of"),
    (dict(kl_estimator="k4", ref_logprobs=np.zeros((2, 3))), "kl_estimator must be one of"),
    (dict(loss_type="ppo2"), "loss_type must be one of"),
    (dict(importance_sampling_level="row"), "importance_sampling_level must be one of"),
    (dict(kl_coef=0.1), "kl_coef=0.1 needs ref_logprobs"),
    (dict(ref_logprobs=np.zeros((2, 4))), r"ref_logprobs has shape \(2, 4\)"),
    (dict(advantages=np.zeros(3)), "advantages must be"),
    (dict(old_logprobs=np.zeros((3, 2))), r"old_logprobs has shape \(3, 2\)"),
    (dict(loss_mask=np.ones(3)), "loss_mask has shape"),
    (dict(logprobs=np.zeros(6), old_logprobs=np.zeros(6), loss_mask=np.ones(6), advantages=np.zeros(6)),
     r"logprobs must be \[B, T\]"),
    (dict(max_len=8), "max_len is used only by normalize='constant'"),
    (dict(normalize="constant", max_len=0), "max_len must be a positive int"),
    (dict(clip_eps=-0.1), "clip_eps must be >= 0"),
    (dict(clip_eps_high=-0.1), "clip_eps_high must be >= 0"),
])
def test_policy_loss_errors(kwargs, match):
    args = dict(logprobs=np.zeros((2, 3)), old_logprobs=np.zeros((2, 3)), advantages=np.zeros(2),
                loss_mask=np.ones((2, 3)))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        policy_loss(**args)


def test_gae_and_value_loss_errors():
    with pytest.raises(ValueError, match=r"must all be the same \[B, T\]"):
        gae(np.zeros((2, 3)), np.zeros((2, 4)), np.ones((2, 3)), 1.0, 1.0)
    with pytest.raises(ValueError, match=r"returns has shape \(2, 4\)"):
        value_loss(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 4)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="normalize must be one of"):
        value_loss(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3)), np.ones((2, 3)), normalize="x")
    with pytest.raises(ValueError, match=r"mask \(2, 4\) must match x \(2, 3\)"):
        whiten(np.zeros((2, 3)), np.ones((2, 4)))
