"""Supervised fine-tuning (SFT): pretraining's loss under the chat loss mask (seed 004).

    objective = Σ_t loss_mask_t · (−log p_θ(targets_t | inputs_≤t)),   count = Σ_t loss_mask_t

This is exactly pretraining's objective (the same `pretrain.token_loss` over lm.losses, the
same train step); only the mask differs. The chat template (lm/data/chat.py) writes it: with
data.chat_loss='assistant_only' the model reads the whole conversation through the causal
mask but only the assistant's tokens, and the <|end_of_turn|> closing each answer, are
scored ("assistant-only masking = causal masking + selective loss scoring"). Several
conversations are packed per row; `segment_ids` keep them from attending to each other
(lm.masking.attention_mask) and `positions` restart at 0 in each.

Starting point: from scratch, or the params of a pretraining run (config.train.restore_from,
params only); `check_init_checkpoint` refuses a checkpoint whose tokenizer (kind,
vocabulary, special-token ids) differs from the one configured here.

After training, the `exact_match` evaluator (lm/evals/exact_match.py) decodes greedily on
held-out prompts of the built-in synthetic chat tasks and reports the exact-match accuracy of
the answers, and how often the model, let run past its <|end_of_turn|>, writes a user turn.
"""

from __future__ import annotations

import os
from typing import Any

from lm.data.build import CHAT_SOURCES
from lm.objectives import pretrain


# -- the loss ---------------------------------------------------------------------------------------


def make_loss_fn(config: Any, graphdef: Any):
    """loss_fn(params, batch, rng) -> (objective_sum, sums): pretraining's, on chat-masked batches."""
    if config.data.source not in CHAT_SOURCES:
        raise ValueError(f"config.objective='sft' needs a chat data source {CHAT_SOURCES} (their loss "
                         f"mask scores the assistant's turns); got data.source={config.data.source!r}")
    check_init_checkpoint(config)
    return pretrain.make_loss_fn(config, graphdef)


# -- starting from a pretrained checkpoint ----------------------------------------------------------


def init_checkpoint_path(config: Any) -> str | None:
    """config.train.restore_from when the config has it and it is set, else None."""
    train_cfg = config.train
    path = train_cfg.get("restore_from") if hasattr(train_cfg, "get") else None
    return path or None


def find_tokenizer_metadata(path: str) -> str:
    """tokenizer_metadata.json of the run that `path` (a run dir, its checkpoints/ dir or one
    checkpoint step inside it) belongs to; FileNotFoundError naming where it looked."""
    from lm.data.tokenizer import METADATA_FILE

    looked = []
    here = os.path.abspath(path)
    for _ in range(4):
        candidate = os.path.join(here, METADATA_FILE)
        looked.append(candidate)
        if os.path.exists(candidate):
            return candidate
        here = os.path.dirname(here)
    raise FileNotFoundError(f"no {METADATA_FILE} for checkpoint {path!r} (looked at {looked}): cannot check "
                            "that its tokenizer matches this run's; lm.cli.train writes it into every run directory")


def before_training(config: Any, tokenizer: Any) -> None:
    """Checks to run before any checkpoint is restored (see the SFT report: lm/cli/train.py hook)."""
    check_init_checkpoint(config, tokenizer)


def check_init_checkpoint(config: Any, tokenizer: Any = None) -> None:
    """Raise TokenizerMismatchError when config.train.restore_from names a run whose tokenizer
    (kind, vocab size, fingerprint, special-token ids) differs from config.data.tokenizer's."""
    path = init_checkpoint_path(config)
    if path is None:
        return
    from lm import data

    tokenizer = tokenizer or data.build_tokenizer(config.data)
    saved = data.load_metadata(find_tokenizer_metadata(path))
    try:
        data.check_metadata(saved, tokenizer.metadata(), expected_name=f"checkpoint {path}",
                            actual_name=f"data.tokenizer={config.data.tokenizer!r}")
    except data.TokenizerMismatchError as e:
        raise data.TokenizerMismatchError(
            f"{e}\nSFT must start from a checkpoint trained with the same tokenizer and special-token ids "
            "(set data.tokenizer to the pretraining run's, or train.restore_from to a matching run)") from None
