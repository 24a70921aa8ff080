"""Launch `lm` on every worker of a Cloud TPU VM slice: print the commands, or run them.

    python -m lm.cli.launch --tpu=my-v5p --zone=us-east5-a --config=configs/llama_8b.py:v5p-128 \\
        --workdir=/mnt/shared/runs/llama8b [--project=P] [--create] [--run] [--detach] \\
        [-- --config.train.steps=1000 ...]

Steps (each a `gcloud` command; see docs/tpu.md):
  0. (--create) create the slice: `gcloud compute tpus tpu-vm create ... --accelerator-type=...`
  1. pack the repository root (pyproject.toml, lm/, configs/, ...: what git tracks plus untracked files
     git does not ignore; outside a git checkout, everything but EXCLUDES) into a tarball
  2. copy it to every worker (`tpu-vm scp --worker=all`)
  3. install it on every worker: a venv (made by `uv`, with this Python version) holding
     `jax[tpu]` of the local JAX version and this project with its `train` extra (`pip install -e`)
  4. start training on every worker at once (`tpu-vm ssh --worker=all --command=...`): each
     host runs one `python -m lm.cli.train` process; `config.distributed.auto` makes JAX find the
     coordinator, process count and process id from the TPU metadata.
Without --run the commands are printed (copy, edit, paste); with --run they are executed in
order and the first failure stops the launch with its exit status.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from importlib import metadata

# the repository root: lm/cli/launch.py -> lm/cli -> lm -> the root (pyproject.toml, configs/, ...)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REMOTE_DIR = "~/lm"  # where the code lives on each worker
REMOTE_VENV = "~/lm-venv"  # its virtual environment
REMOTE_LOG = "~/lm-run.log"
# the TPU VM software version for each generation (gcloud compute tpus tpu-vm create --version)
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
                    "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
EXCLUDES = (".git", ".venv", "runs", "__pycache__", "*.pyc", ".pytest_cache", ".hypothesis", "wandb", "build",
            "*.egg-info")


def pack_command(source: str, tarball: str) -> list[str]:
    """The argv that packs `source` into `tarball`. In a git checkout: the files `git ls-files`
    lists (tracked, and untracked ones .gitignore does not exclude; a tracked file deleted since
    is skipped with a warning), so run directories, venvs and caches stay home. Elsewhere:
    everything but EXCLUDES."""
    if os.path.exists(os.path.join(source, ".git")):  # a directory, or a file in a git worktree
        q = shlex.quote
        return ["bash", "-c", f"set -o pipefail; git -C {q(source)} ls-files -z --cached --others --exclude-standard | "
                f"tar czf {q(os.path.abspath(tarball))} -C {q(source)} --ignore-failed-read --null -T -"]
    return ["tar", "czf", tarball, "-C", source, *[f"--exclude={e}" for e in EXCLUDES], "."]


def _gcloud_tpu(verb: str, args: argparse.Namespace, *rest: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, *rest, f"--zone={args.zone}"]
    if args.project:
        cmd.append(f"--project={args.project}")
    return cmd


def accelerator_of(config_arg: str) -> str | None:
    """'configs/llama_8b.py:v5p-128' -> 'v5p-128' (a config argument that names a slice), else None."""
    arg = config_arg.partition(":")[2]
    return arg if re.fullmatch(r"v\d+[a-z]*(-lite)?(pod)?-\d+", arg) else None


def runtime_version(accelerator: str) -> str:
    generation = accelerator.rsplit("-", 1)[0]
    if generation not in RUNTIME_VERSIONS:
        raise ValueError(f"no known TPU VM runtime for {accelerator!r}; pass --runtime_version "
                         f"(known generations: {sorted(RUNTIME_VERSIONS)})")
    return RUNTIME_VERSIONS[generation]


def train_command(args: argparse.Namespace) -> str:
    """The shell line each worker runs."""
    argv = [f"{REMOTE_VENV}/bin/python", "-m", "lm.cli.train", f"--config={args.config}", f"--workdir={args.workdir}",
            "--config.distributed.auto=True", *args.overrides]
    line = " ".join(_quote_remote(a) for a in argv)
    if args.detach:
        line = f"nohup {line} > {REMOTE_LOG} 2>&1 & echo $! > ~/lm-run.pid"
    return f"cd {REMOTE_DIR} && {line}"


def _quote_remote(arg: str) -> str:
    """Quote for the worker's shell, but leave a leading ~/ to expand there."""
    return arg if arg.startswith("~/") and re.fullmatch(r"[~\w./-]+", arg) else shlex.quote(arg)


def install_command(jax_version: str, python_version: str, extras: str = "train") -> str:
    """Unpack the code and install it in a venv. TPU VM images ship an older Python than this
    project needs, so `uv` (installed for the user if missing) provides Python `python_version`."""
    uv = "~/.local/bin/uv"
    return " && ".join([
        f"mkdir -p {REMOTE_DIR}",
        f"tar xzf ~/lm-src.tar.gz -C {REMOTE_DIR}",
        f"(test -x {uv} || curl -LsSf https://astral.sh/uv/install.sh | sh)",
        f"{uv} venv --allow-existing --python {python_version} {REMOTE_VENV}",
        f"{uv} pip install --python {REMOTE_VENV}/bin/python 'jax[tpu]=={jax_version}' -e {REMOTE_DIR}'[{extras}]'",
        f"{REMOTE_VENV}/bin/python -c 'import jax, lm; print(\"lm installed with jax\", jax.__version__)'",
    ])


def commands(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """[(what it does, argv)] in the order to run them."""
    out = []
    if args.create:
        accelerator = args.accelerator or accelerator_of(args.config)
        if not accelerator:
            raise ValueError("--create needs --accelerator (e.g. v5p-128): the config argument names no slice")
        out.append(("create the TPU VM slice", _gcloud_tpu(
            "create", args, args.tpu, f"--accelerator-type={accelerator}",
            f"--version={args.runtime_version or runtime_version(accelerator)}")))
    if not args.skip_install:
        out.append(("pack this checkout", pack_command(args.source_dir, args.tarball)))
        out.append(("copy it to every worker",
                    _gcloud_tpu("scp", args, args.tarball, f"{args.tpu}:lm-src.tar.gz", "--worker=all")))
        # a gs:// run directory is written through etils.epath, which reaches GCS with gcsfs (the gcs extra)
        extras = "train,gcs" if args.workdir.startswith("gs://") else "train"
        install = install_command(args.jax_version, args.python_version, extras)
        out.append(("install it on every worker",
                    _gcloud_tpu("ssh", args, args.tpu, "--worker=all", f"--command={install}")))
    out.append(("train on every worker", _gcloud_tpu("ssh", args, args.tpu, "--worker=all",
                                                     f"--command={train_command(args)}")))
    return out


def follow_up(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """Commands to watch or stop a detached run."""
    return [("follow the log of worker 0", _gcloud_tpu("ssh", args, args.tpu, "--worker=0",
                                                       f"--command=tail -f {REMOTE_LOG}")),
            ("stop the run on every worker", _gcloud_tpu("ssh", args, args.tpu, "--worker=all",
                                                         "--command=kill $(cat ~/lm-run.pid)"))]


def parse(argv: list[str]) -> argparse.Namespace:
    overrides: list[str] = []
    if "--" in argv:
        argv, overrides = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    ap = argparse.ArgumentParser(prog="python -m lm.cli.launch", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tpu", required=True, help="name of the TPU VM slice")
    ap.add_argument("--zone", required=True, help="its zone, e.g. us-east5-a")
    ap.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
    ap.add_argument("--config", required=True, help="config file[:arg], relative to the repository root")
    ap.add_argument("--workdir", required=True, help="run directory that every worker sees: a shared mount or "
                    "gs://bucket/path")
    ap.add_argument("--create", action="store_true", help="also create the slice first")
    ap.add_argument("--accelerator", default=None, help="accelerator type for --create (default: the config arg)")
    ap.add_argument("--runtime_version", default=None, help="TPU VM software version for --create")
    ap.add_argument("--skip_install", action="store_true", help="only start training (code already installed)")
    ap.add_argument("--detach", action="store_true", help="run under nohup, log to ~/lm-run.log on each worker")
    ap.add_argument("--run", action="store_true", help="execute the commands instead of printing them")
    ap.add_argument("--source_dir", default=REPO, help="the repository to pack (default: the root of this "
                    "checkout, which holds pyproject.toml, lm/ and configs/)")
    ap.add_argument("--tarball", default="/tmp/lm-src.tar.gz", help="local path of the packed checkout")
    ap.add_argument("--jax_version", default=None, help="jax[tpu] version to install (default: the local one)")
    ap.add_argument("--python_version", default="{}.{}".format(*sys.version_info[:2]),
                    help="Python of the workers' venv (default: this one's)")
    args = ap.parse_args(argv)
    args.overrides = overrides
    args.jax_version = args.jax_version or metadata.version("jax")
    if not args.skip_install and not os.path.exists(os.path.join(args.source_dir, "pyproject.toml")):
        ap.error(f"--source_dir={args.source_dir} holds no pyproject.toml: the workers install the repository "
                 "root (pyproject.toml, lm/, configs/); pass --source_dir=<your checkout of lm>")
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        ap.error(f"after '--' only --config.<field>=<value> overrides are passed on, got {bad}")
    if not args.workdir.startswith(("/", "gs://")):
        print(f"warning: --workdir={args.workdir} is relative: each worker would use its own disk, and no "
              "worker could restore the checkpoint shards of the others; use a shared mount", file=sys.stderr)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    steps = commands(args)
    for i, (what, cmd) in enumerate(steps, 1):
        print(f"# {i}. {what}")
        print(shlex.join(cmd))
        if args.run:
            code = subprocess.call(cmd)
            if code:
                print(f"lm.cli.launch: step {i} ({what}) failed with exit status {code}; stopping", file=sys.stderr)
                return code
    if args.detach:
        for what, cmd in follow_up(args):
            print(f"# then: {what}\n{shlex.join(cmd)}")
    return 0


if __name__ == "__main__":
    from lm.cli import errors

    errors.install("lm.cli.launch")
    sys.exit(main())
