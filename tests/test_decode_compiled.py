"""The compiled decode jits: the KV cache is written in place (only the new slots), and on a mesh
every device decodes its own rows.

- With the real TPU compiler (libtpu, deviceless v5e:2x2, rows over data=4), the decode loop over
  a stacked cache (scanned or unrolled layers) builds no buffer of a layer's cache: its
  temporaries are smaller than one layer's keys, and outside fused kernels no instruction but a
  view (parameter, get-tuple-element, bitcast, tuple) produces a cache-shaped array.
- On 8 virtual CPU devices (data=8, data=4 × tensor=2), generate_batch's prefill and decode jits
  and the RL rollout jit take their layouts from the mesh: the compiled HLO gathers nothing
  larger than one device's rows (no batch-sharded activation, no [B, N, V] logits), the cache is
  split by rows (and kv heads), and the tokens equal the one-device ones.
"""

import functools
import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from lm.model import ModelConfig, Transformer
from lm.model.cpu import for_decoding
from lm.model.platform import compiling_for
from lm.parallel import sharding as shd
from lm.sampling import SamplingConfig, decode, generate_batch
from lm.sampling.placement import Placement
from lm.sampling.rollout import COMPILER_OPTIONS, left_padded, rollout, stop_array

RULES = dict(base.get_config().mesh.rules)
CPU_MODEL = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
ROWS = 16
PROMPTS = [[1 + r % 7, 2, 3 + r % 5][: 1 + r % 3] for r in range(ROWS)]
MESHES = {"data8": {"data": 8, "fsdp": 1, "tensor": 1}, "data4xtensor2": {"data": 4, "fsdp": 1, "tensor": 2}}


def all_gathers(hlo: str) -> list[tuple[int, ...]]:
    """Result shapes of every all-gather in an HLO text."""
    shapes = re.findall(r"=\s*\(?[a-z0-9]+\[([0-9,]*)\][^=\n]*?\ball-gather(?:-start)?\(", hlo)
    return [tuple(int(x) for x in s.split(",") if x) for s in shapes]


def producers(hlo: str, shape: str, *, in_place_ok: bool = False) -> list[str]:
    """Instructions outside fused computations whose result is exactly `shape` (e.g.
    'bf16[2,2,128,4096]'), other than views of an existing buffer; in_place_ok: other than
    in-place updates too (a dynamic-update-slice, or a fusion whose root is one). The entry
    computation (what runs once per call, not per decode step) is left out when in_place_ok."""
    computations, roots, current = {}, {}, None
    for line in hlo.splitlines():
        header = re.match(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{$", line)
        if header:
            current = "ENTRY" if header.group(1) else header.group(2)
            computations[current] = []
        elif current and (m := re.match(r"^\s+(ROOT\s+)?%[\w.\-]+\s*=\s*([a-z0-9]+\[[0-9,]*\])\S*\s+([\w\-]+)\(",
                                           line)):
            computations[current].append((m.group(2), m.group(3), line))
            if m.group(1):
                roots[current] = m.group(3)
    fused = set(re.findall(r"\bfusion\(.*?calls=%([\w.\-]+)", hlo))
    views = ("parameter", "get-tuple-element", "bitcast", "tuple")
    out = []
    for name, instructions in computations.items():
        if name in fused or (in_place_ok and name == "ENTRY"):
            continue
        for result, op, line in instructions:
            if result != shape or op in views:
                continue
            called = re.search(r"calls=%([\w.\-]+)", line)
            if in_place_ok and (op == "dynamic-update-slice" or (
                    op == "fusion" and called and roots.get(called.group(1)) == "dynamic-update-slice")):
                continue
            out.append(f"{name}: {line.strip()[:160]}")
    return out


# -- the TPU compiler: the cache written in place ---------------------------------------------------


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
def test_tpu_decode_loop_writes_only_the_new_cache_slots(scan_layers):
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed: no TPU compiler here (pip install -e '.[tpu]')")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other test workers may hold libtpu too
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    mesh = shd.make_mesh({"data": 4, "fsdp": 1, "tensor": 1}, devices)
    cfg = ModelConfig(vocab_size=128, d_model=128, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=128,
                      mlp_dim=256, dtype="bfloat16", scan_layers=scan_layers)
    rows, slots, new = 8, 4096, 16
    placement = Placement.of(mesh, RULES)
    with compiling_for("tpu"):
        graphdef, state = nnx.split(for_decoding(Transformer(cfg, rngs=nnx.Rngs(0)), per_layer=False))
        params, param_shardings = placement.params(state)
        abstract = lambda tree, shardings: jax.tree.map(  # noqa: E731
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
        params = abstract(params, param_shardings)
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        prompt = {k: jax.ShapeDtypeStruct((rows, 16), jnp.int32) for k in ("tokens", "positions", "segment_ids")}
        prompt["lengths"] = jax.ShapeDtypeStruct((rows,), jnp.int32)
        knobs = {"temperature": jnp.float32(1), "top_k": jnp.int32(0), "top_p": jnp.float32(1), "min_p": jnp.float32(0)}
        stop_ids, key = jnp.full((4,), -1, jnp.int32), jax.random.key(0)
        loop = jax.eval_shape(functools.partial(decode._prefill_fn, graphdef, max_len=slots, max_new_tokens=new,
                                                keep_logits=False), params, prompt, knobs, stop_ids, key)
        replicated = lambda tree: abstract(tree, jax.tree.map(lambda _: rep, tree))  # noqa: E731
        compiled = decode._decode_chunk.lower(graphdef, params, abstract(loop, placement.state(loop)),
                                              replicated(knobs), replicated(stop_ids),
                                              replicated(jnp.int32(new)), placement=placement).compile()
    hd = cfg.head_dim_
    local = rows // 4
    layer_keys = local * cfg.num_kv_heads * hd * slots * 2  # bytes of one layer's keys on one chip
    temporaries = compiled.memory_analysis().temp_size_in_bytes
    assert temporaries < layer_keys / 2, (temporaries, layer_keys)
    hlo = compiled.as_text()
    for shape in (f"bf16[{local},{cfg.num_kv_heads},{hd},{slots}]", f"bf16[{local},{cfg.num_kv_heads},{slots},{hd}]"):
        assert not producers(hlo, shape), producers(hlo, shape)  # no buffer of one layer's cache, anywhere
    for shape in (f"bf16[{cfg.num_layers},{local},{cfg.num_kv_heads},{hd},{slots}]",
                  f"bf16[{cfg.num_layers},{local},{cfg.num_kv_heads},{slots},{hd}]"):
        # per step the stacked cache is only updated in place (the entry computation may lay it
        # out once per call for the loop)
        assert not producers(hlo, shape, in_place_ok=True), producers(hlo, shape, in_place_ok=True)


# -- 8 virtual CPU devices: each device decodes its own rows ----------------------------------------


FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}  # codegen only


@pytest.fixture(scope="module")
def cpu_model():
    return Transformer(CPU_MODEL, rngs=nnx.Rngs(0))


def decode_compiled(model, mesh):
    """generate_batch's two jits for PROMPTS on `mesh` (None: one device), stacked layout, compiled
    (XLA:CPU codegen at its lowest level) and run: (prefill, decode chunk, final loop state)."""
    run = decode.decoding_inputs(model, None, PROMPTS, SamplingConfig(max_new_tokens=8), seed=1, mesh=mesh,
                                 rules=RULES, unroll_layers=False)
    args = (run.params, run.prompt, run.knobs, run.stop_ids, run.key)
    prefill = decode._prefill.lower(run.graphdef, *args, max_len=run.max_len, max_new_tokens=8, keep_logits=False,
                                    placement=run.placement).compile(FAST)
    state = prefill(*args)
    rest = (run.knobs, run.stop_ids, run.placement.replicate(np.int32(8)))
    chunk = decode._decode_chunk.lower(run.graphdef, run.params, state, *rest,
                                       placement=run.placement).compile(FAST)
    return prefill, chunk, state, chunk(run.params, state, *rest)


@pytest.fixture(scope="module")
def one_device(cpu_model):
    """The one-device tokens (sampled at temperature 1)."""
    return np.asarray(decode_compiled(cpu_model, None)[-1]["tokens"])


def assert_row_local(hlo: str, mesh, what: str):
    """No all-gather holds more than one device's rows: nothing of the [B, …] arrays (B = ROWS)
    is gathered across the batch axes (gathers over `tensor` of a device's own rows are fine)."""
    local = ROWS // (mesh.shape["data"] * mesh.shape["fsdp"])
    gathered = [s for s in all_gathers(hlo) if s and s[0] > local]
    assert not gathered, f"{what}: all-gathers of more than one device's {local} rows: {gathered}"


@pytest.mark.parametrize("name", MESHES)
def test_generate_decodes_each_devices_rows_on_its_mesh(name, cpu_model, one_device):
    mesh = shd.make_mesh(MESHES[name])
    prefill, chunk, state, final = decode_compiled(cpu_model, mesh)
    assert_row_local(prefill.as_text(), mesh, "prefill")
    assert_row_local(chunk.as_text(), mesh, "decode step")
    tensor = "tensor" if mesh.shape["tensor"] > 1 else None
    by_rows_and_heads = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data", tensor))
    for cache in (state["cache"]["k"], final["cache"]["k"]):  # the cache by rows and kv heads, in and out
        assert cache.sharding.is_equivalent_to(by_rows_and_heads, 5), cache.sharding
    assert final["tokens"].sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, shd.P("data")), 2)
    np.testing.assert_array_equal(np.asarray(final["tokens"]), one_device)


def test_rollout_on_8_devices_is_row_local_and_samples_the_same_tokens(cpu_model, one_device):
    """The rollout jitted as lm/objectives/_rl.py does (in/out shardings from the mesh, activation
    hints), its loop state laid out by the mesh: per device its own rows; same tokens as one device."""
    graphdef, params = nnx.split(cpu_model)
    prompt_np, _ = decode.prepare_prompts(PROMPTS, CPU_MODEL.vocab_size, 8, None)
    knobs = {"temperature": np.float32(1), "top_k": np.int32(0), "top_p": np.float32(1), "min_p": np.float32(0)}

    def run(mesh, with_placement):
        rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(shd.BATCH_AXES))
        rep = shd.replicated(mesh)
        placement = Placement.of(mesh, RULES) if with_placement else None
        fn = functools.partial(rollout, graphdef, max_new_tokens=8, per_layer=False, placement=placement)
        hint = shd.activation_constraint(mesh, RULES)

        def traced(*args):
            from lm.model.hints import activation_sharding
            with activation_sharding(hint):
                return fn(*args)

        prompt = left_padded(prompt_np["tokens"], prompt_np["lengths"])
        param_sh = shd.param_shardings(shd.logical_axes_tree(nnx.state(cpu_model)), nnx.to_pure_dict(params),
                                       RULES, mesh)
        jitted = jax.jit(traced, in_shardings=(param_sh, rows, rep, rep, rep), out_shardings=rows,
                         compiler_options=COMPILER_OPTIONS)
        args = (nnx.to_pure_dict(params), prompt, jax.random.key(1), knobs, stop_array(()))
        compiled = jitted.lower(*args).compile(FAST)
        return compiled, compiled(*args)

    one = run(shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]), False)[1]
    mesh = shd.make_mesh(MESHES["data4xtensor2"])
    compiled, out = run(mesh, True)
    assert_row_local(compiled.as_text(), mesh, "rollout")
    np.testing.assert_array_equal(out["tokens"], one["tokens"])
    np.testing.assert_allclose(out["policy_logprobs"], one["policy_logprobs"], atol=1e-5)
