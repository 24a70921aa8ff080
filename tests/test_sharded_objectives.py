"""Every objective's compiled train step is data-parallel on 8 virtual CPU devices (data=8 and
data=4 × tensor=2): the HLO gathers no activation (every all-gather is of a parameter's shape, a
weight, or smaller than one device's share of a [B, T] array: per-row scalars), and the per-device FLOPs (cost_analysis) are within 15% of 1/8 of the one-device step's.
With the TPU compiler (libtpu, deviceless v5e:2x2), the fused loss as the objectives call it
gathers nothing as large as one chip's own hidden states.

Compile-only, tiny models, XLA:CPU codegen at its lowest level (the checks read the partitioned
HLO and its cost analysis, which codegen does not change)."""

import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base, dpo as dpo_config, grpo as grpo_config, ppo as ppo_config
from configs import reward as reward_config, sft as sft_config
from lm import objectives, train
from lm.data import batch as contract
from lm.model import ModelConfig
from lm.parallel import sharding as shd
from lm.train.optim import make_optimizer

MODEL = ModelConfig(vocab_size=128, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=64,
                    scan_layers=False)
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
ROWS, SEQ_LEN = 16, 32
ONE = {"data": 1, "fsdp": 1, "tensor": 1}
DATA8 = {"data": 8, "fsdp": 1, "tensor": 1}
DATA4_TENSOR2 = {"data": 4, "fsdp": 1, "tensor": 2}
CONFIGS = {"pretrain": base.get_config, "sft": sft_config.get_config, "dpo": lambda: dpo_config.get_config("tiny"),
           "reward": lambda: reward_config.get_config("tiny"), "grpo": grpo_config.get_config,
           "ppo": ppo_config.get_config}
CASES = [("pretrain", DATA8), ("pretrain", DATA4_TENSOR2), ("sft", DATA4_TENSOR2), ("dpo", DATA8),
         ("dpo", DATA4_TENSOR2), ("reward", DATA8), ("reward", DATA4_TENSOR2), ("grpo", DATA4_TENSOR2),
         ("ppo", DATA4_TENSOR2)]


def compile_step(name: str, sizes: dict, rows: int = 16, seq_len: int = 32):
    """(the compiled train step of objective `name` on a mesh of `sizes`, its parameter shapes)."""
    config = CONFIGS[name]()
    config.loss.kind = "fused"
    objective = objectives.get(name)
    devices = jax.devices()[:math.prod(sizes.values())]
    mesh = shd.make_mesh(sizes, devices)
    opt, sched = make_optimizer(config.optimizer, 10)
    frozen = objectives.frozen_models(objective, config, MODEL)
    setup = train.plan_state(objectives.make_model(objective, config, MODEL) or MODEL, opt, mesh,
                             config.mesh.rules, 0, frozen={k: f.make_model for k, f in frozen.items()})
    step = train.jit_train_step(train.make_train_step(objective.make_loss_fn(config, setup.graphdef), opt, sched),
                                setup)
    kind = objectives.batch_kind(objective, config)
    batch_size = rows // 2 if kind in ("preference", "preference_ref") else rows  # pairs: 2 rows each
    sharding = shd.batch_sharding(mesh)
    batch = contract.spec(kind, batch_size, seq_len,
                          make=lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding))
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), setup.abstract_state,
                         setup.state_shardings)
    frozen_args = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), setup.abstract_frozen,
                               setup.frozen_shardings)
    compiled = step.lower(state, batch, *((frozen_args,) if frozen else ())).compile(FAST)
    param_shapes = {tuple(x.shape) for x in jax.tree.leaves((setup.abstract_state.params, setup.abstract_frozen))}
    return compiled, param_shapes


def all_gathers(hlo: str) -> list[tuple[int, ...]]:
    """Result shapes of every all-gather in an HLO text."""
    out = []
    for line in hlo.splitlines():
        m = re.search(r"=\s*\(?[a-z0-9]+\[([0-9,]*)\][^=]*?\ball-gather(-start)?\(", line)
        if m:
            out.append(tuple(int(x) for x in m.group(1).split(",") if x))
    return out


@pytest.fixture(scope="module")
def one_device_flops():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = compile_step(name, ONE)[0].cost_analysis()["flops"]
        return cache[name]

    return get


@pytest.mark.parametrize("name,sizes", CASES, ids=[f"{n}-{'x'.join(str(v) for v in s.values())}" for n, s in CASES])
def test_train_step_is_data_parallel(name, sizes, one_device_flops):
    compiled, param_shapes = compile_step(name, sizes, ROWS, SEQ_LEN)
    gathered = all_gathers(compiled.as_text())
    # an activation: at least one device's share of a per-token [B, T] array (per-row scalars, such
    # as the reward model's [B] final-token indices, are below it)
    activations = [s for s in gathered if s not in param_shapes and math.prod(s) >= ROWS * SEQ_LEN // 8]
    assert not activations, f"{name} on {sizes}: all-gathers of non-parameters {activations}"
    ratio = compiled.cost_analysis()["flops"] * 8 / one_device_flops(name)
    assert 0.85 <= ratio <= 1.15, f"{name} on {sizes}: per-device FLOPs are {ratio:.3f} × 1/8 of one device's"


def test_tpu_fused_loss_gathers_less_than_one_chips_hidden_states():
    """v5e:2x2 (4 chips), rows over data=4, value and gradient of the fused loss as
    lm/objectives/_logprobs.py calls it (inside the activation hint of the mesh)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from lm.model.hints import activation_sharding
    from lm.objectives._logprobs import loss_sharding
    from lm.losses import fused_cross_entropy

    try:
        topology = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
    except Exception as e:  # noqa: BLE001 — no libtpu here
        pytest.skip(f"the TPU compiler is not available: {e}")
    mesh = Mesh(np.array(topology.devices).reshape(4, 1, 1), shd.MESH_AXES)
    rows, seq_len, dim, vocab = 8, 512, 256, 4096
    spec = lambda shape, dtype, p: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, p))  # noqa: E731
    hidden = spec((rows, seq_len, dim), jnp.bfloat16, P(shd.BATCH_AXES, None, None))
    kernel = spec((dim, vocab), jnp.float32, P(None, None))
    targets = spec((rows, seq_len), jnp.int32, P(shd.BATCH_AXES, None))

    def loss(h, w, t):
        with activation_sharding(shd.activation_constraint(mesh, base.get_config().mesh.rules)):
            return fused_cross_entropy(h, w, t, chunk_size=1024, **loss_sharding(rows, vocab)).mean

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(hidden, kernel, targets).compile()
    largest = max([math.prod(s) for s in all_gathers(compiled.as_text())], default=0)
    own_hidden = rows * seq_len * dim // 4
    assert largest < own_hidden, f"an all-gather of {largest} elements (one chip's hidden states: {own_hidden})"
