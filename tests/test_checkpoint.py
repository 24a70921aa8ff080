"""Checkpoints in-process: resharding across meshes, checksums, fallback past broken checkpoints,
clear errors, and the preemption signal handling. (Killed processes: tests/test_fault_tolerance.py.)"""

import dataclasses
import os
import shutil
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import default
from lm.io import checkpoint as ckpt
from lm.io import checksum
from lm import train
from lm.train import loop
from lm.train import preemption
from lm.parallel import sharding as shd
from lm.model import ModelConfig
from lm.train.optim import make_optimizer

CFG = ModelConfig(vocab_size=16, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
MESH_8 = {"data": 2, "fsdp": 2, "tensor": 2}
MESH_1 = {"data": -1, "fsdp": 1, "tensor": 1}
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _optimizer():
    return make_optimizer(default.get_config("tiny").optimizer, 10)[0]


def _target(devices, sizes, model_cfg=CFG):
    """ShapeDtypeStructs of the train state, laid out on a mesh of `devices` (nothing allocated)."""
    mesh = shd.make_mesh(sizes, devices)
    setup = train.plan_state(model_cfg, _optimizer(), mesh, default.get_config().mesh.rules)
    return ckpt.abstract_with_shardings(setup.abstract_state, setup.state_shardings)


def _save(workdir, steps, state, **kwargs):
    writer = ckpt.Checkpointer(str(workdir), keep=5, **kwargs)
    for step in steps:
        writer.save(step, state, {"batches": step})
    writer.wait()
    writer.close()
    return ckpt.checkpoint_dir(str(workdir))


def _array_chunk_files(step_dir):
    files = [os.path.join(d, f) for d, _, names in os.walk(os.path.join(step_dir, "state")) for f in names]
    return [f for f in files if open(f, "rb").read(4) == ZSTD_MAGIC]


def _plain_orbax_read(directory, step, target, partial):
    manager = ckpt.CheckpointReader(directory).manager
    args = ocp.args.PyTreeRestore(item=target, partial_restore=partial,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    return manager.restore(step, args=ocp.args.Composite(state=args)).state


def flip_a_bit_orbax_misses(directory, step, target, partial=False):
    """Flip one bit in an array-chunk file of the step such that orbax alone still restores it,
    but as different numbers: the damage only a checksum can catch. (Chunk files also hold index
    entries that a restore may not read, so a few places are tried, each on a scratch copy.)"""
    step_dir = os.path.join(directory, str(step))
    original = jax.tree.leaves(_plain_orbax_read(directory, step, target, partial))
    for i, (path, fraction) in enumerate((f, x) for f in sorted(_array_chunk_files(step_dir), key=os.path.getsize,
                                                                 reverse=True) for x in (0.5, 0.3, 0.7, 0.2, 0.8)):
        flipped = bytearray(open(path, "rb").read())
        flipped[int(len(flipped) * fraction)] ^= 0x10
        scratch = f"{directory}.probe{i}"
        shutil.copytree(step_dir, os.path.join(scratch, str(step)))
        open(os.path.join(scratch, os.path.relpath(path, directory)), "wb").write(bytes(flipped))
        try:
            restored = jax.tree.leaves(_plain_orbax_read(scratch, step, target, partial))
            silent = not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(restored, original))
        except Exception:  # noqa: BLE001 — this flip breaks decoding: orbax notices it by itself
            silent = False
        shutil.rmtree(scratch)
        if silent:
            open(path, "wb").write(bytes(flipped))
            return
    raise AssertionError(f"no single-bit flip in {step_dir} changes the restored numbers")


@pytest.fixture(scope="module")
def state_8():
    """A train state of random numbers on 8 devices (data 2 × fsdp 2 × tensor 2)."""
    target = _target(jax.devices(), MESH_8)
    rng = np.random.default_rng(0)

    def fill(x):
        if np.issubdtype(x.dtype, np.floating):
            values = rng.standard_normal(x.shape).astype(x.dtype)
        else:
            values = rng.integers(0, 1000, x.shape).astype(x.dtype)
        return jax.device_put(values, x.sharding)

    return jax.tree.map(fill, target)


def _assert_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_restore_reshards_from_8_devices_to_1_and_back(state_8, tmp_path):
    directory = _save(tmp_path / "eight", [5], state_8)
    on_one = ckpt.CheckpointReader(directory).restore(_target(jax.devices()[:1], MESH_1))
    assert on_one.step == 5 and on_one.data == {"batches": 5}
    _assert_equal(on_one.tree, state_8)
    assert {d for x in jax.tree.leaves(on_one.tree) for d in x.sharding.device_set} == {jax.devices()[0]}

    directory = _save(tmp_path / "one", [6], on_one.tree)
    target_8 = _target(jax.devices(), MESH_8)
    back = ckpt.CheckpointReader(directory).restore(target_8).tree
    _assert_equal(back, state_8)
    w_up = back.params["blocks"]["mlp"]["w_up"]  # [L, D, F]: embed over fsdp, mlp over tensor
    assert w_up.sharding == target_8.params["blocks"]["mlp"]["w_up"].sharding
    assert w_up.sharding.spec == P(None, "fsdp", "tensor") and len(w_up.addressable_shards) == 8


def test_fingerprints_ignore_sharding_and_see_a_flipped_bit_or_a_swap():
    x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    mesh = shd.make_mesh(MESH_8, jax.devices())
    one = checksum.fingerprints({"x": jax.device_put(x, jax.devices()[0])})
    eight = checksum.fingerprints({"x": jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"), "tensor")))})
    assert one == eight
    flipped = x.copy()
    flipped.view(np.uint32)[3, 5] ^= 1 << 31
    swapped = x.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    for changed in (flipped, swapped):
        assert checksum.fingerprints({"x": jax.device_put(changed, jax.devices()[0])})["x"][1] != one["x"][1]


def test_broken_newest_checkpoints_are_reported_set_aside_and_saved_again(state_8, tmp_path, capsys):
    directory = _save(tmp_path, [1, 2, 3], state_8)
    target = _target(jax.devices()[:1], MESH_1)
    flip_a_bit_orbax_misses(directory, 3, target)
    with open(os.path.join(directory, "2", "state", "_METADATA"), "r+") as f:
        f.truncate(100)  # a metadata file cut short
    workdir = ckpt.Checkpointer(str(tmp_path), keep=5)
    restored = workdir.restore(target)
    out = capsys.readouterr().out
    assert restored.step == 1 and workdir.broken == [3, 2]
    assert f"checkpoint {directory}/3 cannot be restored (CorruptCheckpointError" in out
    assert f"checkpoint {directory}/2 cannot be restored" in out and "falling back to checkpoint" in out
    _assert_equal(restored.tree, state_8)
    moved = workdir.set_aside(workdir.broken)
    assert workdir.steps() == [1] and all(os.path.isdir(m) for m in moved)
    workdir.save(2, restored.tree, restored.data)  # the step of a set-aside checkpoint is free again
    workdir.wait()
    assert workdir.steps() == [1, 2]
    workdir.close()


def test_when_no_checkpoint_can_be_restored_each_is_named(state_8, tmp_path):
    # a directory of its own, never read before in this process: an earlier read of the same
    # files (the test above) made this check pass now and then under load, reading what it had
    # read before instead of the truncated files
    directory = _save(tmp_path, [1, 2], state_8)
    target = _target(jax.devices()[:1], MESH_1)
    for step in (1, 2):
        chunks = _array_chunk_files(os.path.join(directory, str(step)))
        assert chunks, f"no array data found under checkpoint {step}"
        for chunk in chunks:
            os.truncate(chunk, os.path.getsize(chunk) // 2)  # writes cut short
    with pytest.raises(ckpt.NoUsableCheckpointError, match=r"could be restored \(.*\):\n  step 2: .*\n  step 1: "):
        ckpt.CheckpointReader(directory).restore(target)


def test_a_checkpoint_of_another_shape_names_the_parameter_and_both_shapes(state_8, tmp_path):
    directory = _save(tmp_path, [1], state_8)
    wider = _target(jax.devices()[:1], MESH_1, dataclasses.replace(CFG, mlp_dim=128))
    with pytest.raises(ckpt.CheckpointMismatchError,
                       match=r"'params/blocks/mlp/w_down' has shape \(2, 64, 32\) in the checkpoint but "
                             r"\(2, 128, 32\) in the model"):
        ckpt.CheckpointReader(directory).restore(wider)
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"'params/blocks/mlp/w_down' has shape"):
        ckpt.restore_params(str(tmp_path), wider.params)


def test_missing_or_unreadable_paths_say_which(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"checkpoint path {missing} does not exist"):
        ckpt.find_checkpoints(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'empty'} holds no checkpoint"):
        ckpt.find_checkpoints(str(tmp_path / "empty"))
    (tmp_path / "file").write_text("not a checkpoint")
    with pytest.raises(PermissionError, match=f"{tmp_path / 'file'} is not a readable directory"):
        ckpt.find_checkpoints(str(tmp_path / "file"))
    with pytest.raises(FileNotFoundError, match=f"{missing}/config.json does not exist"):
        ckpt.load_for_inference(str(missing))
    config = default.get_config("tiny")
    config.train.restore_from = str(missing)
    config.train.batch_size = 8  # one row per virtual device
    with pytest.raises(FileNotFoundError, match=str(missing)):  # before anything is compiled
        loop.run(config, str(tmp_path / "run"), model_cfg=CFG, make_loss_fn=None, train_iter=None,
                 valid_batches=None)


def test_a_run_directory_a_checkpoints_directory_and_a_step_directory_all_resolve(state_8, tmp_path):
    directory = _save(tmp_path, [4, 8], state_8)
    assert ckpt.find_checkpoints(str(tmp_path)) == (directory, None)
    assert ckpt.find_checkpoints(directory) == (directory, None)
    assert ckpt.find_checkpoints(os.path.join(directory, "4")) == (directory, 4)
    params = ckpt.restore_params(os.path.join(directory, "4"), _target(jax.devices()[:1], MESH_1).params)
    assert params.step == 4
    _assert_equal(params.tree, state_8.params)


def test_sigint_requests_a_stop_and_a_second_one_interrupts():
    before = signal.getsignal(signal.SIGINT)
    with preemption.PreemptionWatcher() as watcher:
        assert not watcher.should_stop(1)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs in the main thread, between bytecodes
        assert watcher.should_stop(2) and watcher.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is before
    stop = preemption.Preempted("preempted after step 3", 3, "/x/checkpoints/3")
    assert isinstance(stop, SystemExit) and stop.code == 0 and stop.step == 3


def test_nan_injection_hook():
    assert loop.parse_steps("4, 7,8") == {4, 7, 8} and loop.parse_steps("") == set()
    with pytest.raises(ValueError, match="nan_steps"):
        loop.parse_steps("four")
    batch = {"loss_mask": np.ones((2, 3), np.float32), "inputs": np.zeros((2, 3), np.int32)}
    assert np.isnan(loop.poison(batch)["loss_mask"]).all() and batch["loss_mask"].sum() == 6
