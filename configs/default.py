"""The main job: learn a random order-2 Markov chain over 16 characters to within 2% of its
exact entropy, on a laptop CPU in a few minutes.

    python -m lm.cli.train --config=configs/default.py             # the main job
    python -m lm.cli.train --config=configs/default.py:tiny        # a seconds-long shrink for tests

The data never runs out (documents are generated on the fly from their index), so the
validation set is as fresh as the training set and the Bayes-optimal cross-entropy of
the scored targets is known exactly (lm/data/markov.py).
"""

from configs import base


def get_config(arg: str | None = None):
    c = base.get_config()
    c.model.d_model = 64
    c.model.num_layers = 2
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.mlp_dim = 256
    c.model.scan_layers = False  # 2 layers: unrolled compiles fast and runs faster on a CPU

    c.train.steps = 400
    c.train.batch_size = 32
    c.train.seq_len = 128
    c.train.eval_every = 200
    c.data.num_valid_batches = 16
    c.train.checkpoint_every = 200
    c.optimizer.lr = 1e-2
    c.optimizer.warmup_steps = 30
    c.target.metric = "relative_gap"  # the goal above: validation CE within 2% of the Bayes-optimal CE
    c.target.max = 0.02

    if arg == "tiny":  # seconds, for tests and smoke runs
        c.model.d_model = 32
        c.model.num_layers = 1
        c.model.num_heads = 2
        c.model.num_kv_heads = 1
        c.model.mlp_dim = 64
        c.train.steps = 8
        c.train.batch_size = 4
        c.train.seq_len = 32
        c.train.log_every = 2
        c.train.eval_every = 4
        c.data.num_valid_batches = 2
        c.train.checkpoint_every = 4
        c.train.progress_bar = False
        c.sample.num_samples = 2
        c.sample.max_new_tokens = 8
        c.sample.max_new_tokens = 8
        c.target.metric = ""  # a smoke run states no goal
    elif arg:
        raise ValueError(f"configs/default.py takes '' or 'tiny', got {arg!r}")
    return c
