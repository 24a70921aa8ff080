"""The optimizer: AdamW with linear warmup + cosine decay, global-norm clipping, and
weight decay masked off 1-D parameters (norm scales, biases) unless configured."""

from __future__ import annotations

from typing import Any

import jax
import optax


def learning_rate_schedule(opt_cfg: Any, total_steps: int) -> optax.Schedule:
    """lr(step): 0 → lr linearly over warmup_steps, then cosine down to min_lr_ratio · lr at decay_steps."""
    decay_steps = opt_cfg.decay_steps or total_steps
    warmup = min(opt_cfg.warmup_steps, decay_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt_cfg.lr, warmup_steps=warmup,
        decay_steps=max(decay_steps, warmup + 1), end_value=opt_cfg.lr * opt_cfg.min_lr_ratio)


def weight_decay_mask(params: Any, decay_norms_and_biases: bool) -> Any:
    """True for parameters that get weight decay: matrices always, 1-D only if asked.

    Stacked layers add a leading axis, so a norm scale inside the blocks is [L, D]: the
    rule is "vectors per layer", judged on the last axis count after the layer axis.
    """
    def decays(path, x):
        ndim = x.ndim - (1 if any(getattr(k, "key", None) == "blocks" for k in path) else 0)
        return decay_norms_and_biases or ndim >= 2

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(opt_cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule) from `config.optimizer`."""
    if opt_cfg.lr <= 0:
        raise ValueError(f"optimizer.lr must be > 0, got {opt_cfg.lr}")
    if not 0 <= opt_cfg.b1 < 1 or not 0 <= opt_cfg.b2 < 1:
        raise ValueError(f"optimizer.b1 and b2 must be in [0, 1), got {opt_cfg.b1}, {opt_cfg.b2}")
    if opt_cfg.weight_decay < 0 or opt_cfg.grad_clip < 0 or opt_cfg.warmup_steps < 0:
        raise ValueError("optimizer.weight_decay, grad_clip and warmup_steps must be >= 0")
    schedule = learning_rate_schedule(opt_cfg, total_steps)
    adamw = optax.adamw(
        schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay,
        mask=lambda p: weight_decay_mask(p, opt_cfg.decay_norms_and_biases))
    parts = [optax.clip_by_global_norm(opt_cfg.grad_clip)] if opt_cfg.grad_clip > 0 else []
    return optax.chain(*parts, adamw), schedule
