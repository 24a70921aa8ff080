"""Objectives: one module per objective (`lm/objectives/<name>.py`). Objectives do no I/O.

Each module exposes `make_loss_fn(config, graphdef)`, returning
`loss_fn(params, batch, rng, frozen) -> (objective_sum, sums)` for the generic trainer (see
lm/train/step.py): a sum over scored tokens (or pairs, or sequences) and a dict of sums that
includes `count`. A module may also define

    BATCH_KIND = "tokens" | "preference"         the batch it reads (lm/data/batch.py); default tokens
    batch_kind(config) -> kind                   instead, where the config decides
    make_model(config, model_cfg) -> factory     what it trains (default: a Transformer of model_cfg)
    frozen_models(config, model_cfg) -> {name: lm.train.FrozenModel}   models its loss reads, frozen
    make_train_iter(config, tokenizer, **iterator kwargs) -> iterator   its own training data
                                                 (default: lm.data.build_iterator; RL: prompts)
    make_prepare_batch(config, setup, tokenizer) -> prepare_batch       turns each data batch into
                                                 the step's batch with the current parameters
                                                 (RL: rollouts; lm/train/loop.py: PrepareBatch)
    HAS_VALIDATION_LOSS = False                  no validation-loss passes (RL); default True

Shared by the objectives (and the evaluators): `_logprobs.py`, a model's per-token log-probabilities
of a batch's targets (chunked, sharded under the step's mesh; never [B, T, V] logits), and
`_rl.py`, what GRPO and PPO share.

Evaluations after training are lm/evals/ evaluators, chosen in config.eval.evaluators.
"""

import importlib
import pkgutil


def names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get(name: str):
    """The objective module `lm.objectives.<name>`; a clear error for an unknown name."""
    if name not in names():
        raise ValueError(f"config.objective={name!r} is not one of {names()}")
    return importlib.import_module(f"lm.objectives.{name}")


def batch_kind(objective, config=None):
    """The batch the objective reads: its batch_kind(config), or BATCH_KIND (default 'tokens')."""
    fn = getattr(objective, "batch_kind", None)
    return fn(config) if callable(fn) else getattr(objective, "BATCH_KIND", "tokens")


def make_model(objective, config, model_cfg):
    """The objective's model factory, or None (a Transformer of model_cfg)."""
    fn = getattr(objective, "make_model", None)
    return fn(config, model_cfg) if fn else None


def frozen_models(objective, config, model_cfg) -> dict:
    fn = getattr(objective, "frozen_models", None)
    return fn(config, model_cfg) if fn else {}


def has_validation_loss(objective) -> bool:
    return getattr(objective, "HAS_VALIDATION_LOSS", True)


def make_train_iter(objective, config, tokenizer, default, **kwargs):
    """The objective's training iterator, or `default(config.data, split='train', **kwargs)`."""
    fn = getattr(objective, "make_train_iter", None)
    if fn is None:
        return default(config.data, split="train", tokenizer=tokenizer, **kwargs)
    return fn(config, tokenizer, **kwargs)


def make_prepare_batch(objective, config, tokenizer):
    """None, or setup -> prepare_batch (for lm.train.loop.run's make_prepare_batch)."""
    fn = getattr(objective, "make_prepare_batch", None)
    return None if fn is None else (lambda setup: fn(config, setup, tokenizer))
