"""The Transformer: causality, packed documents, logical axes, counts, numerics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.model import (Block, ModelConfig, Transformer, flops_per_token, matmul_params, matmuls, param_count, rotary,
                      swiglu)
from lm.model.cpu import FusedAttention, FusedMLP, for_decoding, fuse_block

CFG = ModelConfig(vocab_size=37, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48)


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def forward(model):
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    fn = jax.jit(lambda p, x, pos, seg: nnx.merge(graphdef, p)(x, pos, seg))
    return lambda x, pos, seg: fn(params, x, pos, seg)


def _row(tokens):
    t = len(tokens)
    return (jnp.array([tokens], jnp.int32), jnp.arange(t, dtype=jnp.int32)[None], jnp.ones((1, t), jnp.int32))


def test_changing_a_token_changes_no_earlier_logit(forward):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, 12).tolist()
    base = forward(*_row(tokens))
    for t in (0, 5, 11):
        changed = list(tokens)
        changed[t] = (changed[t] + 1) % CFG.vocab_size
        out = forward(*_row(changed))
        np.testing.assert_array_equal(out[0, :t], base[0, :t])
        assert not np.allclose(out[0, t], base[0, t])


def test_packed_row_equals_each_document_alone(forward):
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (5, 3, 6)]
    inputs = sum(docs, []) + [0, 0]  # two padding slots at the end
    segs = sum([[i + 1] * len(d) for i, d in enumerate(docs)], []) + [0, 0]
    pos = sum([list(range(len(d))) for d in docs], []) + [0, 0]
    packed = forward(jnp.array([inputs]), jnp.array([pos]), jnp.array([segs]))
    start = 0
    for d in docs:
        alone = forward(*_row(d))
        np.testing.assert_allclose(packed[0, start:start + len(d)], alone[0], atol=1e-5, rtol=1e-5)
        start += len(d)
    assert np.isfinite(np.asarray(packed)).all()  # padding queries attend to nothing, still finite


def test_rotary_rotates_half_pairs_by_position_times_frequency():
    """Reference in complex numbers: (a + ib) · e^{i·pos·θ^(−2j/d)} for the pair (x_j, x_{j+d/2})."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 3, 8)).astype(np.float32)
    positions = rng.integers(0, 1000, (2, 5)).astype(np.int32)
    half = 4
    freq = 10_000.0 ** (-np.arange(half) / half)
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * positions[..., None, None] * freq)
    want = np.concatenate([z.real, z.imag], axis=-1)
    np.testing.assert_allclose(rotary(jnp.asarray(x), jnp.asarray(positions), 10_000.0), want, atol=2e-4)


def test_rotary_scores_depend_only_on_the_position_difference():
    rng = np.random.default_rng(1)
    q, k = (jnp.asarray(rng.standard_normal((1, 1, 2, 16)), jnp.float32) for _ in range(2))
    def score(pq, pk):
        return jnp.sum(rotary(q, jnp.array([[pq]]), 10_000.0) * rotary(k, jnp.array([[pk]]), 10_000.0), -1)
    np.testing.assert_allclose(score(7, 3), score(107, 103), rtol=1e-4, atol=1e-5)
    assert not np.allclose(score(7, 3), score(7, 4), atol=1e-3)


def test_swiglu_gradients_equal_autodiff_and_it_saves_only_its_inputs():
    rng = np.random.default_rng(2)
    gate, up, grad = (jnp.asarray(3 * rng.standard_normal((64, 24)), jnp.float32) for _ in range(3))
    reference = lambda g, u: jax.nn.silu(g) * u  # noqa: E731
    out, vjp = jax.vjp(swiglu, gate, up)
    ref_out, ref_vjp = jax.vjp(reference, gate, up)
    np.testing.assert_allclose(out, ref_out, rtol=1e-6, atol=1e-6)
    for got, want in zip(vjp(grad), ref_vjp(grad)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # what the forward pass keeps for the backward: swiglu its two inputs, autodiff more
    saved = lambda f: len(jax.tree.leaves(jax.vjp(f, gate, up)[1]))  # noqa: E731
    assert saved(swiglu) == 2 < saved(reference)


@pytest.mark.parametrize("n", [1, 3])
def test_matmuls_gradients_equal_autodiff(n):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((40, 24)), jnp.float32)
    ws = [jnp.asarray(rng.standard_normal((24, 8 * (i + 1))), jnp.float32) for i in range(n)]
    grads = [jnp.asarray(rng.standard_normal((40, w.shape[1])), jnp.float32) for w in ws]
    out, vjp = jax.vjp(matmuls, x, *ws)
    ref_out, ref_vjp = jax.vjp(lambda x, *ws: tuple(x @ w for w in ws), x, *ws)
    for got, want in zip(out, ref_out):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for got, want in zip(vjp(tuple(grads)), ref_vjp(tuple(grads))):  # dx (summed over the weights), each dW
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("row_blocks", [1, 2, 3])  # 3 divides only mlp_dim here: the rest stay 1 block
def test_a_block_with_fused_projections_gives_the_same_output(row_blocks):
    block = Block(CFG, rngs=nnx.Rngs(4))
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 6, CFG.d_model)), jnp.float32)
    pos = jnp.tile(jnp.arange(6, dtype=jnp.int32), (2, 1))
    seg = jnp.ones((2, 6), jnp.int32)
    want, _ = block(x, pos, seg, pos)
    fused = fuse_block(nnx.clone(block), row_blocks=row_blocks)
    d, qkv, f = CFG.d_model, (CFG.num_heads + 2 * CFG.num_kv_heads) * CFG.head_dim_, CFG.mlp_dim
    split = lambda rows, n: (row_blocks, rows // row_blocks, n) if rows % row_blocks == 0 else (1, rows, n)  # noqa: E731
    assert isinstance(fused.attn, FusedAttention) and isinstance(fused.mlp, FusedMLP)
    assert not hasattr(fused.attn, "wq") and fused.attn.wqkv.shape == split(d, qkv)
    assert not hasattr(fused.attn, "wo") and fused.attn.wo_blocks.shape == split(CFG.num_heads * CFG.head_dim_, d)
    assert not hasattr(fused.mlp, "w_up") and fused.mlp.w_gate_up.shape == split(d, 2 * f)
    assert not hasattr(fused.mlp, "w_down") and fused.mlp.w_down_blocks.shape == split(f, d)
    got, _ = fused(x, pos, seg, pos)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_layer", [True, False], ids=["per-layer", "stacked"])
def test_the_decode_layout_is_a_copy_with_the_same_logits(model, per_layer):
    """for_decoding re-lays out a copy: same logits through the same forward pass, the model untouched."""
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    decoding = for_decoding(model, per_layer=per_layer, row_blocks=2)
    assert decoding.per_layer == per_layer and not model.per_layer
    x = jnp.asarray(np.random.default_rng(5).integers(0, CFG.vocab_size, (2, 9)), jnp.int32)
    pos = jnp.tile(jnp.arange(9, dtype=jnp.int32), (2, 1))
    seg = jnp.ones((2, 9), jnp.int32)
    np.testing.assert_allclose(decoding(x, pos, seg), model(x, pos, seg), rtol=1e-5, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model)), before)


def test_every_parameter_has_logical_axes_matching_its_rank(model):
    _, state = nnx.split(model)
    for path, var in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        axes = var.get_metadata()["logical_axes"]
        assert len(axes) == var.shape.__len__(), (path, axes, var.shape)
        if any(getattr(k, "key", None) == "blocks" for k in path):
            assert axes[0] == "layers" and var.shape[0] == CFG.num_layers


@pytest.mark.parametrize("tie", [True, False])
def test_parameter_and_flop_counts(tie):
    cfg = ModelConfig(**{**CFG.__dict__, "tie_embeddings": tie})
    params = nnx.to_pure_dict(nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))[1])
    d, f, h, k, hd, v, layers = 32, 48, 4, 2, 8, 37, 2
    per_layer = d * hd * (2 * h + 2 * k) + 3 * d * f + 2 * d
    expected = v * d + layers * per_layer + d + (0 if tie else d * v)
    assert param_count(params) == expected
    assert matmul_params(cfg) == layers * (d * hd * (2 * h + 2 * k) + 3 * d * f) + d * v
    flops = flops_per_token(cfg, seq_len=16)
    assert flops["model"] == 6 * matmul_params(cfg)
    assert flops["attention"] == 12 * layers * 16 * h * hd / 2  # causal: half of the T×T products


def test_hidden_states_then_projection_equals_logits(model):
    x, pos, seg = _row([1, 2, 3, 4])
    hidden = model.hidden_states(x, pos, seg)
    np.testing.assert_allclose(model.logits_from_hidden(hidden), model(x, pos, seg), atol=1e-6)
    kernel, layout = model.output_kernel()
    assert layout == "vd" and kernel.shape == (CFG.vocab_size, CFG.d_model)


def test_bfloat16_compute_is_close_to_float32():
    cfg16 = ModelConfig(**{**CFG.__dict__, "dtype": "bfloat16"})
    m32, m16 = Transformer(CFG, rngs=nnx.Rngs(0)), Transformer(cfg16, rngs=nnx.Rngs(0))
    x, pos, seg = _row(list(range(10)))
    out32, out16 = m32(x, pos, seg), m16(x, pos, seg)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(out16.astype(jnp.float32), out32, atol=0.1, rtol=0.05)


def test_remat_changes_nothing_but_memory():
    cfg_r = ModelConfig(**{**CFG.__dict__, "remat": True})
    x, pos, seg = _row(list(range(9)))

    def loss(cfg):
        gd, p = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
        p = nnx.to_pure_dict(p)
        f = lambda p: nnx.merge(gd, p)(x, pos, seg).astype(jnp.float32).std()
        return jax.value_and_grad(f)(p)

    (v1, g1), (v2, g2) = loss(CFG), loss(cfg_r)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g2)


@pytest.mark.parametrize("variant", [dict(attention_block=8), dict(attention_block=4, scan_layers=False)])
def test_causal_blocks_and_unrolled_layers_change_no_number(variant):
    """Blocked attention skips only masked keys and unrolling only reorganizes the program:
    logits and gradients of a packed row are those of the plain model."""
    rng = np.random.default_rng(3)
    segs = jnp.array([[1] * 10 + [2] * 9 + [3] * 3 + [0] * 2, [1] * 24])
    pos = jnp.array([list(range(10)) + list(range(9)) + list(range(3)) + [0, 0], list(range(24))])
    x = jnp.array(rng.integers(0, CFG.vocab_size, (2, 24)), jnp.int32)
    cfg = ModelConfig(**{**CFG.__dict__, **variant})

    def run(cfg):
        gd, p = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
        p = nnx.to_pure_dict(p)
        f = lambda p: nnx.merge(gd, p)(x, pos, segs).astype(jnp.float32)
        out = f(p)
        grads = jax.grad(lambda p: (f(p) * jnp.cos(jnp.arange(CFG.vocab_size))).sum())(p)
        return out, grads

    (o1, g1), (o2, g2) = run(CFG), run(cfg)
    np.testing.assert_allclose(o2, o1, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g2, g1)


def test_initial_loss_is_near_uniform(model):
    x, pos, seg = _row(list(range(20)))
    logp = jax.nn.log_softmax(model(x, pos, seg))
    assert abs(float(-logp.mean()) - math.log(CFG.vocab_size)) < 1.0


@pytest.mark.parametrize("bad, match", [
    (dict(num_heads=3), "does not divide"),
    (dict(num_kv_heads=3), "must divide"),
    (dict(d_model=0), "d_model"),
    (dict(dtype="float16"), "dtype"),
    (dict(attention_block=-1), "attention_block"),
])
def test_impossible_shapes_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**CFG.__dict__, **bad})


def test_default_rope_frequencies_are_theta_powers_and_llama3_rescales_only_long_waves():
    from lm.model import rope_frequencies
    cfg = ModelConfig(vocab_size=8, d_model=64, num_heads=2, num_kv_heads=1, mlp_dim=8, rope_theta=500_000.0)
    plain = np.asarray(rope_frequencies(cfg))
    np.testing.assert_allclose(plain, 500_000.0 ** (-np.arange(16) / 16), rtol=1e-6)
    llama3 = ModelConfig(**{**cfg.__dict__, "rope_scaling": "llama3", "rope_factor": 8.0, "rope_low_freq_factor": 1.0,
                            "rope_high_freq_factor": 4.0, "rope_original_max_position": 64})
    scaled = np.asarray(rope_frequencies(llama3))
    wavelen = 2 * np.pi / plain
    short, long_ = wavelen < 64 / 4, wavelen > 64 / 1
    assert short.any() and long_.any() and (~short & ~long_).any()  # all three bands present
    np.testing.assert_array_equal(scaled[short], plain[short])
    np.testing.assert_allclose(scaled[long_], plain[long_] / 8, rtol=1e-6)
    mid = ~short & ~long_
    s = (64 / wavelen[mid] - 1) / 3
    np.testing.assert_allclose(scaled[mid], (1 - s) * plain[mid] / 8 + s * plain[mid], rtol=1e-5)


def test_qkv_biases_shift_q_k_v_and_survive_fusing_for_decoding():
    cfg = ModelConfig(**{**CFG.__dict__, "qkv_bias": True})
    block = Block(cfg, rngs=nnx.Rngs(5))
    assert block.attn.bq.shape == (4, 8) and block.attn.bk.shape == block.attn.bv.shape == (2, 8)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 6, cfg.d_model)), jnp.float32)
    pos = jnp.tile(jnp.arange(6, dtype=jnp.int32), (2, 1))
    seg = jnp.ones((2, 6), jnp.int32)
    unbiased, _ = block(x, pos, seg, pos)
    rng = np.random.default_rng(6)
    for b in (block.attn.bq, block.attn.bk, block.attn.bv):
        b[...] = jnp.asarray(rng.standard_normal(b.shape), jnp.float32)
    want, _ = block(x, pos, seg, pos)
    assert np.abs(np.asarray(want - unbiased)).max() > 1e-2  # the biases take part
    fused = fuse_block(nnx.clone(block), row_blocks=2)
    assert not hasattr(fused.attn, "bq") and fused.attn.bqkv.shape == ((4 + 2 * 2) * 8,)
    got, _ = fused(x, pos, seg, pos)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
