"""Configs: they load, every field is documented, and the TPU-sized model has the right shape."""

import ast
import glob
import os

import jax
import pytest

from configs import base, default, llama_1b
from lm.parallel import sharding as shd
from lm import train
from lm.cli.train import build_model_config
from lm.model import param_count
from lm.train.optim import make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", ["configs/base.py", "configs/data.py"])
def test_every_field_has_a_comment(path):
    """Each `x.y = value` line in the config builders carries a `# ...` comment."""
    source = open(os.path.join(REPO, path)).read()
    lines = source.splitlines()
    missing = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
            if not isinstance(node.value, ast.Call) or "ConfigDict" not in ast.unparse(node.value.func):
                segment = lines[node.lineno - 1:node.end_lineno]
                if not any("#" in line for line in segment):
                    missing.append(f"{path}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not missing, "undocumented fields:\n" + "\n".join(missing)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))))
def test_config_files_load_and_lock(path):
    name = os.path.splitext(os.path.basename(path))[0]
    if name in ("__init__", "data"):
        return
    module = __import__(f"configs.{name}", fromlist=["get_config"])
    config = module.get_config()
    config.lock()
    with pytest.raises(AttributeError, match="Did you mean"):
        config.train.stepz = 1


def test_default_tiny_is_a_shrink_of_default():
    big, tiny = default.get_config(), default.get_config("tiny")
    assert tiny.train.steps < big.train.steps and tiny.model.d_model < big.model.d_model
    with pytest.raises(ValueError, match="tiny"):
        default.get_config("huge")


@pytest.mark.parametrize("slice_name", sorted(llama_1b.SLICES))
def test_llama_1b_shapes_and_sharding(slice_name):
    config = llama_1b.get_config(slice_name)
    model_cfg = build_model_config(config, vocab_size=config.model.vocab_size)
    opt, _ = make_optimizer(config.optimizer, config.train.steps)
    # the real slice has 16 chips; shard the same rules over the 8 virtual devices here
    sizes = {k: (v if v == 1 else -1 if k == "fsdp" else v) for k, v in config.mesh.items() if k != "rules"}
    mesh = shd.make_mesh(sizes, jax.devices())
    setup = train.plan_state(model_cfg, opt, mesh, config.mesh.rules)
    n = param_count(setup.abstract_state.params)
    assert 1.20e9 < n < 1.27e9, n  # Llama-3.2-1B: 1.24B with tied embeddings
    per_device = shd.per_device_bytes(setup.abstract_state.params, setup.state_shardings.params)
    assert per_device < 1.05 * 4 * n / mesh.devices.size  # every large parameter is split
    embed = setup.state_shardings.params["embed"].spec
    assert "fsdp" in tuple(embed)
