"""Chip tables, honest MFU, named remat policies and the mesh's checks (CPU only; the TPU compiler's
side is tests/test_tpu_compile.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh

from lm import train
from lm.io import metrics as mx
from lm.model import ModelConfig, Transformer, flops_per_token, matmul_params
from lm.model import remat
from lm.parallel import devices
from lm.parallel import sharding as shd
from lm.train import fitting
from lm.train.optim import make_optimizer

from configs import default, llama_8b


@pytest.mark.parametrize("kind, peak, hbm_gb", [
    ("TPU v4", 275e12, 32 * 2**30 / 1e9), ("TPU v5 lite", 197e12, 16), ("TPU v5", 459e12, 95),
    ("TPU v5p", 459e12, 95), ("TPU v6 lite", 918e12, 32), ("NVIDIA A100-SXM4-40GB", 312e12, 40),
    ("NVIDIA A100-SXM4-80GB", 312e12, 80), ("NVIDIA H100 80GB HBM3", 989e12, 80), ("NVIDIA H100 PCIe", 756e12, 80),
    ("NVIDIA H200", 989e12, 141)])
def test_chip_tables_by_device_kind(kind, peak, hbm_gb):
    assert devices.peak_flops(kind) == peak
    assert devices.hbm_bytes(kind) == pytest.approx(hbm_gb * 1e9, rel=1e-9)


def test_slices_name_chips_and_topologies():
    assert devices.parse_slice("v5p-128") == (devices.TPU_V5P, 64)  # v5p counts TensorCores
    assert devices.parse_slice("v6e-64") == (devices.TPU_V6E, 64)
    assert devices.topology_name("v5p-8") == "v5p:2x2x1" and devices.topology_name("v5p-128") == "v5p:4x4x4" and devices.topology_name("v5p-32") == "v5p:2x2x4"
    assert devices.topology_name("v6e-16") == "v6e:4x4" and devices.topology_name("v5litepod-8") == "v5e:2x4"
    assert devices.hbm_bytes("cpu", "v6e-16") == 32 * 10**9  # the slice name when the kind is unknown
    assert devices.peak_flops("cpu") is None and devices.hbm_bytes("cpu") is None
    with pytest.raises(ValueError, match="v5p-127.*TensorCores"):
        devices.parse_slice("v5p-127")
    with pytest.raises(ValueError, match="unknown TPU slice"):
        devices.parse_slice("v9x-8")


def test_flops_per_token_is_6n_plus_the_causal_half_of_attention():
    cfg = ModelConfig.from_config(llama_8b.get_config("v5p-128").model)
    n = matmul_params(cfg)
    assert 7.4e9 < n < 7.6e9  # 8.03B less the 0.53B input embedding (a lookup, no matmul)
    for t in (4096, 32768):
        f = flops_per_token(cfg, t)
        assert f["model"] == 6 * n
        assert f["attention"] == 6 * 32 * t * 32 * 128  # ½ · 12 · L · T · H · hd
        assert f["total"] == f["model"] + f["attention"]
    assert flops_per_token(cfg, 32768)["attention"] / (6 * n) == pytest.approx(0.572, abs=0.003)  # 32k: attention is 57% of 6N


def test_on_cpu_the_peak_is_a_measured_one():
    assert mx.peak_source(0.0).startswith("measured")
    assert mx.peak_flops(2e12) == (2e12, "train.peak_flops")


def test_a_mesh_axis_that_does_not_divide_is_an_error_naming_it():
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=64)
    opt, _ = make_optimizer(default.get_config().optimizer, 10)
    mesh = AbstractMesh((1, 1, 4), shd.MESH_AXES)
    rules = dict(default.get_config().mesh.rules)
    with pytest.raises(ValueError, match=r"parameter blocks\.attn\.wk .*dimension 2 \('kv_heads', size 2\).*"
                                         r"mesh axis 'tensor' of size 4.*mesh.rules.kv_heads=None"):
        train.plan_state(cfg, opt, mesh, rules)
    rules.update(kv_heads=None)  # replicated on request: fine
    setup = train.plan_state(cfg, opt, mesh, rules)
    assert tuple(setup.state_shardings.params["blocks"]["attn"]["wq"].spec) == (None, None, "tensor", None)


def test_dcn_axes_multiply_the_mesh_and_keep_slices_contiguous():
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 1, "dcn_data": 2}, jax.devices())
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    assert sorted(ids[:2].ravel()) == [0, 1, 2, 3] and sorted(ids[2:].ravel()) == [4, 5, 6, 7]


LOSS_CFG = ModelConfig(vocab_size=32, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)


def _loss_and_grad(policy):
    model = Transformer(ModelConfig(**{**LOSS_CFG.__dict__, "remat": policy}), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    x = jax.random.randint(jax.random.key(1), (2, 16), 0, 32)
    pos = jnp.tile(jnp.arange(16), (2, 1))
    seg = jnp.ones_like(x)

    def loss(p):
        return jnp.mean(nnx.merge(graphdef, p)(x, pos, seg).astype(jnp.float32) ** 2)

    return jax.jit(jax.value_and_grad(loss))(params)


def test_remat_policies_change_no_number():
    """What is saved or recomputed changes memory, never the loss or the gradient."""
    ref_loss, ref_grad = _loss_and_grad("none")
    for policy in ("full", "offload"):  # nothing saved; the named residuals (on host where it has one)
        loss, grad = _loss_and_grad(policy)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grad, ref_grad)


def test_remat_names_and_the_try_candidates():
    assert remat.canonical(True) == "full" and remat.canonical("False") == "none"
    with pytest.raises(ValueError, match="model.remat='save_everything'.*save_dots"):
        ModelConfig(vocab_size=8, remat="save_everything")
    config = llama_8b.get_config("v5p-128")
    config.model.remat = "save_dots"
    config.mesh.data, config.mesh.fsdp = 4, 16
    kinds = dict(fitting.candidates(config, 64))
    assert [d for d, _ in kinds["more fsdp"]][0] == "mesh.data=2 mesh.fsdp=32"
    assert [d for d, _ in kinds["remat"]] == ["model.remat='save_out_proj'", "model.remat='save_qkv_proj'",
                                              "model.remat='full'"]
    assert [d for d, _ in kinds["micro-batches"]] == ["train.micro_batches=2", "train.micro_batches=4"]
    assert fitting.variant(config, {"train.micro_batches": 4}).train.micro_batches == 4
    assert config.train.micro_batches == 1  # the original is untouched
