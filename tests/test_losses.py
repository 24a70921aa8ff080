"""Tests for lm.losses: references, invariances, and the seeds' worked numbers."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from lm.losses import (cross_entropy, entropy, fused_cross_entropy, kl_divergence, mean_of,
                       sequence_logprobs, soft_cross_entropy)

SETTINGS = settings(max_examples=25, deadline=None)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def reference_ce(logits, targets, mask, z_loss=0.0, smoothing=0.0):
    """float64 numpy: per-token loss, nll, lse."""
    x = np.asarray(logits, np.float64)
    top = x.max(-1, keepdims=True)
    lse = (top + np.log(np.exp(x - top).sum(-1, keepdims=True)))[..., 0]
    logp = x - lse[..., None]
    nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    loss = (1 - smoothing) * nll - smoothing * logp.mean(-1) + z_loss * lse**2
    mask = np.asarray(mask, np.float64)
    return loss * mask, nll, lse


# A few shapes (each one compiles once), everything else drawn freely.
SHAPES = [((), 7), ((5,), 2), ((2, 3), 33)]  # (token shape, V)


@jax.jit
def ce_jit(logits, targets, mask, z_loss, smoothing):
    return cross_entropy(logits, targets, mask, z_loss=z_loss, label_smoothing=smoothing)


@jax.jit
def ce_value_and_grad(logits, targets, mask, z_loss, smoothing):
    return jax.value_and_grad(lambda x: ce_jit(x, targets, mask, z_loss, smoothing).mean)(logits)


optax_ce_jit = jax.jit(optax.softmax_cross_entropy_with_integer_labels)


@st.composite
def ce_cases(draw):
    shape, vocab = draw(st.sampled_from(SHAPES))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=shape + (vocab,)) * draw(st.sampled_from([0.1, 3.0, 30.0]))
    targets = rng.integers(0, vocab, size=shape)
    mask = rng.choice([0.0, 0.5, 1.0, 2.0], size=shape) if draw(st.booleans()) else np.ones(shape)
    return logits, targets, mask


def as_dtype(x, name):
    """Logits in `name` and the exact f64 values they hold."""
    arr = jnp.asarray(x, DTYPES[name])
    return arr, np.asarray(arr.astype(jnp.float32), np.float64)


# --------------------------------------------------------------- references


@SETTINGS
@given(ce_cases(), st.sampled_from(list(DTYPES)), st.sampled_from([0.0, 1e-3]),
       st.sampled_from([0.0, 0.1]))
def test_matches_float64_reference(case, dtype, z_loss, smoothing):
    logits, targets, mask = case
    x, x64 = as_dtype(logits, dtype)
    out = ce_jit(x, targets, mask, z_loss, smoothing)
    per_token, nll, lse = reference_ce(x64, targets, mask, z_loss, smoothing)
    assert out.sum.dtype == out.per_token_loss.dtype == out.target_logprobs.dtype == jnp.float32
    np.testing.assert_allclose(out.per_token_loss, per_token, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out.target_logprobs, -nll, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out.sum, per_token.sum(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out.count, np.sum(mask), rtol=1e-6)
    np.testing.assert_allclose(out.nll_sum, (nll * mask).sum(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out.z_loss_sum, (z_loss * lse**2 * mask).sum(), rtol=1e-5, atol=1e-4)
    expected_mean = per_token.sum() / mask.sum() if mask.sum() else 0.0
    np.testing.assert_allclose(out.mean, expected_mean, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(ce_cases())
def test_matches_optax_with_all_ones_mask(case):
    logits, targets, _ = case
    out = ce_jit(jnp.asarray(logits, jnp.float32), targets, np.ones(targets.shape), 0.0, 0.0)
    ref = optax_ce_jit(jnp.asarray(logits, jnp.float32), targets)
    np.testing.assert_allclose(out.per_token_loss, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.mean, ref.mean(), rtol=1e-5, atol=1e-5)


@jax.jit
def three_ways(logits, targets, smoothing):
    """optax's smoothed CE, ours against the smoothed distribution, and ours with label_smoothing."""
    soft = optax.smooth_labels(jax.nn.one_hot(targets, logits.shape[-1]), smoothing)
    return (optax.softmax_cross_entropy(logits, soft), soft_cross_entropy(logits, soft).per_token,
            cross_entropy(logits, targets, label_smoothing=smoothing).per_token_loss)


@pytest.mark.parametrize("smoothing", [0.1, 0.5])
def test_label_smoothing_is_the_mixture_with_uniform(smoothing):
    logits = jax.random.normal(jax.random.PRNGKey(0), (4, 7, 11)) * 3
    targets = jax.random.randint(jax.random.PRNGKey(1), (4, 7), 0, 11)
    expected, soft, ours = three_ways(logits, targets, smoothing)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(soft, expected, rtol=1e-5)


def test_z_loss_is_coef_times_lse_squared_and_reported_separately():
    logits = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 33)) * 4
    targets = jnp.arange(6).reshape(2, 3)
    mask = jnp.ones((2, 3))
    plain, with_z = ce_jit(logits, targets, mask, 0.0, 0.0), ce_jit(logits, targets, mask, 1e-2, 0.0)
    lse = jax.nn.logsumexp(logits, axis=-1)
    np.testing.assert_allclose(with_z.z_loss_sum, 1e-2 * jnp.sum(lse**2), rtol=1e-6)
    np.testing.assert_allclose(with_z.sum, plain.sum + with_z.z_loss_sum, rtol=1e-6)
    np.testing.assert_allclose(with_z.nll_sum, plain.nll_sum, rtol=1e-6)
    assert float(plain.z_loss_sum) == 0.0


def test_weighted_accuracy():
    logits = jnp.array([[3.0, 0.0], [0.0, 3.0], [3.0, 0.0]])
    out = cross_entropy(logits, jnp.array([0, 0, 1]), jnp.array([2.0, 1.0, 1.0]))
    assert float(out.correct_sum) == 2.0 and float(out.accuracy) == 0.5


# --------------------------------------------------------------- masks


@SETTINGS
@given(ce_cases(), st.sampled_from([0.0, 1e-3]), st.sampled_from([0.0, 0.2]))
def test_masked_positions_have_zero_gradient_and_targets_do_not_matter(case, z_loss, smoothing):
    logits, targets, mask = case
    mask = np.where(np.arange(mask.size).reshape(mask.shape) % 2 == 0, 0.0, mask)  # some masked
    x = jnp.asarray(logits, jnp.float32)
    vocab = logits.shape[-1]
    other = np.where(mask == 0, (targets + 1) % vocab, targets)  # masked targets changed
    v1, g1 = ce_value_and_grad(x, targets, mask, z_loss, smoothing)
    v2, g2 = ce_value_and_grad(x, other, mask, z_loss, smoothing)
    assert np.all(np.asarray(g1)[mask == 0] == 0.0)
    assert float(v1) == float(v2) and np.array_equal(g1, g2)
    garbage = np.where(mask == 0, -7, targets)  # even out of range
    np.testing.assert_array_equal(ce_jit(x, garbage, mask, z_loss, smoothing).per_token_loss,
                                  ce_jit(x, targets, mask, z_loss, smoothing).per_token_loss)


@pytest.mark.parametrize("fn", ["explicit", "fused"])
def test_zero_count_gives_zero_loss_and_zero_gradient(fn):
    h = jax.random.normal(jax.random.PRNGKey(3), (6, 4))
    w = jax.random.normal(jax.random.PRNGKey(4), (4, 10))
    t, mask = jnp.arange(6), jnp.zeros(6)

    def loss(h, w):
        if fn == "fused":
            return fused_cross_entropy(h, w, t, mask, chunk_size=4, z_loss=1e-3, label_smoothing=0.1)
        return cross_entropy(h @ w, t, mask, z_loss=1e-3, label_smoothing=0.1)

    value, grads = jax.jit(jax.value_and_grad(lambda h, w: loss(h, w).mean, argnums=(0, 1)))(h, w)
    assert float(value) == 0.0
    for g in grads:
        assert np.all(np.asarray(g) == 0.0)


def test_mean_of_is_safe():
    value, grad = jax.value_and_grad(mean_of, argnums=(0, 1))(3.0, 0.0)
    assert float(value) == 0.0 and float(grad[0]) == 0.0 and float(grad[1]) == 0.0
    value, grad = jax.value_and_grad(mean_of, argnums=(0, 1))(3.0, 2.0)
    assert float(value) == 1.5 and float(grad[0]) == 0.5 and float(grad[1]) == -0.75
    grads = jnp.array([1.0, -3.0], jnp.bfloat16)  # the trainer divides gradient sums too
    assert mean_of(grads, 2.0).dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(mean_of(grads, 2.0), np.float32), [0.5, -1.5])
    np.testing.assert_array_equal(mean_of(grads, 0.0).astype(jnp.float32), [0.0, 0.0])


def test_out_of_range_target_is_nan_unless_masked():
    logits = jnp.zeros((2, 4))
    assert np.isnan(float(cross_entropy(logits, jnp.array([1, 9])).sum))
    out = cross_entropy(logits, jnp.array([1, 9]), jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(out.sum, math.log(4), rtol=1e-6)


# --------------------------------------------------------------- (sum, count) splitting


@jax.jit
def piece_sum_count_grad(w, h, t, mask):
    """What one micro-batch contributes: (sum, count) and d sum / d w."""
    out, grad = jax.value_and_grad(lambda w: cross_entropy(h @ w, t, mask, z_loss=1e-3).sum)(w)
    return out, jnp.sum(mask), grad


@jax.jit
def whole_batch_loss_and_grad(w, h, t, mask):
    return jax.value_and_grad(lambda w: cross_entropy(h @ w, t, mask, z_loss=1e-3).mean)(w)


@SETTINGS
@given(st.integers(0, 2**16), st.lists(st.integers(1, 5), min_size=1, max_size=4))
def test_split_batches_add_up_to_the_whole_batch(seed, cut_points):
    """Σ over micro-batches of (sum, count), divided once == the whole batch, value and grad."""
    rng = np.random.default_rng(seed)
    n, d, vocab = 6, 3, 5
    h = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(d, vocab)).astype(np.float32)
    t = rng.integers(0, vocab, n).astype(np.int32)
    mask = rng.choice([0.0, 1.0], size=n, p=[0.4, 0.6]).astype(np.float32)
    cuts = [0] + sorted(set(cut_points)) + [n]
    pieces = [piece_sum_count_grad(w, h[a:b], t[a:b], mask[a:b]) for a, b in zip(cuts, cuts[1:])]
    total_sum, total_count = sum(p[0] for p in pieces), sum(p[1] for p in pieces)
    split_loss = mean_of(total_sum, total_count)
    split_grad = sum(p[2] for p in pieces) * mean_of(1.0, total_count)  # accumulate, divide once

    whole_loss, whole_grad = whole_batch_loss_and_grad(w, h, t, mask)
    np.testing.assert_allclose(split_loss, whole_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(split_grad, whole_grad, rtol=1e-5, atol=1e-6)


def test_mean_of_means_is_the_bug_the_convention_prevents():
    logits = jnp.array([[2.0, 0.0], [0.0, 2.0], [0.0, 2.0], [0.0, 2.0], [1.0, 0.0]])
    t = jnp.zeros(5, jnp.int32)
    whole = ce_jit(logits, t, jnp.ones(5), 0.0, 0.0).mean
    first = ce_jit(logits, t, jnp.array([1.0, 0, 0, 0, 0]), 0.0, 0.0)  # micro-batch 1: token 0
    second = ce_jit(logits, t, jnp.array([0, 1.0, 1, 1, 1]), 0.0, 0.0)  # micro-batch 2: the rest
    naive = (first.mean + second.mean) / 2  # what per-micro-batch averaging trainers compute
    right = mean_of(first.sum + second.sum, first.count + second.count)
    np.testing.assert_allclose(right, whole, rtol=1e-6)
    assert abs(float(naive) - float(whole)) > 0.1


# --------------------------------------------------------------- the seeds' numbers


@pytest.mark.parametrize("prob, expected, places", [
    (0.7, 0.3567, 4), (0.1, 2.3026, 4), (0.0001, 9.21, 2), (0.78, 0.2485, 4),
    (0.99, 0.01, 2), (0.01, 4.61, 2), (1.0, 0.0, 6), (0.3, 1.2040, 4)])
def test_seed_numbers(prob, expected, places):
    """−log p(correct token) for the probabilities the seeds work through."""
    loss = float(loss_of_probability(prob))
    assert abs(loss - expected) <= 0.5 * 10.0**-places  # rounds to the seed's number
    assert loss == pytest.approx(-math.log(prob), abs=1e-6)


@jax.jit
def loss_of_probability(prob):
    """Loss when the correct token gets `prob` in a 50,000-token vocabulary (seed 004)."""
    vocab = 50_000
    rest = jnp.maximum((1.0 - prob) / (vocab - 1), 1e-30)
    logits = jnp.log(jnp.full((vocab,), rest).at[0].set(prob))
    return cross_entropy(logits, jnp.array(0)).mean


def test_three_classes_cat_dog_bird():
    probs = jnp.array([[0.70, 0.20, 0.10], [0.10, 0.80, 0.10]])  # 猫/犬/鳥, good and bad prediction
    out = cross_entropy(jnp.log(probs), jnp.array([0, 0]))  # correct class: 猫
    np.testing.assert_allclose(out.per_token_loss, [0.3567, 2.3026], atol=5e-5)
    np.testing.assert_allclose(out.accuracy, 0.5)
    onehot = jax.nn.one_hot(jnp.array([0, 0]), 3)
    np.testing.assert_allclose(soft_cross_entropy(jnp.log(probs), onehot).per_token,
                               out.per_token_loss, rtol=1e-6)


def test_sentence_average_and_the_penalized_paraphrase():
    probs = jnp.array([0.70, 0.95, 0.80])  # 椅子 / の上 / に: the mean, not a sum, over 3 steps
    out = cross_entropy(jnp.log(jnp.stack([probs, 1 - probs], -1)), jnp.zeros(3, jnp.int32))
    np.testing.assert_allclose(out.per_token_loss, [0.3567, 0.0513, 0.2231], atol=5e-5)
    np.testing.assert_allclose(out.mean, (0.3567 + 0.0513 + 0.2231) / 3, atol=5e-5)
    # "Paris" 0.5 but the data says "The" 0.3: penalized although the argmax is a right answer.
    paris = cross_entropy(jnp.log(jnp.array([0.5, 0.3, 0.2])), jnp.array(1))
    np.testing.assert_allclose(paris.mean, 1.2040, atol=5e-5)
    assert float(paris.accuracy) == 0.0


def test_dice_mle_recovers_empirical_frequencies():
    """Minimizing CE over free logits for 20 throws gives counts/20, and min CE = H(p̂)."""
    counts = np.array([3, 4, 2, 5, 1, 5])
    throws = jnp.asarray(np.repeat(np.arange(6), counts))
    loss = jax.jit(lambda theta: cross_entropy(jnp.broadcast_to(theta, (20, 6)), throws).mean)

    @jax.jit
    def fit(theta):
        return jax.lax.fori_loop(0, 500, lambda _, th: th - 2.0 * jax.grad(loss)(th), theta)

    theta = fit(jnp.zeros(6))
    freq = counts / 20
    np.testing.assert_allclose(jax.nn.softmax(theta), freq, atol=1e-4)
    np.testing.assert_allclose(loss(theta), -(freq * np.log(freq)).sum(), atol=1e-6)
    np.testing.assert_allclose(loss(theta), jax.jit(entropy)(jnp.log(freq)).mean, atol=1e-6)


# --------------------------------------------------------------- dtypes and magnitudes


def test_bf16_logits_give_the_f32_answer_to_bf16_tolerance():
    logits = jax.random.normal(jax.random.PRNGKey(5), (2, 3, 33)) * 4
    targets = jax.random.randint(jax.random.PRNGKey(6), (2, 3), 0, 33)
    mask = jnp.ones(targets.shape)
    f32 = ce_jit(logits, targets, mask, 0.0, 0.0)
    bf16 = ce_jit(logits.astype(jnp.bfloat16), targets, mask, 0.0, 0.0)
    assert bf16.sum.dtype == jnp.float32
    np.testing.assert_allclose(bf16.mean, f32.mean, rtol=2e-2)
    np.testing.assert_allclose(bf16.per_token_loss, f32.per_token_loss, rtol=5e-2, atol=5e-2)
    _, grad = ce_value_and_grad(logits.astype(jnp.bfloat16), targets, mask, 0.0, 0.0)
    assert grad.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(grad, np.float32)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_huge_logits_stay_finite(dtype):
    logits = jax.random.normal(jax.random.PRNGKey(7), (2, 3, 33)) * 1e4
    x, x64 = as_dtype(logits, dtype)
    targets = jnp.array([[0, 1, 2], [3, 4, 5]])
    value, grad = ce_value_and_grad(x, targets, np.ones((2, 3)), 1e-4, 0.1)
    per_token, _, _ = reference_ce(x64, targets, np.ones((2, 3)), 1e-4, 0.1)
    np.testing.assert_allclose(value, per_token.mean(), rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))


# --------------------------------------------------------------- fused


PROJECTIONS = {  # functions of the outputs that a caller may differentiate
    "mean": lambda o: o.mean,
    "logprobs": lambda o: jnp.sum(o.target_logprobs * jnp.cos(jnp.arange(o.target_logprobs.size))
                                  .reshape(o.target_logprobs.shape)),
    "all": lambda o: jnp.sum(o.per_token_loss**2) + o.sum + o.nll_sum + 3.0 * o.z_loss_sum
    + jnp.sum(o.target_logprobs),
}
FUSED_CASES = [  # (N, chunk, layout, z_loss, label_smoothing)
    (23, 5, "dv", 1e-2, 0.1),  # N not divisible by the chunk
    (7, 16, "vd", 1e-2, 0.2),  # tied-embedding layout [V, D]; chunk larger than N
]


@functools.lru_cache(maxsize=None)
def fused_vs_explicit(chunk, layout, z_loss, smoothing):
    """A jitted function: outputs, and (value, grads) of every projection, both ways."""
    kw = dict(z_loss=z_loss, label_smoothing=smoothing)
    fused = lambda h, w, t, m: fused_cross_entropy(h, w, t, m, chunk_size=chunk,
                                                   kernel_layout=layout, **kw)
    explicit = lambda h, w, t, m: cross_entropy(h @ (w if layout == "dv" else w.T), t, m, **kw)

    def both(h, w, t, m):
        results = []
        for loss in (fused, explicit):
            grads = {name: jax.value_and_grad(lambda h, w: proj(loss(h, w, t, m)), argnums=(0, 1))(h, w)
                     for name, proj in PROJECTIONS.items()}
            results.append((loss(h, w, t, m), grads))
        return results

    return jax.jit(both)


@settings(max_examples=10, deadline=None)
@given(st.sampled_from(FUSED_CASES), st.integers(0, 2**16))
def test_fused_matches_explicit_values_and_gradients(case, seed):
    n, chunk, layout, z_loss, smoothing = case
    rng = np.random.default_rng(seed)
    d, vocab = 8, 13
    h = rng.normal(size=(n, d)).astype(np.float32)
    w = (rng.normal(size=(d, vocab) if layout == "dv" else (vocab, d)) * 0.5).astype(np.float32)
    t = rng.integers(0, vocab, n).astype(np.int32)
    mask = rng.choice([0.0, 1.0, 2.5], size=n).astype(np.float32)
    (out_f, grads_f), (out_e, grads_e) = fused_vs_explicit(chunk, layout, z_loss, smoothing)(h, w, t, mask)
    for name, a, b in zip(out_e._fields, out_f, out_e):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
    assert np.all(np.asarray(grads_f["mean"][1][0])[mask == 0] == 0.0)  # d mean / d hidden
    for name in PROJECTIONS:
        (vf, gf), (ve, ge) = grads_f[name], grads_e[name]
        np.testing.assert_allclose(vf, ve, rtol=1e-5, atol=1e-5, err_msg=name)
        for a, b in zip(gf, ge):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


def test_fused_accepts_batch_dims():
    k = jax.random.split(jax.random.PRNGKey(8), 4)
    h = jax.random.normal(k[0], (2, 5, 8))
    w = jax.random.normal(k[1], (8, 11))
    t = jax.random.randint(k[2], (2, 5), 0, 11)
    mask = (jax.random.uniform(k[3], (2, 5)) > 0.3).astype(jnp.float32)

    @jax.jit
    def both(h, w):
        fused = lambda h, w: fused_cross_entropy(h, w, t, mask, chunk_size=3)
        explicit = lambda h, w: cross_entropy(h @ w, t, mask)
        grad = lambda f: jax.grad(lambda h, w: (f(h, w).mean, f(h, w)), argnums=(0, 1),
                                  has_aux=True)(h, w)
        return grad(fused), grad(explicit)

    (grads_f, fused), (grads_e, explicit) = both(h, w)
    assert fused.per_token_loss.shape == fused.target_logprobs.shape == (2, 5)
    np.testing.assert_allclose(fused.per_token_loss, explicit.per_token_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_f, grads_e):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fused_bf16_params_give_bf16_gradients_close_to_f32():
    k = jax.random.split(jax.random.PRNGKey(9), 3)
    h, w = jax.random.normal(k[0], (16, 32)), jax.random.normal(k[1], (32, 50)) * 0.2
    t = jax.random.randint(k[2], (16,), 0, 50)
    loss = jax.jit(jax.value_and_grad(lambda h, w: fused_cross_entropy(h, w, t, chunk_size=5).mean,
                                      argnums=(0, 1)))
    v32, g32 = loss(h, w)
    v16, g16 = loss(h.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert v16.dtype == jnp.float32 and g16[0].dtype == g16[1].dtype == jnp.bfloat16
    np.testing.assert_allclose(v16, v32, rtol=2e-2)
    for a, b in zip(g16, g32):
        np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=2e-2 * float(jnp.abs(b).max()))


def test_fused_validates_shapes():
    with pytest.raises(ValueError, match="kernel"):
        fused_cross_entropy(jnp.zeros((4, 8)), jnp.zeros((9, 3)), jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match="kernel_layout"):
        fused_cross_entropy(jnp.zeros((4, 8)), jnp.zeros((8, 3)), jnp.zeros(4, jnp.int32),
                            kernel_layout="x")
    with pytest.raises(ValueError, match="targets"):
        cross_entropy(jnp.zeros((4, 8)), jnp.zeros(5, jnp.int32))


# --------------------------------------------------------------- distributions


@jax.jit
def distribution_terms(p_logits, q_logits, mask):
    return (soft_cross_entropy(q_logits, jax.nn.softmax(p_logits), mask), entropy(p_logits, mask),
            kl_divergence(p_logits, q_logits, mask), kl_divergence(q_logits, p_logits, mask))


@SETTINGS
@given(st.integers(0, 2**16), st.sampled_from([2, 9, 30]), st.sampled_from([0.3, 3.0, 20.0]))
def test_cross_entropy_is_entropy_plus_kl(seed, vocab, scale):
    rng = np.random.default_rng(seed)
    p_logits = (rng.normal(size=(3, vocab)) * scale).astype(np.float32)
    q_logits = (rng.normal(size=(3, vocab)) * scale).astype(np.float32)
    mask = rng.choice([0.0, 1.0], size=3).astype(np.float32)
    h_pq, h_p, kl, reverse_kl = distribution_terms(p_logits, q_logits, mask)
    np.testing.assert_allclose(h_pq.per_token, h_p.per_token + kl.per_token, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(h_pq.sum, h_p.sum + kl.sum, rtol=1e-4, atol=1e-4)
    assert np.all(np.asarray(kl.per_token) >= -1e-5)
    assert np.all(np.asarray(reverse_kl.per_token) >= -1e-5)
    assert np.all(np.asarray(h_pq.per_token)[np.asarray(mask) == 0] == 0)


def test_kl_is_zero_on_itself_and_asymmetric():
    p = jnp.log(jnp.array([0.7, 0.2, 0.1]))
    q = jnp.log(jnp.array([1 / 3, 1 / 3, 1 / 3]))
    assert float(kl_divergence(p, p).mean) == pytest.approx(0.0, abs=1e-7)
    forward = float(kl_divergence(p, q).mean)  # Σ p log(p/q)
    reverse = float(kl_divergence(q, p).mean)
    assert forward == pytest.approx(math.log(3) - 0.8018185, abs=1e-5)
    assert reverse == pytest.approx(sum(math.log((1 / 3) / pi) / 3 for pi in (0.7, 0.2, 0.1)), abs=1e-5)
    assert abs(forward - reverse) > 0.02


def test_entropy_values_and_excluded_tokens():
    entropy_and_grad = jax.jit(jax.value_and_grad(lambda x: entropy(x).mean))
    assert float(entropy_and_grad(jnp.zeros(4))[0]) == pytest.approx(math.log(4), rel=1e-6)
    logits = jnp.array([0.0, 0.0, -jnp.inf, -jnp.inf])  # e.g. after top-k filtering
    value, grad = entropy_and_grad(logits)
    assert float(value) == pytest.approx(math.log(2), rel=1e-6)
    assert np.all(np.isfinite(grad[:2]))


def test_sequence_logprobs_ignores_masked_positions():
    logprobs = jnp.array([[-1.0, -2.0, jnp.nan], [-0.5, -0.5, -0.5]])
    mask = jnp.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    np.testing.assert_allclose(sequence_logprobs(logprobs, mask), [-3.0, -1.0])
