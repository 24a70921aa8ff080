"""Reward model (Bradley–Terry) on the Markov preference benchmark, from the pretrained default model.

    make train                                                      # first: runs/default (configs/default.py)
    python -m lm.cli.train --config=configs/reward.py --workdir=runs/reward      # the main job (minutes)
    python -m lm.cli.train --config=configs/reward.py:tiny --workdir=/tmp/r      # seconds, from scratch (tests)

The task (lm/data/markov_reward.py, lm/data/preference.py): a prompt of 4 characters of the
default config's Markov chain, two continuations of 8 characters drawn from the chain itself,
labelled by Bradley–Terry with the true reward r(x) = Σ_t g(x_t) (g: one N(0, 1) number per
character). The reward model (lm.model.RewardModel: the pretrained Transformer with a scalar head
at the answer's last token) is trained on 20,000 such pairs; the pairwise_accuracy evaluator then
writes to summary.json its held-out `pairwise_accuracy`, the `bayes_pairwise_accuracy` of the true
reward (the best any model can do against these noisy labels) and their paired gap on the
held-out pairs (`bayes_accuracy_gap`, target < 0.02). Measured numbers: README.md and
experiments/preference.md.
"""

import ml_collections

from configs import base

ARGS = ("", "tiny")


def preference_config(arg: str | None, name: str) -> ml_collections.ConfigDict:
    """What reward.py and dpo.py share: the benchmark data, the default model's shape, the start."""
    if (arg or "") not in ARGS:
        raise ValueError(f"configs/{name}.py takes one of {ARGS}, got {arg!r}")
    c = base.get_config()
    c.data.source = "markov_preference"  # pairs of the known-optimum benchmark (lm/data/preference.py)
    p = c.data.markov_preference  # the chain is data.markov's, the default config's (pretrained on it)
    p.prompt_len = 4  # prompt characters
    p.horizon = 8  # characters per answer
    p.reward_scale = 1.0  # g ~ N(0, 1) per character: Bayes pairwise accuracy ≈ 0.875
    p.num_pairs = 20000  # train pairs
    p.num_valid_pairs = 4096  # held-out pairs (evaluators read them all)
    c.data.num_valid_batches = 8  # validation-loss batches (8 × batch_size pairs)

    # the default config's model (configs/default.py), so that train.init_from can take its parameters
    c.model.d_model = 64  # residual width
    c.model.num_layers = 2  # blocks
    c.model.num_heads = 4  # query heads
    c.model.num_kv_heads = 2  # key/value heads
    c.model.mlp_dim = 256  # SwiGLU width
    c.model.scan_layers = False  # 2 layers: unrolled is faster on a CPU
    c.model.attention_block = 0  # rows of 12 tokens: no attention blocking

    c.train.init_from = "runs/default"  # the pretrained language model (`make train`)
    c.train.batch_size = 64  # pairs per step
    c.train.seq_len = 12  # tokens per row: prompt_len + horizon (+ <|eos|>) - 1 <= 12 used, right-padded
    c.train.log_every = 50  # steps between metric lines
    c.train.progress_bar = False  # metric lines only
    c.train.checkpoint_every = 0  # only at the end
    c.optimizer.warmup_steps = 50  # linear warmup
    c.optimizer.weight_decay = 0.0  # no decay toward 0 (the start is a pretrained model)
    c.sample.num_samples = 0  # no printed samples

    if arg == "tiny":  # seconds, for tests and smoke runs: a fresh tiny model, few pairs
        c.train.init_from = None
        c.model.d_model = 32
        c.model.num_layers = 1
        c.model.num_heads = 2
        c.model.num_kv_heads = 1
        c.model.mlp_dim = 64
        p.num_pairs = 64
        p.num_valid_pairs = 32
        c.data.num_valid_batches = 1
        c.train.steps = 4
        c.train.batch_size = 8
        c.train.log_every = 2
        c.train.eval_every = 0
        c.train.progress_bar = False
        c.optimizer.warmup_steps = 1
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = preference_config(arg, "reward")
    c.objective = "reward"  # lm/objectives/reward.py: Bradley–Terry on a RewardModel
    c.data.markov_preference.end_with_eos = True  # the score (hidden state at the last scored token) reads all N characters
    r = c.reward = ml_collections.ConfigDict()
    r.margin = 0.0  # m in −log σ(r_c − r_r − m): the chosen answer must win by at least m
    r.center_rewards = 0.0  # c·Σ(r_c + r_r)² added to the loss (TRL's center_rewards_coefficient; 0: off)
    if arg != "tiny":
        c.train.steps = 1500  # optimizer steps
        c.train.eval_every = 500  # steps between validation-loss passes
        c.optimizer.lr = 1e-3  # peak learning rate
        c.target.metric = "bayes_accuracy_gap"  # the goal: held-out pair accuracy within 2 points of Bayes
        c.target.max = 0.02
    c.eval.evaluators = "pairwise_accuracy"  # held-out accuracy and the Bayes accuracy (lm/evals/pairwise_accuracy.py)
    c.eval.pairwise_accuracy = ml_collections.ConfigDict()
    c.eval.pairwise_accuracy.batch_size = 1024  # held-out pairs scored together
    return c
