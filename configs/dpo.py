"""DPO on the Markov preference benchmark, from the pretrained default model, against the exact optimum.

    make train                                                   # first: runs/default (configs/default.py)
    python -m lm.cli.train --config=configs/dpo.py --workdir=runs/dpo        # the main job (minutes)
    python -m lm.cli.train --config=configs/dpo.py:tiny --workdir=/tmp/d     # seconds, from scratch (tests)
    python -m lm.cli.train --config=configs/dpo.py --config.dpo.loss_type=ipo    # a variant

The pairs are configs/reward.py's (lm/data/preference.py). The policy starts from runs/default
and the frozen reference is that same model (lm/objectives/dpo.py). With pairs labelled by
Bradley–Terry with r, DPO's optimum is π* ∝ π_ref·exp(r/β), the maximizer of
J(π) = E_π[r] − β·KL(π‖π_ref), known exactly on this chain (backward recursion). After training
the markov_optimum evaluator (lm/evals/markov_optimum.py) writes `optimal_objective`,
`policy_objective`, `reference_objective` and `fraction_of_optimal_gain` =
(J(π) − J(π_ref)) / (J(π*) − J(π_ref)) (target ≥ 0.9). J's reference is the true chain; the
training reference is the pretrained model (≈ the chain; both objectives are reported).
"""

import ml_collections

from configs.reward import preference_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = preference_config(arg, "dpo")
    c.objective = "dpo"  # lm/objectives/dpo.py: DPO and its variants against the frozen start
    d = c.dpo = ml_collections.ConfigDict()
    d.beta = 1.0  # β: KL-regularization strength (also the benchmark's β in J)
    d.loss_type = "sigmoid"  # 'sigmoid' (DPO) | 'robust' | 'hinge' | 'ipo' | 'reference_free' (lm.losses.dpo_loss)
    d.label_smoothing = 0.0  # ε: cDPO / robust label-noise rate (0: plain DPO)
    # 'model': the frozen starting policy; 'data': the log-probabilities the data carries (here the true
    # chain's, data.markov_preference.ref_logprobs), so DPO's optimum is exactly the benchmark's π*
    d.reference = "data" if arg != "tiny" else "model"
    c.data.markov_preference.ref_logprobs = d.reference == "data"  # the chain's log P of every answer token
    if arg != "tiny":
        c.data.markov_preference.num_pairs = 200000  # train pairs (experiments/preference.md: more pairs help)
        c.train.batch_size = 128  # pairs per step (2000 steps ≈ 1.3 epochs)
        c.train.steps = 2000  # optimizer steps
        c.train.eval_every = 500  # steps between validation-loss passes
        c.optimizer.lr = 2e-4  # peak learning rate (1e-3 over-tilts: reward and KL above the optimum's)
        c.target.metric = "fraction_of_optimal_gain"  # the goal: at least 0.9 of the exact optimum's gain
        c.target.min = 0.9
    c.eval.evaluators = "markov_optimum"  # J(policy) vs J(π*) exactly (lm/evals/markov_optimum.py)
    e = c.eval.markov_optimum = ml_collections.ConfigDict()
    e.num_samples = 8192 if arg != "tiny" else 64  # prompts, one sampled continuation each, per model
    e.batch_size = 1024  # prompts sampled together
    e.seed = 0  # seed of the prompts and of the sampling
    return c
