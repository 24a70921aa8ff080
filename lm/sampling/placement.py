"""Where the arrays of decoding live on a mesh: the in/out shardings of the prefill and decode jits.

`Placement(mesh, rules)` is hashable (a static argument of those jits) and gives

- the parameters' shardings, from their logical axes through `rules` (lm.parallel.sharding, as
  for training; the decode layout's fused weights carry logical axes too, lm/model/cpu.py);
- the loop state's: rows (tokens, done, lengths, row keys, kept log-probs, logits) over the
  batch axes (data, fsdp) when they divide the batch, the KV cache by rows and by `kv_heads`
  through the rules (k `[L, B, K, hd, S]`, v `[L, B, K, S, hd]`, or L per-layer arrays), scalars
  replicated;
- the activation hints the model is traced under (lm.model.constrain), so each device decodes
  its own rows and no device gathers another's activations or logits.

A 1-device mesh (the default) places everything on that device: one code path for every mesh.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lm.model.hints import activation_sharding
from lm.parallel import sharding as shd

# logical axes of the cache arrays (lm/model/cache.py), without the stacked `layers` axis
_CACHE_AXES = {"k": ("batch", "kv_heads", "head_dim", "length"), "v": ("batch", "kv_heads", "length", "head_dim"),
               "segment_ids": ("batch", "length")}


@dataclasses.dataclass(frozen=True)
class Placement:
    """A mesh and its logical-axis rules (as a sorted tuple of pairs: hashable)."""

    mesh: Mesh
    rules: tuple[tuple[str, str | None], ...] = ()

    @classmethod
    def of(cls, mesh: Mesh | None = None, rules: Mapping[str, str | None] | None = None) -> "Placement":
        """From a mesh (None: the first device alone) and its rules (config.mesh.rules; None: all
        replicated)."""
        if mesh is None:
            mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
        return cls(mesh, tuple(sorted(dict(rules or {}).items())))

    @property
    def hint(self):
        """The activation hint function (None on one device: no constraint)."""
        return shd.activation_constraint(self.mesh, dict(self.rules))

    def traced(self):
        """A context: trace the model under this mesh's activation hints."""
        return activation_sharding(self.hint)

    def sharding(self, axes: tuple[str | None, ...], shape: tuple[int, ...]) -> NamedSharding:
        """An array of these logical axes and shape (rows, kv heads, …; see the module docstring)."""
        found = None if not shape else (self.hint and self.hint(axes, shape))
        return found or NamedSharding(self.mesh, P())

    def params(self, state: nnx.State) -> tuple[Any, Any]:
        """(the parameters as a pure dict, their shardings) from a model's nnx.split state."""
        pure = nnx.to_pure_dict(state)
        axes = shd.logical_axes_tree(state)
        names = {a for t in jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)) for a in t if a}
        rules = {**{name: None for name in names}, **dict(self.rules)}  # a name without a rule: replicated
        return pure, shd.param_shardings(axes, pure, rules, self.mesh)

    def state(self, state: dict) -> dict:
        """Shardings of a decode loop state (or a prompt dict): see the module docstring."""
        def leaf(path, x):
            names = [getattr(k, "key", None) for k in path]
            shape = tuple(x.shape)
            if "cache" in names and names[names.index("cache") + 1] in _CACHE_AXES:
                axes = _CACHE_AXES[names[names.index("cache") + 1]]
                axes = ("layers",) * (len(shape) - len(axes)) + axes  # stacked: [L, ...]
            else:
                axes = ("batch",) + (None,) * (len(shape) - 1) if shape else ()
            return self.sharding(axes, shape)

        return jax.tree_util.tree_map_with_path(leaf, state)

    def constrain(self, state: dict) -> dict:
        """`state` pinned to `self.state(state)` (inside a jit: its outputs' shardings); as it is on
        one device."""
        if self.mesh.size == 1:
            return state
        return jax.lax.with_sharding_constraint(state, self.state(state))

    def replicate(self, tree: Any) -> Any:
        """`tree` placed whole on every device of the mesh."""
        return jax.device_put(tree, NamedSharding(self.mesh, P()))

    def put(self, state: dict) -> dict:
        """`state` (numpy or jax arrays) placed on the mesh by `self.state`."""
        return jax.device_put(state, self.state(state))
