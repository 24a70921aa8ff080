"""The decoder-only Transformer in Flax NNX, and what is built on it.

    config.py       ModelConfig: shapes and numerics
    hints.py        activation sharding hints (constrain), mesh-agnostic
    layers.py       parameters with logical axes, RMSNorm, rotary, matmul/SwiGLU kernels, the MLP
    attention.py    grouped-query attention, causal within segments, with or without a cache
    cache.py        the key/value cache layout
    transformer.py  Block and Transformer: the one forward pass (training, prefill, decoding)
    heads.py        RewardModel (scalar per sequence) and ValueModel (value per token)
    cpu.py          for_decoding: the opt-in decode layout (fused, row-blocked, per-layer weights)
    counting.py     parameter and FLOP counts
    lora.py         low-rank adapters and the weight products every projection goes through
    quant.py        int8 / NF4 frozen weights (QLoRA's base)
    remat.py        the named rematerialization policies (model.remat)
"""

from lm.model.attention import Attention, attend, cache_sizes
from lm.model.config import ModelConfig
from lm.model.counting import flops_per_token, matmul_params, param_count
from lm.model.heads import RewardModel, ScalarHead, ValueModel, last_real_index, last_scored_index, with_final_token
from lm.model.hints import activation_sharding, constrain
from lm.model.layers import MLP, RMSNorm, matmuls, rope_frequencies, rotary, swiglu
from lm.model.transformer import Block, Transformer

__all__ = ["Attention", "Block", "MLP", "ModelConfig", "RMSNorm", "RewardModel", "ScalarHead", "Transformer",
           "ValueModel", "activation_sharding", "attend", "cache_sizes", "constrain", "flops_per_token",
           "last_real_index", "last_scored_index", "with_final_token", "matmul_params", "matmuls", "param_count", "rope_frequencies", "rotary", "swiglu"]
