"""Device mesh and the mapping from logical parameter axes to mesh axes.

The mesh has three named axes:
  data    pure data parallelism: parameters replicated, batch split;
  fsdp    data parallelism with parameters and optimizer state split (ZeRO-3 / FSDP);
  tensor  tensor parallelism: heads, MLP width and vocabulary split.
The batch is split over (data, fsdp). A parameter's sharding comes from its
`logical_axes` metadata (set in lm/model/) through `rules`: logical name → mesh
axis or None. A mesh axis is used at most once per parameter; a mesh axis of size > 1
that does not divide the dimension it is asked to shard is an error naming the
parameter, the dimension and the axis (change the mesh, or map that logical name
to None to replicate it). One code path serves every mesh, the 1-device mesh included.

Several slices (multi-slice TPU, several GPU hosts): each mesh axis is the product of
its size within a slice (ICI, `mesh.data` …) and its size across slices (DCN,
`mesh.dcn_data` …); `make_mesh` orders the devices with
`mesh_utils.create_hybrid_device_mesh` so that the DCN part is the outer, slow one.
Put data (or fsdp) parallelism across slices, tensor parallelism never.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """Resolve {data, fsdp, tensor} sizes (one may be −1 = the devices left) for `num_devices`."""
    shape = [int(sizes[a]) for a in MESH_AXES]
    free = [i for i, s in enumerate(shape) if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, shape))}")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, shape))}")
    known = math.prod(s for s in shape if s != -1)
    if free:
        if num_devices % known:
            raise ValueError(f"mesh: {dict(zip(MESH_AXES, shape))} cannot fill {num_devices} devices "
                             f"({num_devices} is not a multiple of {known})")
        shape[free[0]] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh: {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                         f"but {num_devices} are available; set one axis to -1 or change the sizes")
    return tuple(shape)


def dcn_shape(sizes: Mapping[str, int]) -> tuple[int, int, int]:
    """The mesh's sizes across slices: (dcn_data, dcn_fsdp, dcn_tensor), 1 where not given."""
    shape = tuple(int(sizes.get(f"dcn_{a}", 1) or 1) for a in MESH_AXES)
    if any(s < 1 for s in shape):
        raise ValueError(f"mesh: dcn_* sizes must be >= 1, got {dict(zip(MESH_AXES, shape))}")
    return shape


def _granules(devices: list, count: int) -> list[list]:
    """`devices` in `count` groups (slices): by slice_index where the devices have several, else by
    process, else (one process of virtual devices) in equal consecutive blocks."""
    for attr in ("slice_index", "process_index"):
        keys = sorted({getattr(d, attr, None) for d in devices}, key=lambda k: (k is None, k))
        if len(keys) == count and None not in keys:
            return [[d for d in devices if getattr(d, attr) == k] for k in keys]
    if len(devices) % count:
        raise ValueError(f"mesh: {len(devices)} devices do not split into {count} slices")
    n = len(devices) // count
    return [list(devices[i * n:(i + 1) * n]) for i in range(count)]


def _physical_mesh(shape: tuple[int, ...], devices: list) -> np.ndarray:
    try:
        return mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 — non-physical shapes (e.g. virtual CPU devices): plain order
        return np.asarray(devices).reshape(shape)


def make_mesh(sizes: Mapping[str, int], devices: list | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor) over `devices` (default: all of them). With dcn_* sizes
    (several slices), axis a has size sizes[a] × sizes['dcn_' + a], slices outermost."""
    devices = jax.devices() if devices is None else devices
    dcn = dcn_shape(sizes)
    slices = math.prod(dcn)
    if slices == 1:
        return Mesh(_physical_mesh(mesh_shape(sizes, len(devices)), devices), MESH_AXES)
    if len(devices) % slices:
        raise ValueError(f"mesh: {len(devices)} devices do not split into {slices} slices "
                         f"(dcn sizes {dict(zip(MESH_AXES, dcn))})")
    ici = mesh_shape(sizes, len(devices) // slices)
    try:  # real slices: the devices say which slice they are on
        array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
    except Exception:  # noqa: BLE001 — virtual devices / one process: the same layout by hand
        blocks = [_physical_mesh(ici, g) for g in _granules(devices, slices)]
        grid = np.empty(dcn, dtype=object)
        for i, index in enumerate(np.ndindex(*dcn)):
            grid[index] = blocks[i]
        array = np.block(grid.tolist())
    return Mesh(array, MESH_AXES)


def logical_to_spec(logical_axes: tuple[str | None, ...], shape: tuple[int, ...],
                    rules: Mapping[str, str | None], mesh: Mesh, param: str = "a parameter") -> P:
    """PartitionSpec for one parameter (named `param` in errors): each logical axis through
    `rules`, skipping mesh axes already used or of size 1. A mesh axis that does not divide its
    dimension is a ValueError naming the parameter, the dimension and the axis."""
    if len(logical_axes) != len(shape):
        raise ValueError(f"{param}: logical axes {logical_axes} do not match shape {shape}")
    used: set[str] = set()
    spec = []
    for i, (name, dim) in enumerate(zip(logical_axes, shape)):
        if name is not None and name not in rules:
            raise KeyError(f"no sharding rule for logical axis {name!r} of {param}; rules: {dict(rules)}")
        axis = None if name is None else rules[name]
        if axis is not None and (axis in used or mesh.shape[axis] == 1):
            axis = None
        if axis is not None and dim % mesh.shape[axis]:
            raise ValueError(
                f"sharding: {param} {tuple(shape)}: dimension {i} ({name!r}, size {dim}) is not divisible by "
                f"mesh axis {axis!r} of size {mesh.shape[axis]}; change the mesh sizes (mesh.{axis}) or "
                f"replicate it with mesh.rules.{name}=None")
        if axis is not None:
            used.add(axis)
        spec.append(axis)
    return P(*spec)


def logical_axes_tree(abstract_state: Any) -> Any:
    """From an nnx State of Params: the same tree with each leaf its `logical_axes` tuple."""
    from flax import nnx  # only the model's metadata needs flax

    def get(var):
        return tuple(var.get_metadata().get("logical_axes", (None,) * len(var.shape)))

    pure = jax.tree.map(get, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(pure) if not isinstance(pure, dict) else pure


def _dotted(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def param_shardings(axes_tree: Any, shapes_tree: Any, rules: Mapping[str, str | None], mesh: Mesh) -> Any:
    """NamedSharding per parameter, from a tree of logical-axis tuples and a matching tree of shapes."""
    return jax.tree_util.tree_map_with_path(
        lambda path, axes, x: NamedSharding(mesh, logical_to_spec(axes, x.shape, rules, mesh,
                                                                  f"parameter {_dotted(path)}")),
        axes_tree, shapes_tree, is_leaf=lambda x: isinstance(x, tuple))


def activation_constraint(mesh: Mesh, rules: Mapping[str, str | None]):
    """The hint for `lm.model.activation_sharding`: logical activation axes → a NamedSharding.

    `batch` (rows, or rows × time once flattened) is split over the batch axes (data, fsdp)
    of size > 1 when they divide it; `length` and `embed` stay whole (FSDP splits the weights'
    embed axis, never the activations'); every other name (heads, kv_heads, mlp, vocab) goes
    through `rules` as for parameters. None on a 1-device mesh: no constraint at all.
    """
    if mesh.size == 1:
        return None
    batch_axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    batch_size = math.prod(mesh.shape[a] for a in batch_axes)

    def hint(axes: tuple[str | None, ...], shape: tuple[int, ...]) -> NamedSharding:
        if len(axes) != len(shape):
            raise ValueError(f"activation axes {axes} do not match shape {shape}")
        spec: list = []
        used: set[str] = set()
        for name, dim in zip(axes, shape):
            if name == "batch":
                ok = batch_axes and dim % batch_size == 0
                spec.append(batch_axes if ok else None)
                used.update(batch_axes if ok else ())
                continue
            axis = None if name in (None, "length", "embed") else rules.get(name)
            if axis is not None and (axis in used or mesh.shape[axis] == 1 or dim % mesh.shape[axis]):
                axis = None
            if axis is not None:
                used.add(axis)
            spec.append(axis)
        return NamedSharding(mesh, P(*spec))

    return hint


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[B, T] arrays: rows split over (data, fsdp), time replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, None))


@functools.lru_cache(maxsize=32)
def batch_shard(mesh: jax.sharding.Mesh, global_batch_size: int | None = None) -> tuple[int, int]:
    """(index, count): this process feeds rows [index·B/count, (index+1)·B/count) of every global
    batch of B rows split over (data, fsdp) (B: any multiple of data × fsdp; the default is
    data × fsdp itself — the answer is the same for all).

    count = process_count when the batch axes span the processes (the usual case); when a mesh
    axis that does not split the batch (tensor) spans processes, those processes share rows and
    count < process_count. Processes with the same index must load the same data.
    Cached per (mesh, size): `lm.train.global_batch` asks at every step.
    """
    sharding = batch_sharding(mesh)
    global_batch_size = global_batch_size or mesh.shape["data"] * mesh.shape["fsdp"]
    rows: dict[int, set[tuple[int, int]]] = {}
    for device, index in sharding.devices_indices_map((global_batch_size, 1)).items():
        start, stop, _ = index[0].indices(global_batch_size)
        rows.setdefault(device.process_index, set()).add((start, stop))
    spans = {}
    for process, blocks in rows.items():
        lo, hi = min(b[0] for b in blocks), max(b[1] for b in blocks)
        if sum(b[1] - b[0] for b in blocks) != hi - lo:
            raise ValueError(f"mesh {dict(mesh.shape)}: process {process} holds non-contiguous batch rows "
                             f"{sorted(blocks)}; order the devices so each process's rows are contiguous")
        spans[process] = (lo, hi)
    lo, hi = spans[jax.process_index()]
    size = hi - lo
    if any(h - l != size for l, h in spans.values()) or global_batch_size % size:
        raise ValueError(f"mesh {dict(mesh.shape)}: processes hold unequal parts of the batch: {spans}")
    return lo // size, global_batch_size // size


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def per_device_bytes(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) laid out by `shardings`."""
    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings, is_leaf=lambda v: isinstance(v, NamedSharding))):
        shard = s.shard_shape(x.shape)
        total += math.prod(shard) * np.dtype(x.dtype).itemsize
    return total
