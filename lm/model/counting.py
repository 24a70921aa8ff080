"""Parameter and FLOP counts (for MFU and the run summary)."""

from __future__ import annotations

import math
from typing import Any

import jax

from lm.model.config import ModelConfig


def param_count(params: Any) -> int:
    """Total number of parameters in a pytree of arrays (or ShapeDtypeStructs)."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: all but the embedding lookup, plus the
    output projection (which is the embedding itself when tied)."""
    d, hd, layers = cfg.d_model, cfg.head_dim_, cfg.num_layers
    attn = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = 3 * d * cfg.mlp_dim
    return layers * (attn + mlp) + d * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token (forward + backward = 3 × forward, 2 FLOPs per multiply-add):

        model      = 6 · N,                    N = matmul_params (the usual 6N)
        attention  = ½ · 12 · L · T · d_attn,  d_attn = H · hd (query heads × head dim)

    The attention term counts the score product QKᵀ and the value product PV, 2·T·d_attn
    multiply-adds per token and layer forward, ×3 for the backward pass, ×2 FLOPs each = 12·L·T·d_attn
    for a full T×T product; a causal mask leaves half of it useful work (PaLM's accounting, with
    the causal half). `total` is their sum: the MFU numerator. FLOPs recomputed by remat are not
    counted (that would be hardware FLOPs utilization, not model FLOPs).
    """
    model = 6.0 * matmul_params(cfg)
    attention = 0.5 * 12.0 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim_
    return {"model": model, "attention": attention, "total": model + attention}
