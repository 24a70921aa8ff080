"""Config files as lm.cli.train reads them, for the other command lines (the sweep).

Configs are loaded by file path (`--config=configs/default.py:arg`), never installed as a
package; they import each other as `from configs import base`. `importable(path)` puts the
folder above a config package (the repository root) on sys.path first, so that works from any
working directory.

    load(config_arg, overrides)   the locked ConfigDict lm.cli.train would run: the same absl /
                                  ml_collections parsing, so an unknown key fails the same way
    configs_module(name)          `configs.<name>` of this checkout, for code that needs a default
"""

from __future__ import annotations

import os
import sys
from typing import Any


def importable(config_arg: str) -> None:
    """Let `from configs import base` work in the config file `config_arg` ('path.py[:arg]')."""
    folder = os.path.dirname(os.path.abspath(config_arg.split(":", 1)[0]))
    while os.path.exists(os.path.join(folder, "__init__.py")):  # climb out of the package
        folder = os.path.dirname(folder)
    if folder not in sys.path:
        sys.path.insert(0, folder)


def load(config_arg: str, overrides: dict[str, Any]) -> Any:
    """The ConfigDict of `--config=<config_arg> --config.<key>=<value> ...`."""
    from absl import flags
    from ml_collections import config_flags

    path = config_arg.split(":", 1)[0]
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} does not exist (relative to {os.getcwd()})")
    importable(config_arg)
    argv = ["lm.cli.sweep", f"--config={config_arg}", *[f"--config.{k}={v}" for k, v in overrides.items()]]
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True, sys_argv=argv)
    try:
        values(argv)
    except flags.Error as e:  # a value of the wrong type
        raise ValueError(f"config {config_arg}: {e}") from None
    return holder.value


def configs_module(name: str) -> Any:
    """`configs.<name>` of this checkout (the code that needs a default config, e.g. the HF
    importer's run config), found beside the `lm` package whatever the working directory."""
    import importlib

    import lm

    root = os.path.dirname(os.path.dirname(os.path.abspath(lm.__file__)))
    if not os.path.exists(os.path.join(root, "configs", "__init__.py")):
        raise ModuleNotFoundError(f"configs/{name}.py is read from a checkout of lm (it is not installed); "
                                  f"none beside {os.path.dirname(lm.__file__)}: install lm from its checkout "
                                  "(pip install -e '.[train]')", name=f"configs.{name}")
    importable(os.path.join(root, "configs", f"{name}.py"))
    return importlib.import_module(f"configs.{name}")
