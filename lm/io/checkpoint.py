"""Checkpoints with orbax: train state, data-iterator state, resolved config; checked on restore.

Layout of a run directory:
    config.json                      the resolved config (readable JSON, written by lm/cli/train.py)
    config_history/config.step<N>.json  the config a resumed run had before (it trained up to step N)
    checkpoints/<step>/state/        the TrainState (orbax PyTree: step, params, opt_state, rng, …)
    checkpoints/<step>/data/process_<i>  each process's data iterator get_state() (JSON)
    checkpoints/<step>/meta/metadata step, time, a checksum of every array, counters (JSON)
    checkpoints/<step>/config/metadata  the resolved config again, so a step directory stands alone
    checkpoints_broken/<step>-<time>/   checkpoints that failed to restore, set aside (never deleted)

Why it can be trusted:
  * Saving is asynchronous: `save` copies the arrays to host memory and returns; a background
    thread writes them into `<step>.orbax-checkpoint-tmp*` and renames that to `<step>` only
    when everything is written. A save cut short (kill -9, power loss) leaves only the temporary
    directory, which is never listed as a checkpoint; `Checkpointer` reports and removes it.
  * orbax does not notice flipped bytes in an array file (it restores wrong numbers). So each
    save also records exact checksums of every array (lm/io/checksum.py; independent of sharding)
    and `restore` recomputes them: a damaged checkpoint is refused, and `restore` falls back to
    the newest one that reads back intact, saying so.
  * Shapes are compared with the model before any array is read: a checkpoint of another
    model shape is an error that names the first array that differs and both shapes.

Restoring lays every array out as the target says (its `jax.ShapeDtypeStruct.sharding`), so a
checkpoint written on one mesh or device count restores onto any other.

Every path goes through lm/io/paths.py (etils.epath), so a run directory may be local or on
an object store (gs://...).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import time
from typing import Any, NamedTuple

import jax
import ml_collections
import orbax.checkpoint as ocp

from lm.io import paths
from lm.io.run_config import config_differences, read_config, write_config  # noqa: F401 (this module's API too)
from lm.io.checksum import fingerprints, fingerprints_json, leaves_by_path, start_fingerprints

TMP_MARK = ".orbax-checkpoint-tmp"  # orbax's suffix for a step directory still being written
BROKEN_DIR = "checkpoints_broken"


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model (different shape or missing array)."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint's arrays do not match the checksums written with them."""


class NoUsableCheckpointError(RuntimeError):
    """Every checkpoint in a directory failed to restore."""


class Restored(NamedTuple):
    tree: Any  # the restored pytree, laid out like the target
    data: dict  # the data iterator state ({} when not restored)
    meta: dict  # the meta item ({} for checkpoints written before it existed)
    step: int
    path: str  # the step directory it came from


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def checkpoint_dir(workdir: str) -> str:
    return str(paths.run_path(workdir) / "checkpoints")


def _steps_in(directory: str) -> list[int]:
    return sorted(int(p.name) for p in paths.run_path(directory).iterdir() if p.name.isdigit() and p.is_dir())


def find_checkpoints(path: str) -> tuple[str, int | None]:
    """Resolve `path` → (checkpoints directory, step or None for "the newest").

    `path` may be a run directory (holding checkpoints/), a checkpoints/ directory, or one
    step directory checkpoints/<step>. Errors name the path and what was expected there.
    """
    path = paths.run_path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if not path.is_dir() or (not paths.is_remote(path) and not os.access(path, os.R_OK | os.X_OK)):
        raise PermissionError(f"checkpoint path {path} is not a readable directory")
    if path.name.isdigit() and (path / "state").is_dir():
        return str(path.parent), int(path.name)
    for directory in (path / "checkpoints", path):
        if directory.is_dir() and _steps_in(directory):
            return str(directory), None
    raise FileNotFoundError(f"{path} holds no checkpoint: expected a run directory with checkpoints/<step>/, "
                            f"a checkpoints/ directory, or one checkpoints/<step>/ directory")


# -- reading and writing ----------------------------------------------------------------------------

class _MetaHandler(ocp.JsonCheckpointHandler):
    """The JSON handler of the `meta` item. Its checksums arrive as device arrays still being
    computed; they are waited for here, in the background commit, not in the train loop.
    `delay_s` > 0 holds the save open (a test hook)."""

    def __init__(self, delay_s: float = 0.0):
        super().__init__()
        self._delay_s = delay_s

    async def _save_fn(self, x, directory):
        if self._delay_s:
            await asyncio.sleep(self._delay_s)
        x = dict(x, fingerprints=fingerprints_json(x["fingerprints"]))
        await super()._save_fn(x, directory)


class _DataHandler(ocp.JsonCheckpointHandler):
    """The data-iterator state of every process, one JSON file each (data/process_<i>): each
    process reads its own shard of the data, so each resumes from its own position."""

    def __init__(self):
        super().__init__(filename=f"process_{jax.process_index()}",
                         multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=None))

    def restore(self, directory, item=None, args=None):
        path = directory / self._filename
        if not path.exists():
            saved = sorted(p.name for p in directory.iterdir() if p.name.startswith("process_"))
            if not saved:  # written before per-process files: one state for every process
                path = directory / "metadata"
            else:
                path = directory / saved[jax.process_index() % len(saved)]
                _log(f"{directory} holds the data states of {len(saved)} processes but this run has "
                     f"{jax.process_count()}: process {jax.process_index()} continues {path.name}'s; the data "
                     f"order differs from an uninterrupted run's")
        return json.loads(path.read_text())


@ocp.args.register_with_handler(_DataHandler, for_save=True)
@dataclasses.dataclass
class _DataSave(ocp.args.JsonSave):
    pass


@ocp.args.register_with_handler(_DataHandler, for_restore=True)
@dataclasses.dataclass
class _DataRestore(ocp.args.JsonRestore):
    pass


@ocp.args.register_with_handler(_MetaHandler, for_save=True)
@dataclasses.dataclass
class _MetaSave(ocp.args.JsonSave):
    pass


@ocp.args.register_with_handler(_MetaHandler, for_restore=True)
@dataclasses.dataclass
class _MetaRestore(ocp.args.JsonRestore):
    pass


def _manager(directory: str, *, read_only: bool, keep: int | None = None, async_save: bool = True,
             save_delay_s: float = 0.0) -> ocp.CheckpointManager:
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": _DataHandler(),
                "meta": _MetaHandler(save_delay_s), "config": ocp.JsonCheckpointHandler()}
    options = ocp.CheckpointManagerOptions(
        read_only=read_only, create=not read_only, max_to_keep=None if read_only else keep,
        save_interval_steps=0 if read_only else 1, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(directory, item_handlers=handlers, options=options)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


class CheckpointReader:
    """Restores from one checkpoints directory: the newest intact step, or a given one."""

    def __init__(self, directory: str, *, manager: ocp.CheckpointManager | None = None):
        self.directory = str(paths.run_path(directory))
        self.manager = manager or _manager(self.directory, read_only=True)
        self.broken: list[int] = []  # steps that failed in the last `restore` (newer than the one returned)

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def check_fits(self, step: int, target: Any) -> None:
        """Raise CheckpointMismatchError naming the first array of `target` that the checkpoint
        lacks or holds with another shape. Reads only metadata."""
        stored_tree = self.manager.item_metadata(step)["state"]
        stored = leaves_by_path(stored_tree, is_leaf=lambda x: hasattr(x, "shape"))
        where = self.step_path(step)
        for path, leaf in leaves_by_path(target).items():
            if path not in stored:
                raise CheckpointMismatchError(
                    f"checkpoint {where} does not fit: it has no array {path!r} (it holds {len(stored)} "
                    f"arrays, e.g. {sorted(stored)[:3]}); was it written by another model or optimizer?")
            if tuple(stored[path].shape) != tuple(leaf.shape):
                raise CheckpointMismatchError(
                    f"checkpoint {where} does not fit the model: {path!r} has shape "
                    f"{tuple(stored[path].shape)} in the checkpoint but {tuple(leaf.shape)} in the model "
                    f"(model.* must match the run that wrote it; see its config.json)")

    def read(self, step: int, target: Any, *, partial: bool = False, with_data: bool = True) -> Restored:
        """One step, no fallback. `target`: ShapeDtypeStructs with shardings (see
        `abstract_with_shardings`); `partial`: target is a sub-tree, e.g. {'params': …}."""
        self.check_fits(step, target)
        path = self.step_path(step)
        args = {"state": ocp.args.PyTreeRestore(item=target, partial_restore=partial,
                                                restore_args=ocp.checkpoint_utils.construct_restore_args(target))}
        if with_data:
            args["data"] = _DataRestore()
        has_meta = (paths.run_path(path) / "meta").is_dir()
        if has_meta:
            args["meta"] = _MetaRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        meta = dict(restored.meta) if has_meta else {}
        expected = meta.get("fingerprints", {})
        for key, value in fingerprints(restored.state).items():
            if key in expected and list(expected[key]) != value:
                raise CorruptCheckpointError(
                    f"checkpoint {path}: array {key!r} does not match the checksum saved with it "
                    f"(a file under {path}/state is damaged)")
        data = dict(restored.data or {}) if with_data else {}
        return Restored(restored.state, data, meta, step, path)

    def restore(self, target: Any, step: int | None = None, *, partial: bool = False,
                with_data: bool = True) -> Restored:
        """The newest checkpoint that reads back intact (or exactly `step`). A checkpoint that
        fails to read or verify is reported and the next older one tried; a shape mismatch is
        raised at once (an older checkpoint would not fit either)."""
        steps = [step] if step is not None else sorted(self.steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        failures: list[str] = []
        self.broken = []
        for s in steps:
            try:
                result = self.read(s, target, partial=partial, with_data=with_data)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 — any read failure: report it, try an older one
                failures.append(f"step {s}: {_first_line(e)}")
                self.broken.append(s)
                _log(f"checkpoint {self.step_path(s)} cannot be restored ({_first_line(e)})"
                     + ("; trying the previous one" if s != steps[-1] else ""))
                continue
            if failures:
                _log(f"falling back to checkpoint {result.path}: the newer one(s) of step(s) "
                     f"{', '.join(map(str, self.broken))} are broken")
            return result
        raise NoUsableCheckpointError(f"no checkpoint in {self.directory} could be restored (move them "
                                      f"elsewhere to start afresh):\n  " + "\n  ".join(failures))

    def close(self) -> None:
        self.manager.close()


class Checkpointer(CheckpointReader):
    """The checkpoints of one run directory: save (async), keep the newest `keep`, restore.

    On creation it reports saves that were cut short (left as temporary directories); orbax
    then removes them.
    """

    def __init__(self, workdir: str, *, keep: int, async_save: bool = True, config: Any = None,
                 save_delay_s: float = 0.0):
        directory = checkpoint_dir(workdir)
        self.workdir = str(paths.run_path(workdir))
        self.interrupted = self._find_interrupted(directory)
        for name in self.interrupted:
            _log(f"ignoring {os.path.join(directory, name)}: a checkpoint save that did not finish")
        super().__init__(directory, manager=_manager(directory, read_only=False, keep=keep,
                                                     async_save=async_save, save_delay_s=save_delay_s))
        self._config = _config_json(config) if config is not None else {}

    @staticmethod
    def _find_interrupted(directory: str) -> list[str]:
        directory = paths.run_path(directory)
        if jax.process_index() or not directory.is_dir():
            return []
        return sorted(p.name for p in directory.iterdir() if TMP_MARK in p.name)

    def save(self, step: int, state: Any, data_state: dict | None, extra: dict | None = None) -> None:
        """Start writing `state` (+ data state, config, checksums) as step `step`; returns once the
        arrays are copied to host memory. `extra`: more JSON fields for the meta item."""
        meta = {"step": int(step), "time": time.time(), "fingerprints": start_fingerprints(state), **(extra or {})}
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(state), data=_DataSave(data_state or {}),
                                  meta=_MetaSave(meta), config=ocp.args.JsonSave(self._config))
        self.manager.save(step, args=args, force=True)

    def set_aside(self, steps: list[int]) -> list[str]:
        """Move broken step directories to <workdir>/checkpoints_broken/ (so that their steps
        can be saved again); returns where they went."""
        moved = []
        if jax.process_index() == 0:
            for step in steps:
                dest = os.path.join(self.workdir, BROKEN_DIR, f"{step}-{int(time.time())}")
                paths.run_path(dest).parent.mkdir(parents=True, exist_ok=True)
                if paths.is_remote(dest):
                    paths.run_path(self.step_path(step)).rename(dest)
                else:
                    shutil.move(self.step_path(step), dest)
                moved.append(dest)
                _log(f"moved the broken checkpoint of step {step} to {dest}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("lm.io.checkpoint.set_aside")
        self.manager.reload()
        return moved

    def wait(self) -> None:
        self.manager.wait_until_finished()


def _config_json(config: Any) -> dict:
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config, default=str))


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings: restore reshards onto the current mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore_params(path: str, abstract_params: Any) -> Restored:
    """Only the parameters of the newest intact checkpoint under `path` (a run, checkpoints/ or
    step directory; see `find_checkpoints`). `abstract_params`: ShapeDtypeStructs with shardings.
    Returns a Restored whose `.tree` is the params tree."""
    directory, step = find_checkpoints(path)
    reader = CheckpointReader(directory)
    try:
        result = reader.restore({"params": abstract_params}, step, partial=True, with_data=False)
    finally:
        reader.close()
    return result._replace(tree=result.tree["params"])


def stored_param_shapes(path: str) -> tuple[str, int, dict[str, tuple]]:
    """(checkpoint directory, step, {param path: shape}) of the newest checkpoint under `path`;
    reads only metadata. Paths as `leaves_by_path` writes them, without the 'params/' prefix."""
    directory, step = find_checkpoints(path)
    reader = CheckpointReader(directory)
    try:
        step = step if step is not None else reader.latest_step()
        stored = leaves_by_path(reader.manager.item_metadata(step)["state"], is_leaf=lambda x: hasattr(x, "shape"))
    finally:
        reader.close()
    return directory, step, {k[len("params/"):]: tuple(v.shape) for k, v in stored.items() if k.startswith("params/")}


def load_for_inference(run_dir: str, step: int | None = None):
    """(model_cfg, graphdef, params, config) from a run directory's newest intact (or given)
    checkpoint, on the first device."""
    from flax import nnx

    from lm.data import build_tokenizer
    from lm.model import ModelConfig, Transformer

    config = read_config(run_dir)
    vocab = build_tokenizer(config.data).vocab_size if config.model.get("vocab_size") is None else None
    model_cfg = ModelConfig.from_config(config.model, vocab)
    graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          nnx.to_pure_dict(abstract_params))
    path = run_dir if step is None else os.path.join(checkpoint_dir(run_dir), str(step))
    return model_cfg, graphdef, restore_params(path, target).tree, config
