"""Two real processes × 4 virtual CPU devices on 127.0.0.1, through jax.distributed and gloo.

  * trained from the same data, they reach the single-process loss and parameters, on meshes
    that split the batch across the processes and on one that splits only the model;
  * the checkpoint they save together restores in one process;
  * `python -m lm.cli.train` runs as two processes: one metrics writer, one set of checkpoints;
  * a killed process (during training, or the coordinator), or one that raises, makes the
    other exit non-zero with a clear message within the heartbeat timeout (10 s here), never
    a hang.

This file is also the worker: `python tests/test_multiprocess.py <mode> <out_dir>` with the
LM_COORDINATOR_ADDRESS / LM_NUM_PROCESSES / LM_PROCESS_ID environment of one process.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = [(2, 2, 2), (1, 1, 8)]  # the batch split over both processes; only the model split over both
HEARTBEAT_S = 10
pytestmark = pytest.mark.slow


# -- the worker side -------------------------------------------------------------------------------


def _markov():
    """The `markov` fixture of conftest.py (the same chain in the workers and in pytest)."""
    from conftest import ALPHABET
    from lm.data.markov import MarkovSource

    return MarkovSource(alphabet=ALPHABET, order=1, concentration=0.5, seed=0)


def _by_path(tree) -> dict:
    import jax

    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _worker_train(out_dir: str) -> None:
    """3 steps per mesh on the batches of tests/test_train.py; process 0 writes the results."""
    from configs import default
    from lm.parallel import distributed

    config = default.get_config("tiny")
    config.distributed.heartbeat_timeout_s = HEARTBEAT_S
    assert distributed.maybe_initialize(config)
    import jax
    from jax.experimental import multihost_utils

    assert jax.local_device_count() == 4 and jax.device_count() == 8  # backend is up: safe to import
    import test_train  # the reference setup (its conftest import only edits an env var read before this)
    from conftest import markov_batch
    from lm.io import checkpoint as ckpt
    from lm.parallel import sharding as shd

    markov = _markov()

    results = {}
    for sizes in MESHES:
        config = test_train._config()
        if dict(zip(shd.MESH_AXES, sizes))["tensor"] > test_train.CFG.num_kv_heads:  # as test_train._three_steps:
            config.mesh.rules.heads = config.mesh.rules.kv_heads = None  # heads cannot split 8 ways (an error)
        state, setup, step = test_train._setup(config, jax.devices(), dict(zip(shd.MESH_AXES, sizes)))
        index, count = shd.batch_shard(setup.mesh, 8)
        losses = []
        for i in range(3):
            batch = markov_batch(markov, 8 * i, 8, 16)
            rows = 8 // count
            local = {k: v[index * rows:(index + 1) * rows] for k, v in batch.items()}
            global_batch = {k: jax.make_array_from_process_local_data(shd.batch_sharding(setup.mesh), v, (8, 16))
                            for k, v in local.items()}
            state, metrics = step(state, global_batch)
            losses.append(float(metrics["loss"]))
        name = "x".join(map(str, sizes))
        print(f"mesh {name}: rows {index}/{count}, losses {losses}", flush=True)
        params = multihost_utils.process_allgather(state.params, tiled=True)
        results[name] = {"losses": losses, "shard": [index, count],
                         "params": {k: np.asarray(v).tolist() for k, v in _by_path(params).items()}}
        if sizes == (2, 2, 2):
            saver = ckpt.Checkpointer(os.path.join(out_dir, "run"), keep=1)
            saver.save(3, state, {"process": jax.process_index()})
            saver.wait()
            saver.close()
    if jax.process_index() == 0:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f)


def _worker_loop(out_dir: str) -> None:
    """Collectives until killed."""
    from configs import default
    from lm.parallel import distributed

    config = default.get_config("tiny")
    config.distributed.heartbeat_timeout_s = HEARTBEAT_S
    distributed.maybe_initialize(config)
    from jax.experimental import multihost_utils

    for i in range(10**9):
        multihost_utils.sync_global_devices(f"collective {i}")
        print(f"collective {i}", flush=True)
        time.sleep(0.1)


def _worker_raise(out_dir: str) -> None:
    """Process 1 raises while process 0 waits for it in a collective."""
    from configs import default
    from lm.parallel import distributed

    config = default.get_config("tiny")
    config.distributed.heartbeat_timeout_s = HEARTBEAT_S
    distributed.maybe_initialize(config)
    import jax
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("both up")
    if jax.process_index() == 1:
        raise ValueError("a bad record in process 1's data shard")
    multihost_utils.sync_global_devices("never reached by process 1")


# -- the test side ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(argv: list[str], out_dir: str, port: int) -> list[subprocess.Popen]:
    procs = []
    for pid in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
                   LM_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", LM_NUM_PROCESSES="2", LM_PROCESS_ID=str(pid),
                   PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
        log = open(os.path.join(out_dir, f"process{pid}.log"), "w")
        procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _log(out_dir: str, pid: int) -> str:
    with open(os.path.join(out_dir, f"process{pid}.log")) as f:
        return f.read()


def _wait(procs, out_dir, timeout=600) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise AssertionError("processes did not finish:\n" + "\n".join(_log(out_dir, i)[-2000:] for i in range(2)))


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mp"))
    procs = _spawn([sys.executable, os.path.join(REPO, "tests", "test_multiprocess.py"), "train", out], out,
                   _free_port())
    codes = _wait(procs, out)
    assert codes == [0, 0], "\n".join(_log(out, i)[-3000:] for i in range(2))
    with open(os.path.join(out, "results.json")) as f:
        return out, json.load(f)


@pytest.fixture(scope="module")
def one_device_reference(markov):
    import jax

    import test_train

    losses, state, setup = test_train._three_steps(markov, jax.devices()[:1], None)
    return losses, {k: np.asarray(v) for k, v in _by_path(state.params).items()}, setup


@pytest.mark.parametrize("mesh", ["x".join(map(str, m)) for m in MESHES])
def test_two_processes_reach_the_one_process_result(two_process_run, one_device_reference, mesh):
    _, results = two_process_run
    ref_losses, ref_params, _ = one_device_reference
    got = results[mesh]
    # (1,1,8): both processes hold all rows (the model, not the batch, spans them)
    assert got["shard"] == ([0, 1] if mesh == "1x1x8" else [0, 2])
    np.testing.assert_allclose(got["losses"], ref_losses, rtol=2e-5)
    assert set(got["params"]) == set(ref_params)
    for path, value in got["params"].items():
        np.testing.assert_allclose(np.asarray(value), ref_params[path], rtol=2e-4, atol=2e-6, err_msg=path)


def test_two_process_checkpoint_restores_in_one_process(two_process_run, one_device_reference):
    import jax

    from lm.io import checkpoint as ckpt

    out, results = two_process_run
    _, ref_params, setup = one_device_reference  # a 1-device mesh: every array restores whole here
    reader = ckpt.CheckpointReader(ckpt.checkpoint_dir(os.path.join(out, "run")))
    try:
        restored = reader.restore(ckpt.abstract_with_shardings(setup.abstract_state, setup.state_shardings))
    finally:
        reader.close()
    assert restored.step == 3 and int(restored.tree.step) == 3
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(restored.tree))
    for path, value in _by_path(restored.tree.params).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(results["2x2x2"]["params"][path], np.float32))
        np.testing.assert_allclose(np.asarray(value), ref_params[path], rtol=2e-4, atol=2e-6)
    assert restored.data == {"process": 0}  # restored in one process: process 0's data state


def test_main_on_two_processes_writes_one_set_of_outputs(tmp_path):
    workdir = str(tmp_path / "run")
    argv = [sys.executable, "-m", "lm.cli.train", "--config=configs/default.py:tiny", f"--workdir={workdir}",
            "--config.train.batch_size=8", "--config.train.steps=4", "--config.train.eval_every=0",
            "--config.train.peak_flops=1e9", "--config.sample.num_samples=0",
            f"--config.distributed.heartbeat_timeout_s={HEARTBEAT_S}"]
    codes = _wait(_spawn(argv, str(tmp_path), _free_port()), str(tmp_path))
    logs = [_log(str(tmp_path), i) for i in range(2)]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
    assert steps == [2, 4]  # written once, by process 0
    assert os.listdir(os.path.join(workdir, "checkpoints")).count("4") == 1
    assert "validation cross-entropy" in logs[0] and "validation cross-entropy" not in logs[1]


def _kill_and_time(procs, victim, out_dir, started):
    """Wait until `started()`, SIGKILL process `victim`; (exit status of the other, seconds, its log)."""
    deadline = time.monotonic() + 300
    while not started():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            raise AssertionError("the job did not start:\n" + _log(out_dir, 0)[-3000:])
        time.sleep(0.5)
    procs[victim].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    survivor = procs[1 - victim]
    try:
        code = survivor.wait(timeout=60)
    except subprocess.TimeoutExpired:
        survivor.kill()
        raise AssertionError("the surviving process hung for 60 s:\n" + _log(out_dir, 1 - victim)[-3000:])
    procs[victim].wait()
    return code, time.monotonic() - killed_at, _log(out_dir, 1 - victim)


def test_killed_process_during_training_ends_the_other_with_a_clear_message(tmp_path):
    workdir = str(tmp_path / "run")
    argv = [sys.executable, "-m", "lm.cli.train", "--config=configs/default.py:tiny", f"--workdir={workdir}",
            "--config.train.batch_size=8", "--config.train.steps=100000", "--config.train.eval_every=0",
            "--config.train.checkpoint_every=0", "--config.train.peak_flops=1e9", "--config.train.log_every=1",
            f"--config.distributed.heartbeat_timeout_s={HEARTBEAT_S}"]
    metrics = os.path.join(workdir, "metrics.jsonl")
    code, elapsed, log = _kill_and_time(_spawn(argv, str(tmp_path), _free_port()), 1, str(tmp_path),
                                        lambda: os.path.exists(metrics) and os.path.getsize(metrics) > 0)
    assert code == 75, log[-3000:]  # distributed.EXIT_PEER_LOST
    assert elapsed < HEARTBEAT_S + 20, elapsed
    # Usually the watchdog notices first. The runtime's coordination service on process 0 may
    # abort it first when it sees process 1's connection drop (a race seen in CI); then the
    # supervisor prints its own line. Either way: status 75 and one line that names the cause.
    watchdog = "lm.parallel.distributed: process 0 of 2: process 1 of 2 sent no heartbeat" in log
    runtime = ("lm.parallel.distributed: process 0 of 2: the JAX runtime aborted it: this process hosts the "
               "coordinator, so another process died or the network failed" in log)
    assert watchdog or runtime, log[-3000:]
    if watchdog:
        assert "Check failure stack trace" not in log  # the watchdog, not the runtime's abort


def test_killed_coordinator_ends_the_other_with_a_clear_message(tmp_path):
    out = str(tmp_path)
    procs = _spawn([sys.executable, os.path.join(REPO, "tests", "test_multiprocess.py"), "loop", out], out,
                   _free_port())
    code, elapsed, log = _kill_and_time(procs, 0, out, lambda: "collective 3" in _log(out, 1))
    assert code == 75, log[-3000:]
    assert elapsed < HEARTBEAT_S + 20, elapsed
    # the runtime aborts the survivor at once; its supervising parent says why
    assert "lm.parallel.distributed: process 1 of 2: the JAX runtime aborted it: the coordinator" in log, log[-3000:]


def test_a_process_that_raises_ends_the_other_at_once(tmp_path):
    out = str(tmp_path)
    procs = _spawn([sys.executable, os.path.join(REPO, "tests", "test_multiprocess.py"), "raise", out], out,
                   _free_port())
    codes = _wait(procs, out, timeout=120)
    logs = [_log(out, i) for i in range(2)]
    assert codes == [75, 1], logs
    # the traceback: checked piecewise, since Gloo's C++ logging can land between its writes
    assert "ValueError" in logs[1] and "a bad record in process 1's data shard" in logs[1]
    assert "process 1 of 2 failed: ValueError: a bad record" in logs[0]
    assert "process 0 of 2 failed" not in logs[0]  # its watchdog's verdict (peer lost) is the only one


if __name__ == "__main__":
    {"train": _worker_train, "loop": _worker_loop, "raise": _worker_raise}[sys.argv[1]](sys.argv[2])
