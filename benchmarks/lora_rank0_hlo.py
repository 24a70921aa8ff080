"""Does lora.rank = 0 leave the train step exactly as it was? Compiles the same train step (a small
Transformer, pretrain loss, AdamW, one CPU device) in two checkouts and compares XLA's optimized
HLO instruction by instruction (source locations stripped): identical instructions run at
identical speed, a stronger statement than a timing on shared cores.

    git worktree add --detach /tmp/before main
    python benchmarks/lora_rank0_hlo.py --a /tmp/before          # B: this checkout
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile

DUMP = r'''
import re, sys
import jax
from configs import default
from lm import train
from lm.model import ModelConfig
from lm.objectives import pretrain
from lm.parallel import sharding as shd
from lm.train import memory
from lm.train.optim import make_optimizer
c = default.get_config("tiny")
cfg = ModelConfig(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128)
opt, sched = make_optimizer(c.optimizer, 10)
setup = train.plan_state(cfg, opt, shd.make_mesh(c.mesh, jax.devices()[:1]), c.mesh.rules, 0)
step = train.jit_train_step(train.make_train_step(pretrain.make_loss_fn(c, setup.graphdef), opt, sched), setup)
text = memory.compile_step(step, setup, 8, 32).as_text()
open(sys.argv[1], "w").write(text)
'''


def instructions(text: str) -> list[str]:
    """The HLO's computations and instructions, without source locations and stack-frame ids."""
    keep = [line for line in text.splitlines()
            if (" = " in line or line.startswith(("ENTRY", "%", "fused")) or line.endswith("{"))
            and "file_name_id" not in line and not re.match(r"^\d+ \{", line)]
    return [re.sub(r",? ?stack_frame_id=\d+", "", line) for line in keep]


def dump(repo: str) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        script, out = os.path.join(tmp, "dump.py"), os.path.join(tmp, "hlo.txt")
        with open(script, "w") as f:
            f.write(DUMP)
        env = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS="cpu")
        subprocess.run([sys.executable, script, out], cwd=repo, env=env, check=True, capture_output=True)
        with open(out) as f:
            return instructions(f.read())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--a", required=True, help="checkout A (the baseline)")
    a = p.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = [(name, dump(repo)) for name, repo in (("A " + a.a, a.a), ("B " + here, here))]
    print("| checkout | HLO instructions | sha256 of the instructions |\n|---|---:|---|")
    for name, ins in rows:
        print(f"| {name} | {len(ins)} | {hashlib.sha256(chr(10).join(ins).encode()).hexdigest()[:16]} |")
    print("identical" if rows[0][1] == rows[1][1] else "DIFFERENT")


if __name__ == "__main__":
    main()
