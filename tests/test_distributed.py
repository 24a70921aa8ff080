"""lm.parallel.distributed, lm.train.memory, lm.cli.launch and the TPU-sized configs, in one process.

The real multi-process runs are in tests/test_multiprocess.py.
"""

import shlex
import stat

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from configs import default, llama_1b, llama_8b
from conftest import markov_batch
from lm.parallel import distributed
from lm.cli import launch
from lm.train import memory
from lm.parallel import sharding as shd
from lm import train
from lm.cli.train import build_model_config
from lm.model import ModelConfig, param_count
from lm.objectives import pretrain
from lm.train.optim import make_optimizer

CFG = ModelConfig(vocab_size=16, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)


# -- start-up settings -----------------------------------------------------------------------------


def test_single_process_unless_told_otherwise():
    assert distributed.resolve(default.get_config(), environ={}) is None


def test_settings_from_environment_and_config():
    env = {"LM_COORDINATOR_ADDRESS": "10.0.0.2:1234", "LM_NUM_PROCESSES": "4", "LM_PROCESS_ID": "3"}
    args = distributed.resolve(default.get_config(), environ=env)
    assert (args["coordinator_address"], args["num_processes"], args["process_id"]) == ("10.0.0.2:1234", 4, 3)
    assert not args["auto"] and args["cpu_collectives"] == "gloo"
    config = default.get_config()
    config.distributed.process_id = 0  # the config wins over the environment
    assert distributed.resolve(config, environ=env)["process_id"] == 0
    config = default.get_config()
    config.distributed.auto = True
    assert distributed.resolve(config, environ={})["auto"]


@pytest.mark.parametrize("env, match", [
    ({"LM_COORDINATOR_ADDRESS": "h:1", "LM_NUM_PROCESSES": "2"}, "process_id"),
    ({"LM_COORDINATOR_ADDRESS": "h:1", "LM_NUM_PROCESSES": "2", "LM_PROCESS_ID": "2"}, r"must be in \[0, "),
    ({"LM_NUM_PROCESSES": "2", "LM_PROCESS_ID": "1"}, "no coordinator address"),
])
def test_incomplete_settings_are_clear_errors(env, match):
    with pytest.raises(ValueError, match=match):
        distributed.resolve(default.get_config(), environ=env)


def test_one_process_feeds_every_row():
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert shd.batch_shard(mesh, 8) == (0, 1)


# -- the watchdog, against a fake key-value store --------------------------------------------------


class FakeClient:
    def __init__(self):
        self.store, self.down = {}, False

    def key_value_set(self, key, value, allow_overwrite=False):
        if self.down:
            raise RuntimeError("UNAVAILABLE: failed to connect")
        self.store[key] = value

    def key_value_dir_get(self, prefix):
        if self.down:
            raise RuntimeError("UNAVAILABLE: failed to connect")
        return [(k, v) for k, v in self.store.items() if k.startswith(prefix)]


def _watch(client, timeout=0.6):
    exits = []
    dog = distributed.Watchdog(client, 0, 3, timeout=timeout, exit_fn=exits.append).start()
    return dog, exits


def _wait_for(cond, seconds=10.0):
    import time

    end = time.monotonic() + seconds
    while not cond() and time.monotonic() < end:
        time.sleep(0.05)
    return cond()


def test_watchdog_names_a_silent_peer_and_spares_finished_ones(capsys):
    client = FakeClient()
    client.store["lm/alive/2"] = "done"  # process 2 finished normally: not a failure
    dog, exits = _watch(client)
    client.store["lm/alive/1"] = "1"  # process 1 beats once, then goes silent
    assert _wait_for(lambda: exits)
    assert exits == [distributed.EXIT_PEER_LOST]
    err = capsys.readouterr().err
    assert "process 0 of 3: process 1 of 3 sent no heartbeat" in err and "2 of 3" not in err
    dog.stop()


def test_watchdog_reports_a_failed_peer_at_once(capsys):
    client = FakeClient()
    dog, exits = _watch(client, timeout=30)
    client.store["lm/alive/2"] = "failed: ValueError: bad record"
    assert _wait_for(lambda: exits, seconds=5)
    assert "process 2 of 3 failed: ValueError: bad record" in capsys.readouterr().err
    dog.stop()


def test_watchdog_reports_a_lost_coordinator(capsys):
    client = FakeClient()
    client.down = True
    dog, exits = _watch(client)
    assert _wait_for(lambda: exits)
    assert "the coordinator" in capsys.readouterr().err
    dog.stop()


# -- per-device memory and the fit check -----------------------------------------------------------


def _compiled(sizes, devices):
    config = default.get_config("tiny")
    config.train.batch_size, config.train.seq_len = 8, 16
    mesh = shd.make_mesh(sizes, devices)
    opt, sched = make_optimizer(config.optimizer, 10)
    setup = train.plan_state(CFG, opt, mesh, config.mesh.rules)
    step = train.jit_train_step(train.make_train_step(pretrain.make_loss_fn(config, setup.graphdef), opt, sched),
                                setup)
    return config, setup, step, memory.compile_step(step, setup, 8, 16)


@pytest.fixture(scope="module")
def fsdp_step():
    return _compiled({"data": 1, "fsdp": 8, "tensor": 1}, jax.devices())


def test_report_counts_the_sharded_state_and_the_compiled_temporaries(fsdp_step):
    config, setup, _, compiled = fsdp_step
    report = memory.analyze(compiled, setup, capacity=None)
    n = param_count(setup.abstract_state.params)
    assert report.params == shd.per_device_bytes(setup.abstract_state.params, setup.state_shardings.params)
    assert report.params <= 4 * n / 8 + 64  # FSDP over 8: every parameter of this model is split
    assert 1.9 * report.params <= report.opt_state <= 2.1 * report.params + 64  # Adam's mu and nu
    assert report.temporaries > 0 and report.aliased >= report.params + report.opt_state  # the state is donated
    assert report.total == report.arguments + report.outputs - report.aliased + report.temporaries
    assert report.fits is None and "temporaries" in report.lines()[0]  # a CPU reports no memory: unknown, not "fits"


def test_too_small_a_device_fails_early_with_the_numbers(fsdp_step):
    config, setup, _, compiled = fsdp_step
    report = memory.analyze(compiled, setup, capacity=1000)
    with pytest.raises(memory.DoesNotFit, match=r"needs .* per device but 0.9 × .* on mesh .*fsdp.*Try:"):
        memory.check(report, setup.mesh)
    config.mesh.device_memory_gib = 1e-6
    lines = []
    with pytest.raises(memory.DoesNotFit):
        memory.compile_and_check(fsdp_step[2], setup, config, log=lines.append)
    assert lines and lines[0].startswith("memory per device: parameters")


def test_compiled_step_runs_in_place_of_the_jitted_one(fsdp_step, markov):
    """The loop calls the executable compiled for the check (no second compile): it takes the
    real sharded state and batch, donates the state, and learns."""
    config, setup, _, compiled = fsdp_step
    opt, _ = make_optimizer(config.optimizer, 10)
    state, _ = train.create_state(CFG, opt, setup.mesh, config.mesh.rules, config.seed)
    batch = train.global_batch(markov_batch(markov, 0, 8, 16), setup.mesh)
    old = state
    losses = []
    for _ in range(3):
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 3 and losses[-1] < losses[0]
    assert all(x.is_deleted() for x in jax.tree.leaves(old.params))  # donated, as with the jitted step


# -- the launcher ------------------------------------------------------------------------------------


ARGS = ["--tpu=my-slice", "--zone=us-east5-a", "--project=proj", "--config=configs/llama_8b.py:v5p-128",
        "--workdir=/mnt/shared/runs/x"]


def test_launcher_installs_and_trains_on_every_worker():
    args = launch.parse(ARGS + ["--create", "--", "--config.train.steps=10", "--config.data.array_record."
                                "train_files=gs://b/train-*.array_record"])
    steps = dict(launch.commands(args))
    create = steps["create the TPU VM slice"]
    assert "--accelerator-type=v5p-128" in create and "--version=v2-alpha-tpuv5" in create
    assert "--worker=all" in steps["copy it to every worker"]
    install = steps["install it on every worker"]
    assert install[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in install
    assert f"jax[tpu]=={jax.__version__}" in next(a for a in install if a.startswith("--command="))
    train_cmd = steps["train on every worker"]
    assert "--worker=all" in train_cmd and "--zone=us-east5-a" in train_cmd and "--project=proj" in train_cmd
    remote = shlex.split(next(a for a in train_cmd if a.startswith("--command="))[len("--command="):])
    assert remote[:3] == ["cd", "~/lm", "&&"]
    assert remote[4:] == ["-m", "lm.cli.train", "--config=configs/llama_8b.py:v5p-128", "--workdir=/mnt/shared/runs/x",
                          "--config.distributed.auto=True", "--config.train.steps=10",
                          "--config.data.array_record.train_files=gs://b/train-*.array_record"]
    assert list(steps) == ["create the TPU VM slice", "pack this checkout", "copy it to every worker",
                           "install it on every worker", "train on every worker"]


def test_launcher_rejects_what_it_cannot_pass_on():
    with pytest.raises(SystemExit):
        launch.parse(ARGS + ["--", "--steps=3"])
    with pytest.raises(ValueError, match="--accelerator"):
        launch.commands(launch.parse(["--tpu=t", "--zone=z", "--config=configs/default.py", "--workdir=/mnt/r",
                                      "--create"]))


def test_launcher_run_executes_in_order_and_stops_at_a_failure(tmp_path, monkeypatch, capsys):
    calls = tmp_path / "calls.txt"
    for name, code in (("gcloud", "0"), ("tar", "0")):
        tool = tmp_path / name
        tool.write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\nexit ${{FAIL_{name.upper()}:-{code}}}\n')
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    source = tmp_path / "src"
    source.mkdir()
    (source / "pyproject.toml").write_text("")
    assert launch.main(ARGS + ["--run", f"--source_dir={source}", f"--tarball={tmp_path}/src.tgz"]) == 0
    lines = calls.read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["tar", "gcloud", "gcloud", "gcloud"]
    assert "tpu-vm scp" in lines[1] and "lm.cli.train" in lines[3]
    calls.unlink()
    monkeypatch.setenv("FAIL_TAR", "3")
    assert launch.main(ARGS + ["--run", f"--source_dir={source}", f"--tarball={tmp_path}/src.tgz"]) == 3
    assert calls.read_text().count("\n") == 1 and "step 1 (pack this checkout) failed" in capsys.readouterr().err


# -- TPU-sized configs: shapes and shardings on the real slice sizes ---------------------------------


@pytest.mark.parametrize("module, slice_name, low, high", [
    *[(llama_8b, s, 8.0e9, 8.06e9) for s in sorted(llama_8b.SLICES)],
    *[(llama_1b, s, 1.20e9, 1.27e9) for s in sorted(llama_1b.SLICES)],
])
def test_tpu_configs_shard_every_large_parameter_on_their_slice(module, slice_name, low, high):
    config = module.get_config(slice_name)
    chips = int(slice_name.split("-")[1]) // (2 if slice_name.startswith("v5p") else 1)
    sizes = tuple(config.mesh[a] for a in shd.MESH_AXES)
    assert np.prod(sizes) == chips
    mesh = AbstractMesh(sizes, shd.MESH_AXES)  # the slice's mesh, without its devices
    opt, _ = make_optimizer(config.optimizer, config.train.steps)
    setup = train.plan_state(build_model_config(config, config.model.vocab_size), opt, mesh, config.mesh.rules)
    n = param_count(setup.abstract_state.params)
    assert low < n < high, n
    per_device = shd.per_device_bytes(setup.abstract_state.params, setup.state_shardings.params)
    assert per_device < 1.02 * 4 * n / chips  # every large parameter is split over all chips
    assert config.train.batch_size % (config.mesh.data * config.mesh.fsdp * config.train.micro_batches) == 0
    if config.model.num_heads % config.mesh.tensor == 0 and config.mesh.tensor > 1:
        assert "tensor" in tuple(setup.state_shardings.params["blocks"]["attn"]["wq"].spec)
