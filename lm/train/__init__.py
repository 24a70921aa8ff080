"""The generic trainer: it knows no objective by name.

    state.py       train state; plan it from a model factory, with frozen models beside it
    step.py        the pure train step (micro-batches, sums divided once), eval step
    init.py        parameters from another run (init_from) and for frozen models
    loop.py        the loop: start or resume, step, log, evaluate, checkpoint, stop cleanly
    optim.py       AdamW with warmup + cosine, global-norm clipping
    memory.py      per-device memory of a compiled step; a clear failure when it cannot fit;
                   `python -m lm.train.memory --target=tpu` (the TPU compiler, deviceless)
    fitting.py     the changes that make a step fit, each compiled and measured (the "Try:" line)
    lora.py        config.lora: adapters as the parameters, the base a frozen model, reference = adapters off
    preemption.py  SIGTERM/SIGINT: finish the step, checkpoint, exit cleanly
"""

from lm.train.state import (FrozenModel, ModelFactory, Setup, TrainState, as_factory, create_state, init_frozen,
                            init_state, plan_state)
from lm.evals.loss import evaluate, summary_metrics
from lm.train.step import (LossFn, frozen_args, global_batch, jit_train_step, make_eval_step, make_train_step,
                           split_micro_batches)

__all__ = ["FrozenModel", "LossFn", "ModelFactory", "Setup", "TrainState", "as_factory", "create_state",
           "evaluate", "frozen_args", "global_batch", "init_frozen", "init_state", "jit_train_step",
           "make_eval_step", "make_train_step", "plan_state", "split_micro_batches", "summary_metrics"]
