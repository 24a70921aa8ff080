"""PPO from rewards (lm/objectives/ppo.py): configs/grpo.py's task, rollouts and rewards, with a
value head, GAE and whitened per-token advantages instead of group-relative ones.

    python -m lm.cli.train --config=configs/ppo.py --config.train.init_from=runs/sft_brief --workdir=runs/ppo
    python -m lm.cli.train --config=configs/ppo.py:tiny --workdir=/tmp/ppo    # seconds: tests, smoke runs

Every field is documented in configs/grpo.py (rl_config); here only what PPO changes. With no
group baseline a prompt needs no repeats: rl.group_size may be 1 (kept at 4 here so that a step
sees as many completions per prompt as GRPO's for the same batch).
"""

import ml_collections

from configs import grpo

ARGS = grpo.ARGS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if (arg or "") not in ARGS:
        raise ValueError(f"configs/ppo.py takes one of {ARGS}, got {arg!r}")
    c = grpo.get_config(arg)
    c.objective = "ppo"  # lm/objectives/ppo.py: policy with a value head (lm.model.ValueModel)
    c.rl.group_size = 4  # completions per prompt (PPO needs no group; see the docstring)
    c.rl.normalize = "token"  # policy and value loss: mean over generated tokens
    c.rl.gamma = 1.0  # no discount within a completion
    c.rl.lam = 0.95  # GAE λ
    c.rl.value_coef = 0.5  # weight of the value loss
    c.rl.value_clip_eps = 0.2  # value-loss clip; 0: off
    c.rl.whiten_advantages = True  # whiten the GAE advantages over the batch's generated tokens
    return c
