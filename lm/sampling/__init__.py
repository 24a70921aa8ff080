"""Sampling from a Transformer: the jit-compiled KV-cache decode loop (decode.py) and the logit
filters it applies (filters.py: temperature, top-k, top-p, min-p, and behaviour_logprobs: the log-probs of the
distribution actually sampled, shared by the sampler and RL's scorer). The command line is lm/cli/sample.py."""

from lm.sampling.decode import Generation, SamplingConfig, generate, generate_batch, prepare_prompts
from lm.sampling.filters import (apply_temperature, behaviour_logprobs, filter_logits, min_p_filter, sample_token, top_k_filter,
                                 top_p_filter)

__all__ = ["Generation", "SamplingConfig", "apply_temperature", "behaviour_logprobs", "filter_logits", "generate", "generate_batch",
           "min_p_filter", "prepare_prompts", "sample_token", "top_k_filter", "top_p_filter"]
