"""Every attention implementation (lm/model/attention_ops.py) against dense attention, values and
gradients, on packed rows; `auto`'s choice per platform; the TPU compile of splash and of a block
without CPU-only kernels (libtpu, deviceless)."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.model import ModelConfig, Transformer
from lm.model import attention_ops as ops
from lm.model.platform import compile_platform, compiling_for, cpu_kernels


def packed_rows(t: int, seed: int = 0) -> np.ndarray:
    """[4, t] segment ids: 3 documents then padding; one document; padding then 2 documents
    (left-padded); many short documents (1..5 tokens)."""
    rng = np.random.default_rng(seed)
    rows = np.zeros((4, t), np.int32)
    a, b = sorted(rng.choice(np.arange(2, t - 8), 2, replace=False))
    rows[0, :a], rows[0, a:b], rows[0, b:t - 7] = 1, 2, 3
    rows[1] = 5
    rows[2, t // 3:t // 2], rows[2, t // 2:] = 1, 2
    pos, doc = 0, 1
    while pos < t:
        n = int(rng.integers(1, 6))
        rows[3, pos:pos + n] = doc
        pos, doc = pos + n, doc + 1
    return rows


def qkv(t: int, heads: int, kv_heads: int, hd: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(4, t, heads, hd)) / np.sqrt(hd)
    k, v = rng.normal(size=(2, 4, t, kv_heads, hd))
    return [jnp.asarray(x, jnp.float32) for x in (q, k, v)]


def value_and_grads(fn, q, k, v, seg):
    """(out at real queries, dq, dk, dv of the loss Σ out·w over real queries), one jitted call."""
    real = (seg != 0)[:, :, None, None]
    w = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape) * real

    def loss(q, k, v):
        out = fn(q, k, v, seg) * real
        return jnp.sum(out * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return (out, *grads)


@functools.lru_cache(maxsize=None)
def dense_reference(t, heads, kv_heads, hd):
    q, k, v = qkv(t, heads, kv_heads, hd)
    seg = jnp.asarray(packed_rows(t))
    return (q, k, v, seg), value_and_grads(ops.dense_attention, q, k, v, seg)


def assert_same_as_dense(fn, t, heads, kv_heads, hd=16, atol=1e-4):
    (q, k, v, seg), want = dense_reference(t, heads, kv_heads, hd)
    got = value_and_grads(fn, q, k, v, seg)
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_blockwise_equals_dense(heads, kv_heads):
    # T = 45 is not a multiple of the block (16): padded to 48, 3×3 blocks, the upper ones skipped
    assert_same_as_dense(lambda *a: ops.blockwise_attention(*a, block=16), 45, heads, kv_heads)


def test_blockwise_one_block_equals_dense():  # T ≤ block: one block of T, no padding
    assert_same_as_dense(lambda *a: ops.blockwise_attention(*a, block=64), 45, 4, 2)


def test_dense_causal_blocks_equal_one_block():
    assert_same_as_dense(lambda *a: ops.dense_attention(*a, block=16), 48, 4, 1)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (8, 2)])
def test_splash_interpret_equals_dense(heads, kv_heads):
    # T = 150: padded to 256 for the kernel (2 blocks of 128 would need T > 256 and twice the time)
    assert_same_as_dense(lambda *a: ops.splash_attention(*a, interpret=True), 150, heads, kv_heads)


def test_pallas_gpu_interpret_equals_dense():
    # GQA 4: the kv heads repeated to H; T = 40 padded to 64 (blocks of 32 below 128 tokens)
    assert_same_as_dense(lambda *a: ops.pallas_gpu_attention(*a, interpret=True), 40, 4, 1)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_cudnn_call_through_xla_equals_dense(heads, kv_heads):
    # the same jax.nn.dot_product_attention call (layout, GQA, segment mask, causal, scale) that
    # cuDNN runs on a GPU, with implementation='xla': the plumbing is checked without a GPU
    assert_same_as_dense(lambda *a: ops.cudnn_attention(*a, implementation="xla"), 33, heads, kv_heads)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU; none here")
def test_cudnn_equals_dense_on_gpu():  # pragma: no cover - runs only where a GPU is present
    q, k, v = qkv(128, 4, 2, 64)
    seg = jnp.asarray(packed_rows(128))
    bf = lambda x: x.astype(jnp.bfloat16)  # noqa: E731
    got = ops.cudnn_attention(bf(q), bf(k), bf(v), seg).astype(jnp.float32)
    want = ops.dense_attention(q, k, v, seg)
    real = (seg != 0)[:, :, None, None]
    np.testing.assert_allclose(np.asarray(got * real), np.asarray(want * real), atol=3e-2)


def tiny(impl: str, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                       attention_impl=impl, **kw)


def test_model_with_blockwise_equals_dense_and_prefills_the_same_cache():
    seg = jnp.asarray(packed_rows(40))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, seg.shape), jnp.int32)
    pos = jnp.asarray(np.where(seg > 0, np.arange(40), 0), jnp.int32)
    results = []
    for impl in ("dense", "blockwise"):
        model = Transformer(tiny(impl, attention_block=16), rngs=nnx.Rngs(0))  # the same parameters
        graphdef, params = nnx.split(model)

        @jax.jit
        def run(params):
            loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(tokens, pos, seg) * (seg > 0)[..., None])  # noqa: E731
            model = nnx.merge(graphdef, params)  # prefill into an empty cache: by `impl`, then cached
            _, cache = model.forward(tokens, pos, seg, cache=model.init_cache(4, 48), cache_index=0)
            filled = cache["segment_ids"] != 0  # [B, S]: padding slots hold whatever padding computed
            kv = (cache["k"] * filled[None, :, None, None, :], cache["v"] * filled[None, :, None, :, None])
            return jax.value_and_grad(loss)(params), kv

        results.append(run(params))
    close = lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-4, rtol=1e-4)  # noqa: E731
    jax.tree.map(close, results[1], results[0])


def test_auto_choice_and_bad_name():
    cfg = tiny("auto")
    assert compile_platform() == "cpu" and cpu_kernels()
    assert ops.resolve_attention_impl(cfg, seq_len=ops.CPU_BLOCKWISE_MIN_T - 1) == "dense"
    assert ops.resolve_attention_impl(cfg, seq_len=ops.CPU_BLOCKWISE_MIN_T) == "blockwise"
    with compiling_for("tpu"):
        assert ops.resolve_attention_impl(cfg, seq_len=128) == "splash" and not cpu_kernels()
    with compiling_for("gpu"):
        assert ops.resolve_attention_impl(tiny("auto", dtype="bfloat16"), seq_len=128) == "cudnn"
        assert ops.resolve_attention_impl(tiny("auto", head_dim=16)) == "pallas_gpu"  # float32: not cuDNN
        assert ops.resolve_attention_impl(tiny("auto", head_dim=12)) == "blockwise"  # not a power of two
    assert ops.resolve_attention_impl(tiny("dense")) == "dense"
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        tiny("flash")


@pytest.fixture(scope="module")
def tpu_mesh():
    """A v5e 2x2 slice's abstract devices (libtpu, no chip) as a (data, fsdp, tensor) mesh."""
    # several processes (pytest workers, other tools) may load libtpu for deviceless compiles at once
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies

        devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    except Exception as e:  # noqa: BLE001 - any libtpu failure means: cannot compile for TPU here
        pytest.skip(f"libtpu cannot compile for a TPU topology here: {type(e).__name__}: {e}")
    return jax.sharding.Mesh(np.array(devices).reshape(2, 1, 2), ("data", "fsdp", "tensor"))


def test_tpu_compile_picks_splash_and_drops_cpu_kernels(tpu_mesh):
    from jax.sharding import NamedSharding, PartitionSpec as P

    from lm.model import activation_sharding
    from lm.parallel import sharding as shd

    cfg = ModelConfig(vocab_size=256, d_model=256, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=256,
                      dtype="bfloat16")
    assert ops.resolve_attention_impl(cfg, tpu_mesh) == "splash"
    assert ops.resolve_attention_impl(cfg) == "blockwise"  # here, without the mesh: this CPU
    rules = {"heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor", "embed": None,
             "layers": None, "head_dim": None}
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    params = nnx.to_pure_dict(abstract)
    shardings = shd.param_shardings(shd.logical_axes_tree(abstract), params, rules, tpu_mesh)

    def hlo(mesh, shardings):  # (lowered, compiled) text of the gradient, traced under the mesh's hints
        def loss(p, tokens, seg):
            with activation_sharding(shd.activation_constraint(mesh, rules)):
                pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
                return jnp.sum(nnx.merge(graphdef, p)(tokens, pos, seg).astype(jnp.float32))

        args = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)
        tok = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=NamedSharding(mesh, P(("data", "fsdp"))))
        lowered = jax.jit(jax.grad(loss)).lower(args, tok, tok)
        return lowered.as_text(), lowered.compile().as_text()

    traced, compiled = hlo(tpu_mesh, shardings)
    assert "tpu_custom_call" in compiled  # the splash kernel, in shard_map over the batch and head axes
    # the CPU-only VJPs (layers.matmuls, swiglu: an optimization barrier) are not traced for TPU
    assert "optimization_barrier" not in traced and "opt-barrier" not in compiled
    cpu_mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    traced, compiled = hlo(cpu_mesh, jax.tree.map(lambda s: NamedSharding(cpu_mesh, P()), shardings))
    assert "optimization_barrier" in traced and "tpu_custom_call" not in compiled  # for CPU they are
