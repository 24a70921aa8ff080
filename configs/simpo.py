"""SimPO on the Markov preference benchmark (lm/objectives/simpo.py), from the pretrained default model.

    make train                                                    # first: runs/default (configs/default.py)
    python -m lm.cli.train --config=configs/simpo.py --workdir=runs/simpo      # minutes
    python -m lm.cli.train --config=configs/simpo.py:tiny --workdir=/tmp/s     # seconds, from scratch (tests)

The pairs and the start are configs/dpo.py's; no reference model. After training the
markov_optimum evaluator compares the policy's J(π) = E[r] − β·KL(π‖chain) with the exact optimum
at eval.markov_optimum.beta (SimPO optimizes no such J: a comparison, not a target).
"""

import ml_collections

from configs.reward import preference_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = preference_config(arg, "simpo")
    c.objective = "simpo"  # lm/objectives/simpo.py: length-normalized margin loss, no reference
    s = c.simpo = ml_collections.ConfigDict()
    s.beta = 2.0  # β: scale of the length-normalized log-prob reward (the paper's range 2–2.5)
    s.gamma = 0.5  # γ: target margin of the rewards r_c − r_r (the paper: γ/β ≈ 0.25–0.5)
    s.label_smoothing = 0.0  # ε: label-noise rate (0: plain SimPO)
    if arg != "tiny":
        c.data.markov_preference.num_pairs = 200000  # as configs/dpo.py
        c.train.batch_size = 128  # pairs per step
        c.train.steps = 500  # optimizer steps (short: a comparison run)
        c.train.eval_every = 250  # steps between validation-loss passes
        c.optimizer.lr = 2e-4  # peak learning rate, as configs/dpo.py
    # J(policy) vs J(π*) (lm/evals/markov_optimum.py), for comparison; tiny: no pretrained start to compare with
    c.eval.evaluators = "markov_optimum" if arg != "tiny" else ""
    e = c.eval.markov_optimum = ml_collections.ConfigDict()
    e.beta = 1.0  # β of the benchmark's J (configs/dpo.py's dpo.beta): what the comparison is made at
    e.num_samples = 8192 if arg != "tiny" else 64  # prompts, one sampled continuation each, per model
    e.batch_size = 1024  # prompts sampled together
    e.seed = 0  # seed of the prompts and of the sampling
    return c
