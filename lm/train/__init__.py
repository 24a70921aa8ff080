"""The generic trainer: it knows no objective by name.

    step.py        train state, the pure train step (micro-batches, sums divided once), eval step
    loop.py        the loop: start or resume, step, log, evaluate, checkpoint, stop cleanly
    optim.py       AdamW with warmup + cosine, global-norm clipping
    memory.py      per-device memory of a compiled step; a clear failure when it cannot fit
    preemption.py  SIGTERM/SIGINT: finish the step, checkpoint, exit cleanly
"""

from lm.train.step import (LossFn, Setup, TrainState, create_state, evaluate, global_batch, init_state,
                           jit_train_step, make_eval_step, make_train_step, plan_state, split_micro_batches,
                           summary_metrics)

__all__ = ["LossFn", "Setup", "TrainState", "create_state", "evaluate", "global_batch", "init_state",
           "jit_train_step", "make_eval_step", "make_train_step", "plan_state", "split_micro_batches",
           "summary_metrics"]
