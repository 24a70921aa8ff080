"""Checkpoints with orbax: the train state, the data iterator state and the resolved config.

Layout of a run directory:
    config.json              the resolved config (readable JSON)
    checkpoints/<step>/      state (orbax PyTree), data (JSON iterator state)

Saving is asynchronous (the next steps run while the arrays are written); orbax
writes into a temporary directory and renames it when complete, so a save
interrupted midway is never listed as a checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
    """Save every `every` steps (and on demand); keep the newest `keep`."""

    def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                             item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict | None) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state or {}))
        self.manager.save(step, args=args, force=True)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """(state laid out as `abstract_state` — ShapeDtypeStructs with shardings —, data state, step)."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored.state, restored.data, step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings: restore reshards onto the current mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: is {workdir!r} a run directory of lm?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_for_inference(run_dir: str, step: int | None = None):
    """(model_cfg, graphdef, params, config) from a run directory's newest (or given) checkpoint."""
    from flax import nnx

    from lm.data import build_tokenizer
    from lm.model import ModelConfig, Transformer

    config = read_config(run_dir)
    model_fields = dict(config.model)
    if model_fields.get("vocab_size") is None:
        model_fields["vocab_size"] = build_tokenizer(config.data).vocab_size
    model_cfg = ModelConfig(**model_fields)
    abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract)
    abstract_params = nnx.to_pure_dict(abstract_params)
    manager = ocp.CheckpointManager(checkpoint_dir(run_dir), item_names=("state", "data"),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(run_dir)}")
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                                     abstract_params)}
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=target, restore_args=jax.tree.map(
            lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target), partial_restore=True)))
    return model_cfg, graphdef, restored.state["params"], config
