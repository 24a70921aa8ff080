"""LoRA on the model (lm/model/lora.py) and the quantized frozen base (lm/model/quant.py): the
adapted model equals its base at B = 0, merging equals the separate path, int8 and NF4 match their
formulas, and the CPU decode layout folds adapters in."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.model import Attention, ModelConfig, Transformer, lora, matmuls, quant
from lm.model.cpu import for_decoding

CFG = ModelConfig(vocab_size=37, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
TOKENS = (jnp.arange(16, dtype=jnp.int32).reshape(2, 8) * 7) % 37
POS = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
SEG = jnp.ones((2, 8), jnp.int32)
# the 16 NF4 levels of the QLoRA paper (Dettmers et al. 2023, Appendix E)
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)


def adapted(targets="all", rank=4, base_dtype="float32", block=32):
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    lora.add_adapters(model, lora.target_names(targets), rank, lora.scaling(rank, 8.0), nnx.Rngs(1))
    lora.quantize_base(model, base_dtype, block)
    return model


def with_random_b(model, seed=3):
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    key = iter(jax.random.split(jax.random.key(seed), 64))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.05 * jax.random.normal(next(key), x.shape) if lora.is_adapter(p) and
        str(p[-1].key).endswith("_b") else x, params)
    return graphdef, params


@pytest.fixture(scope="module")
def base_logits():
    return logits(Transformer(CFG, rngs=nnx.Rngs(0)))


def logits(model):
    graphdef, params = nnx.split(model)
    return jax.jit(lambda p: nnx.merge(graphdef, p)(TOKENS, POS, SEG))(params)


def test_without_adapters_the_products_are_the_plain_ones():
    """project() on a module with no adapters is exactly the weights' matmuls (rank 0 changes nothing)."""
    attn = Attention(CFG, rngs=nnx.Rngs(0))
    x2 = jax.random.normal(jax.random.key(0), (6, CFG.d_model))
    ws = [w.reshape(CFG.d_model, -1) for w in (attn.wq[...], attn.wk[...], attn.wv[...])]
    for got, want in zip(lora.project(attn, x2, ("wq", "wk", "wv"), jnp.float32), matmuls(x2, *ws)):
        np.testing.assert_array_equal(got, want)


def test_b_zero_gives_the_base_outputs_bit_for_bit(base_logits):
    model = adapted()
    np.testing.assert_array_equal(logits(model), base_logits)
    state = nnx.to_pure_dict(nnx.state(model))["blocks"]
    assert state["attn"]["wo_lora_a"].shape == (2, 4, 8, 4) and state["attn"]["wo_lora_b"].shape == (2, 4, 32)
    assert state["mlp"]["w_down_lora_a"].shape == (2, 64, 4) and not np.any(state["mlp"]["w_down_lora_b"])


def test_merged_weights_give_the_unmerged_logits(base_logits):
    graphdef, params = with_random_b(adapted())
    unmerged = logits(nnx.merge(graphdef, params))
    assert float(jnp.max(jnp.abs(unmerged - base_logits))) > 1e-2  # the adapters do something
    plain = nnx.graphdef(Transformer(CFG, rngs=nnx.Rngs(0)))
    merged = logits(nnx.merge(plain, lora.merge_weights(params, lora.scaling(4, 8.0))))
    np.testing.assert_allclose(merged, unmerged, atol=1e-4, rtol=0)  # (fold_in: the decode-layout test)


def test_the_cpu_decode_layout_folds_the_adapters_in():
    graphdef, params = with_random_b(adapted(targets="q,v,down", base_dtype="nf4", block=8))
    model = nnx.merge(graphdef, params)
    want = logits(model)
    got = logits(for_decoding(model, per_layer=True))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_targets_by_name_group_or_pattern_and_errors():
    assert lora.target_names("q_proj, v") == ["q", "v"]
    assert lora.target_names("mlp") == ["gate", "up", "down"]
    assert lora.target_names("[qkv]") == ["q", "k", "v"]
    with pytest.raises(ValueError, match="names no projection"):
        lora.target_names("query")
    assert lora.scaling(16, 32.0) == 2.0 and lora.scaling(16, 32.0, rslora=True) == 8.0


def blocks_of(w, axis, block):
    """w → [..., n/block, block] numpy view whose last axis is one block."""
    w = np.moveaxis(np.asarray(w), axis, -1)
    return w.reshape(*w.shape[:-1], -1, block)


def test_int8_is_absmax_per_block():
    w = jax.random.normal(jax.random.key(1), (2, 128, 3, 8)) * jnp.linspace(0.1, 3, 8)
    parts = quant.quantize(w, "int8", 64, -3)
    blocks = blocks_of(w, 1, 64)
    absmax = np.abs(blocks).max(-1, keepdims=True)
    codes = blocks_of(parts["codes"], 1, 64).astype(np.float32)
    exact = blocks * 127.5 / absmax  # q = round(127.5·x/m), up to the last ulp of the product
    assert np.all(np.abs(codes - np.clip(exact, -128, 127)) <= 0.5 + 1e-4) and codes.min() >= -128
    np.testing.assert_allclose(blocks_of(quant.dequantize(parts, "int8", -3), 1, 64), codes * absmax / 127.5,
                               rtol=1e-6)


def test_nf4_is_the_nearest_of_the_16_levels_times_the_block_absmax():
    w = jax.random.normal(jax.random.key(2), (2, 256, 4)) * 0.02
    parts = quant.quantize(w, "nf4", 64, -2)
    assert parts["codes"].dtype == jnp.uint8 and parts["codes"].shape == (2, 128, 4)  # two codes per byte
    blocks = blocks_of(w, 1, 64)
    absmax = np.abs(blocks).max(-1, keepdims=True)
    want_codes = np.argmin(np.abs(NF4 - (blocks / absmax)[..., None]), axis=-1)
    codes = blocks_of(quant._unpack(parts["codes"], 1), 1, 64)
    np.testing.assert_array_equal(codes, want_codes)
    # double quantization: the block scales come back to within half an int8 step of their group
    scales = absmax[..., 0]  # [2, 4, n_blocks]
    deq = blocks_of(quant.dequantize(parts, "nf4", -2), 1, 64)
    got_scales = np.abs(deq).max(-1)
    step = np.abs(scales - scales.mean(-1, keepdims=True)).max(-1, keepdims=True) / 127.5
    assert np.all(np.abs(got_scales - scales) <= step / 2 + 1e-7)
    np.testing.assert_allclose(deq, NF4[codes] * got_scales[..., None], rtol=1e-6)


def test_bytes_per_weight_of_the_frozen_base():
    """≈ 2, 1.06 and 0.52 bytes per projection weight for bfloat16, int8 and NF4 (blocks of 64)."""
    w = jnp.zeros((4096, 512), jnp.float32) + jax.random.normal(jax.random.key(0), (4096, 512))
    for kind, want in (("int8", 8.5), ("nf4", quant.bits_per_weight("nf4", 64, 64))):
        parts = quant.quantize(w, kind, 64, -2)
        bits = 8 * sum(p.size * p.dtype.itemsize for p in parts.values()) / w.size
        assert bits == pytest.approx(want, rel=1e-6), kind
    assert quant.bits_per_weight("nf4", 64) == pytest.approx(4.129, abs=1e-3)


def test_a_block_size_that_does_not_divide_is_named():
    with pytest.raises(ValueError, match="block_size=48 does not divide axis 0"):
        quant.quantize(jnp.ones((64, 8)), "int8", 48, 0, name="wq")


def test_a_quantized_base_gives_nearly_the_bfloat16_base_loss():
    """The adapted model's loss at B = 0 over a bfloat16, int8 and NF4 base: int8 within 0.5% and NF4
    within 5% of bfloat16's on this random model (NF4's 16 levels move each weight by up to ~1/8 of its
    block's absmax)."""
    targets = jnp.roll(TOKENS, -1, axis=1)

    def loss(model):
        graphdef, params = nnx.split(model)
        logp = jax.jit(lambda p: jax.nn.log_softmax(nnx.merge(graphdef, p)(TOKENS, POS, SEG).astype(jnp.float32)))(params)
        return -float(jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1)))

    got = {kind: loss(adapted(base_dtype=kind, block=8)) for kind in ("bfloat16", "int8", "nf4")}
    assert got["int8"] == pytest.approx(got["bfloat16"], rel=5e-3)
    assert got["nf4"] == pytest.approx(got["bfloat16"], rel=5e-2)


def test_the_base_as_held_is_what_the_adapted_model_computes_with():
    """lora.as_held (export's base) equals the dequantized weights the quantized model reads."""
    model = adapted(base_dtype="nf4", block=8)
    float_params = nnx.to_pure_dict(nnx.state(Transformer(CFG, rngs=nnx.Rngs(0))))
    held = lora.as_held(float_params, "nf4", 8)
    np.testing.assert_array_equal(held["blocks"]["attn"]["wq"], lora.kernel(model.blocks.attn.wq))
    np.testing.assert_array_equal(held["embed"], model.embed[...].astype(jnp.float32))


def test_adapter_dropout_in_training_only_with_the_right_expectation():
    """PEFT's lora_dropout: with keys (a training forward) the adapter path reads x·m/(1−p) with one
    Bernoulli mask per adapted weight; its mean over masks is the deterministic output (the term is
    linear in the dropped input); without keys the output is the no-dropout one, bit for bit."""
    p = 0.25
    attn = Attention(CFG, rngs=nnx.Rngs(0))
    lora.add_adapters(attn, ["q", "v"], 4, 2.0, nnx.Rngs(1))
    attn.wq_lora_b.set_value(0.3 * jax.random.normal(jax.random.key(4), attn.wq_lora_b.shape))
    attn.wv_lora_b.set_value(0.3 * jax.random.normal(jax.random.key(5), attn.wv_lora_b.shape))
    x2 = jax.random.normal(jax.random.key(0), (6, CFG.d_model))
    attrs = ("wq", "wk", "wv")
    g0, s0 = nnx.split(attn)
    plain = jax.jit(lambda s: lora.project(nnx.merge(g0, s), x2, attrs, jnp.float32))(nnx.to_pure_dict(s0))
    lora.add_dropout_keys(attn, p)
    assert attn.lora_dropout_key.shape == (2,) and attn.lora_dropout == p
    graphdef, state = nnx.split(attn)
    params = nnx.to_pure_dict(state)

    @jax.jit
    @jax.vmap
    def with_key(key):
        module = nnx.merge(graphdef, dict(params, **{lora.DROPOUT_KEY: jax.random.key_data(key)}))
        return lora.project(module, x2, attrs, jnp.float32)

    n = 2048
    keys = jax.random.split(jax.random.key(7), n)
    outs = with_key(keys)
    key, got = keys[0], [o[0] for o in outs]
    np.testing.assert_allclose(got[1], plain[1], atol=1e-5)  # k has no adapter: no dropout (another program)
    # the reference with the same masks, written out: y = xW + s·((x·m/(1−p))·A)·B
    for i, a in ((0, "wq"), (2, "wv")):
        mask = jax.random.bernoulli(jax.random.fold_in(key, list(lora.ATTRS).index(a)), 1 - p, x2.shape)
        lora_a = getattr(attn, a + "_lora_a")[...].reshape(CFG.d_model, -1)
        lora_b = getattr(attn, a + "_lora_b")[...].reshape(4, -1)
        base = x2 @ getattr(attn, a)[...].reshape(CFG.d_model, -1)
        np.testing.assert_allclose(got[i], base + 2.0 * ((jnp.where(mask, x2 / (1 - p), 0) @ lora_a) @ lora_b),
                                   atol=1e-5)
        assert float(jnp.max(jnp.abs(got[i] - plain[i]))) > 1e-2  # training differs from eval
    assert not np.array_equal(got[0] - plain[0], got[2] - plain[2])  # q and v: different masks
    spread = np.asarray(jnp.std(outs[0], axis=0)) / np.sqrt(n)
    assert np.all(np.abs(np.asarray(jnp.mean(outs[0], axis=0) - plain[0])) <= 5 * spread + 1e-5)
