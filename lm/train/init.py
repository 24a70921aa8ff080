"""Where a new run's parameters come from when it starts from another run (`train.init_from`), and
where frozen models' parameters come from.

`init_params(path, abstract, fresh)`: every parameter of the new model whose path and shape match
an array of the checkpoint's parameters is taken from it; the others keep their fresh
initialization, and they are named in the log. So a RewardModel or a policy with a value head
(lm/model/heads.py) starts from a language model's checkpoint with a new head, and a policy starts
from an SFT run. A checkpoint sharing no parameter with the model is an error, and so is a shape
mismatch at a shared path (another model.* config).
"""

from __future__ import annotations

from typing import Any

import jax

from lm.io import checkpoint as ckpt
from lm.io.checksum import leaves_by_path


def _prune(tree: Any, keep: set[str], prefix: str = "") -> Any:
    """The sub-tree of a nested dict whose leaf paths ('a/b/c') are in `keep` (empty dicts dropped)."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            sub = _prune(value, keep, path + "/")
            if sub:
                out[key] = sub
        elif path in keep:
            out[key] = value
    return out


def _merge(base: dict, update: dict) -> dict:
    return {k: _merge(v, update[k]) if isinstance(v, dict) and k in update else update.get(k, v)
            for k, v in base.items()}


def init_params(path: str, abstract: Any, fresh: Any, log=print) -> tuple[Any, list[str]]:
    """(`fresh` with every array the checkpoint under `path` holds at the same path and shape
    restored into it, the paths that stayed fresh). `abstract`: ShapeDtypeStructs with the target
    shardings (`ckpt.abstract_with_shardings`)."""
    _, step, stored = ckpt.stored_param_shapes(path)
    wanted = leaves_by_path(abstract)
    mismatched = [f"{p}: {stored[p]} in the checkpoint, {tuple(a.shape)} here" for p, a in wanted.items()
                  if p in stored and stored[p] != tuple(a.shape)]
    if mismatched:
        raise ckpt.CheckpointMismatchError(f"train.init_from={path!r} does not fit the model: " + "; ".join(mismatched)
                                           + " (model.* must match the run that wrote it; see its config.json)")
    shared = {p for p in wanted if p in stored}
    if not shared:
        raise ckpt.CheckpointMismatchError(f"train.init_from={path!r}: its checkpoint (step {step}) shares no "
                                           f"parameter with the model (it holds e.g. {sorted(stored)[:3]})")
    restored = ckpt.restore_params(path, _prune(abstract, shared))
    fresh_paths = sorted(set(wanted) - shared)
    log(f"parameters from {restored.path} (step {restored.step}): {len(shared)} arrays"
        + (f"; freshly initialized: {', '.join(fresh_paths)}" if fresh_paths else ""))
    return _merge(fresh, restored.tree), fresh_paths


def load_frozen(path: str, abstract: Any) -> Any:
    """All parameters of a frozen model from the checkpoint under `path` (every one must be there),
    in the dtypes of `abstract` (a frozen model's compute dtype, lm/train/state.py): read as stored
    (float32, so that the checksums verify), then cast on the device, the float32 copy freed."""
    import jax.numpy as jnp

    stored = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=a.sharding)
                          if jnp.issubdtype(a.dtype, jnp.floating) else a, abstract)
    tree = ckpt.restore_params(path, stored).tree
    if any(a.dtype != s.dtype for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(stored))):
        shardings = jax.tree.map(lambda a: a.sharding, abstract)
        tree = jax.jit(lambda t: jax.tree.map(lambda x, a: x.astype(a.dtype), t, abstract),
                       out_shardings=shardings, donate_argnums=0)(tree)
    return jax.block_until_ready(tree)
