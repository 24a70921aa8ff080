"""lm.losses.token_logprobs: the chunked (tokens × vocabulary) per-token log-probabilities, entropy
and logsumexp against the materialized log-softmax, with and without a mesh; fused_cross_entropy
as its reduction over vocabulary blocks and shards; the checked mode for out-of-range targets."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from lm import losses
from lm.losses import cross_entropy, fused_cross_entropy, token_logprobs
from lm.parallel.sharding import make_mesh

B, T, D, V = 8, 6, 16, 40
TEMP = 0.7


@pytest.fixture(scope="module")
def data():
    k = jax.random.split(jax.random.key(0), 5)
    h = jax.random.normal(k[0], (B, T, D))
    w = jax.random.normal(k[1], (D, V)) * 0.5
    t = jax.random.randint(k[2], (B, T), 0, V)
    mask = (jax.random.uniform(k[3], (B, T)) > 0.3).astype(jnp.float32)
    coef = jax.random.normal(k[4], (3, B, T))  # a random projection of the three outputs
    return h, w, t, mask, coef


def reference(h, w, t):
    x = (h @ w) / TEMP
    lp = jax.nn.log_softmax(x)
    return (jnp.take_along_axis(lp, t[..., None], -1)[..., 0], -(jnp.exp(lp) * lp).sum(-1),
            jax.nn.logsumexp(x, -1))


def project(outputs, coef):
    return sum(jnp.sum(c * v) for c, v in zip(coef, outputs))


MESHES = {"one": None, "data8": dict(data=8, fsdp=1, tensor=1), "data4_tensor2": dict(data=4, fsdp=1, tensor=2),
          "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2)}


@pytest.mark.parametrize("mesh_name,layout", [("one", "dv"), ("data8", "vd"), ("data4_tensor2", "vd"),
                                              ("data2_fsdp2_tensor2", "dv")])
def test_matches_the_materialized_log_softmax_values_and_gradients(data, mesh_name, layout):
    """Every output and its gradient (hidden and kernel), over vocabulary blocks with a tail
    (V=40 in blocks of 7 per shard) and over meshes that split rows and the vocabulary."""
    h, w, t, mask, coef = data
    sizes = MESHES[mesh_name]
    mesh = None if sizes is None else make_mesh(sizes)
    kernel = w if layout == "dv" else w.T

    def ours(h, k):
        out = token_logprobs(h, k, t, kernel_layout=layout, temperature=TEMP, entropy=True, logsumexp=True,
                             chunk_size=5, vocab_chunk_size=7, mesh=mesh, batch_axes=("data", "fsdp"),
                             vocab_axis="tensor")
        return out.logprobs, out.entropy, out.logsumexp

    def ref(h, k):
        return reference(h, k if layout == "dv" else k.T, t)

    got, want = jax.jit(ours)(h, kernel), ref(h, kernel)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    g = jax.jit(jax.grad(lambda h, k: project(ours(h, k), coef), argnums=(0, 1)))(h, kernel)
    g_ref = jax.grad(lambda h, k: project(ref(h, k), coef), argnums=(0, 1))(h, kernel)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mesh_name", ["data4_tensor2"])  # one device: tests/test_losses.py
def test_fused_cross_entropy_over_vocabulary_blocks_and_shards_equals_the_explicit_one(data, mesh_name):
    h, w, t, mask, _ = data
    sizes = MESHES[mesh_name]
    mesh = None if sizes is None else make_mesh(sizes)
    kw = dict(z_loss=1e-2, label_smoothing=0.1)
    fused = lambda h, w: fused_cross_entropy(h, w, t, mask, chunk_size=5, vocab_chunk_size=7, mesh=mesh,  # noqa: E731
                                             batch_axes=("data", "fsdp"), vocab_axis="tensor", **kw)
    explicit = lambda h, w: cross_entropy(h @ w, t, mask, **kw)  # noqa: E731
    proj = lambda o: o.mean + jnp.sum(o.per_token_loss**2) + o.nll_sum + jnp.sum(jnp.cos(o.target_logprobs))  # noqa: E731
    for p in (lambda o: o.mean, proj):
        (vf, gf), (ve, ge) = (jax.jit(jax.value_and_grad(lambda h, w: p(f(h, w)), argnums=(0, 1)))(h, w)
                              for f in (fused, explicit))
        np.testing.assert_allclose(vf, ve, rtol=1e-5)
        for a, b in zip(gf, ge):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for name, a, b in zip(losses.LossOutput._fields, jax.jit(fused)(h, w), explicit(h, w)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


def test_only_one_block_of_logits_exists_forward_or_backward():
    """With vocabulary blocks of 128 and 64-token chunks, the compiled value-and-gradient holds no
    array of a chunk's whole [64, V] logits (nor [N, V])."""
    n, d, vocab = 256, 32, 1024
    h, w = jnp.ones((n, d)), jnp.ones((d, vocab))
    t = jnp.zeros((n,), jnp.int32)
    f = jax.jit(jax.grad(lambda h, w: jnp.sum(token_logprobs(h, w, t, entropy=True, chunk_size=64,
                                                             vocab_chunk_size=128).logprobs), argnums=(0, 1)))
    hlo = f.lower(h, w).compile().as_text()
    shapes = {tuple(int(x) for x in s.split(",")) for s in re.findall(r"f32\[([0-9,]+)\]", hlo)}
    assert (64, 128) in shapes  # a block is there
    assert not [s for s in shapes if vocab in s and len(s) == 2 and s[0] in (64, n)], sorted(shapes)


def test_bf16_products_accumulate_in_f32_and_never_copy_the_kernel_to_f32():
    h = jax.random.normal(jax.random.key(1), (32, 64)).astype(jnp.bfloat16)
    w = (jax.random.normal(jax.random.key(2), (64, 96)) * 0.2).astype(jnp.bfloat16)
    t = jnp.arange(32) % 96
    f = jax.jit(jax.value_and_grad(lambda h, w: jnp.sum(token_logprobs(h, w, t).logprobs), argnums=(0, 1)))
    hlo = f.lower(h, w).compile().as_text()
    assert not re.search(r"f32\[(64,96|64,\d+|\d+,96)\]\S* convert\(bf16", hlo)  # the kernel is never converted to f32
    value, grads = f(h, w)
    want = jnp.sum(reference(h.astype(jnp.float32) * TEMP, w.astype(jnp.float32), t)[0])
    assert grads[0].dtype == grads[1].dtype == jnp.bfloat16
    np.testing.assert_allclose(value, want, rtol=1e-2)


def test_out_of_range_target_is_nan_and_the_checked_mode_names_it():
    h, w = jnp.ones((2, 3, 4)), jnp.ones((4, 5))
    t = jnp.array([[0, 1, 2], [3, 4, 7]])
    lp = token_logprobs(h, w, t).logprobs
    assert np.isnan(lp[1, 2]) and np.isfinite(lp[0]).all()
    with pytest.raises(checkify.JaxRuntimeError, match=r"target 7 at flat index 5 is outside \[0, 5\)"):
        losses.checked(jax.jit(lambda h, w, t: token_logprobs(h, w, t, checked=True).logprobs))(h, w, t)
    masked = jnp.array([[1.0, 1, 1], [1, 1, 0]])  # the bad target is masked: no error, finite loss
    out = losses.checked(lambda: fused_cross_entropy(h, w, t, masked, checked=True))()
    assert np.isfinite(out.mean)
    with pytest.raises(checkify.JaxRuntimeError, match="lm.losses.cross_entropy: target 7"):
        losses.checked(lambda: cross_entropy(h @ w, t, checked=True))()
