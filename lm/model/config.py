"""The Transformer's shape and numerics: `ModelConfig` (mirrors `config.model`, configs/base.py)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ATTENTION_IMPLS = ("auto", "dense", "blockwise", "splash", "cudnn", "pallas_gpu")  # lm/model/attention_ops.py


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of the Transformer; every field is documented in configs/base.py."""

    vocab_size: int
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int | None = None  # None: d_model // num_heads
    mlp_dim: int = 768
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    dtype: str = "float32"  # compute dtype; parameters are always float32
    remat: bool | str = "none"  # what each block keeps for the backward pass: a policy of lm/model/remat.py
    # ('none', 'full', 'save_qkv_proj', 'save_out_proj', 'save_dots', 'offload'); True/False = 'full'/'none'
    attention_block: int = 0  # training attention in causal blocks of this many queries, skipping
    # the key blocks after each (exact; ~(1 + c/T)/2 of the score work); 0: one T×T block
    attention_impl: str = "auto"  # training/prefill attention: auto | dense | blockwise | splash | cudnn |
    # pallas_gpu (lm/model/attention_ops.py); auto by the platform compiled for: TPU splash, GPU cudnn
    # (bfloat16) or pallas_gpu, CPU dense for short rows and blockwise for long ones
    decode_block: int = 0  # 0: cached decoding attends to all cache slots (masked), the cost per
    # token flat in the generated length; b > 0: to the filled slots rounded up to a multiple of b
    # (at most 8 sizes, each compiled once: lax.switch), for caches much longer than what is used
    scan_layers: bool = True  # apply the stacked blocks with lax.scan (compile time flat in depth);
    # False unrolls them: a longer compile, but no stacked activation buffers to fill and slice
    init_scale: float = 1.0  # multiplies every initial standard deviation
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2): params bq [H, hd], bk, bv [K, hd]
    rope_scaling: str = "none"  # rotary frequencies: 'none' (theta^(-2i/d)) or 'llama3' (Llama 3.1's
    # rescaling of the low frequencies, see lm/model/layers.py: rope_frequencies; the four rope_* fields below)
    rope_factor: float = 8.0  # llama3: the long wavelengths' frequencies are divided by this
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original_max_position / this are scaled fully
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original_max_position / this are kept
    rope_original_max_position: int = 8192  # llama3: the context length the frequencies were trained for

    def __post_init__(self):
        problems = []
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim"):
            if getattr(self, name) is None or getattr(self, name) < 1:
                problems.append(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if not problems:
            if self.head_dim is None and self.d_model % self.num_heads:
                problems.append(
                    f"model.num_heads={self.num_heads} does not divide model.d_model={self.d_model}; "
                    "change one or set model.head_dim")
            if self.num_heads % self.num_kv_heads:
                problems.append(
                    f"model.num_kv_heads={self.num_kv_heads} must divide model.num_heads={self.num_heads}")
            if self.head_dim_ % 2:
                problems.append(f"head dim {self.head_dim_} must be even for rotary embeddings")
        if self.attention_block is None or self.attention_block < 0:
            problems.append(f"model.attention_block must be >= 0 (0: off), got {self.attention_block}")
        if self.decode_block is None or self.decode_block < 0:
            problems.append(f"model.decode_block must be >= 0 (0: off), got {self.decode_block}")
        if self.attention_impl not in ATTENTION_IMPLS:
            problems.append(f"model.attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.rope_scaling not in ("none", "llama3"):
            problems.append(f"model.rope_scaling must be 'none' or 'llama3', got {self.rope_scaling!r}")
        elif self.rope_scaling == "llama3" and not (
                self.rope_factor > 0 and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor
                and self.rope_original_max_position > 0):
            problems.append("model.rope_scaling='llama3' needs rope_factor > 0, 0 < rope_low_freq_factor < "
                            f"rope_high_freq_factor and rope_original_max_position > 0, got {self.rope_factor}, "
                            f"{self.rope_low_freq_factor}, {self.rope_high_freq_factor}, "
                            f"{self.rope_original_max_position}")
        try:
            from lm.model.remat import canonical
            # held as the policy's name (True/False → 'full'/'none'), so a ModelConfig written back
            # into a config (HF import, run directories) fits config.model.remat's string field
            object.__setattr__(self, "remat", canonical(self.remat))
        except ValueError as e:
            problems.append(str(e))
        if self.dtype not in DTYPES:
            problems.append(f"model.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_config(cls, model_block, tokenizer_vocab_size: int | None = None) -> "ModelConfig":
        """`config.model` → ModelConfig. model.vocab_size None means the tokenizer's size, which
        must then be given; a vocabulary smaller than the tokenizer's is an error."""
        fields = dict(model_block)
        if fields.get("vocab_size") is None:
            if tokenizer_vocab_size is None:
                raise ValueError("model.vocab_size is None (the tokenizer's size) but no tokenizer was read here; "
                                 "set model.vocab_size")
            fields["vocab_size"] = tokenizer_vocab_size
        if tokenizer_vocab_size is not None and fields["vocab_size"] < tokenizer_vocab_size:
            raise ValueError(f"model.vocab_size={fields['vocab_size']} is smaller than the tokenizer's "
                             f"{tokenizer_vocab_size}")
        return cls(**fields)

    @property
    def head_dim_(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]
