"""Rollouts for RL: sample completions of already-padded prompts inside a caller's jit.

`rollout` is a traceable function (no host round trip, no Python checks on values): the
caller (lm/objectives/_rl.py) jits it (with `compiler_options=COMPILER_OPTIONS`) together with what follows, with the parameters as an
argument, so a new policy every step reuses one compiled program. It runs decode.py's own
pieces: `_prefill_fn` over the LEFT-padded prompts, then `_decode_fn`'s `lax.while_loop` over
the KV cache until every row has produced a stop token or `max_new_tokens` tokens (those jitted
functions' bodies are traced into the caller's jit). Rows, cache slots and positions follow decode.py's
module docstring: token i of a row sits at cache slot P+i, position len(prompt)+i.

Besides the tokens it returns, per sampled token y_i drawn from the logits x_i of step i,

    sample_logprobs[b, i] = log softmax(filter(x_i))[y_i]    the distribution it was drawn from
                                                             (temperature, top-k/p, min-p:
                                                             lm.sampling.behaviour_logprobs)
    policy_logprobs[b, i] = log softmax(x_i)[y_i]             the unfiltered policy at temperature 1
    entropy[b, i]         = H(softmax(filter(x_i)))           of the distribution drawn from

(0 after a row's stop), computed inside the loop: the rollout never holds [B, N, V] logits.
With temperature 1 and no filter both are log π_θ(y_i | prefix), equal up to float rounding to a teacher-forced forward pass over prompt + completion (tests check it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.model.cpu import for_decoding
from lm.sampling.decode import _DECODE_COMPILER_OPTIONS, _decode_fn, _prefill_fn
from lm.sampling.placement import Placement

Array = jax.Array
COMPILER_OPTIONS = _DECODE_COMPILER_OPTIONS  # pass to the jax.jit around `rollout` (decode.py: in-place cache updates)


def rollout(graphdef, params, prompt: dict, key: Array, knobs: dict, stop_ids: Array, *, max_new_tokens: int,
            decode_layout: bool = True, per_layer: bool | None = None, placement: Placement | None = None) -> dict:
    """Sample `max_new_tokens` tokens after each prompt (traceable; call it inside jax.jit).

    prompt: {tokens, positions, segment_ids: [B, P] int32 LEFT-padded (decode.prepare_prompts'
      layout; pad segment 0), lengths: [B] int32 real prompt tokens}.
    key: the sampling key (row b uses fold_in(key, b), step i fold_in(that, i), as in decode.py).
    knobs: {temperature, top_k, top_p, min_p} scalars (traced: changing them does not recompile).
    stop_ids: [S] int32 stop tokens (pad with −1).
    decode_layout: run the loop on `lm.model.cpu.for_decoding`'s fused copy of the model, built
      inside the trace from `params` (concatenations, once per call); False: the model as it is.
    placement: the mesh and rules the loop state (rows, KV cache) is laid out by at every step
      (lm/sampling/placement.py); None: left to the caller's jit and its activation hints.

    Returns {tokens [B, N] int32 (−1 after a row's stop token), lengths [B] int32 (tokens
    generated, stop token included), sample_logprobs, policy_logprobs, entropy: [B, N] float32
    (0 where tokens is −1)}.
    """
    batch, prompt_len = prompt["tokens"].shape
    if decode_layout:
        graphdef, params = nnx.split(for_decoding(nnx.merge(graphdef, params), per_layer=per_layer))
    # decode.py's jitted functions' bodies (a nested jit may not carry compiler options: the
    # caller's jit takes COMPILER_OPTIONS instead)
    state = _prefill_fn(graphdef, params, prompt, knobs, stop_ids, key, max_len=prompt_len + max_new_tokens,
                        max_new_tokens=max_new_tokens, keep_logits=False, keep_logprobs=True, placement=placement)
    state = _decode_fn(graphdef, params, state, knobs, stop_ids, jnp.int32(max_new_tokens), placement)
    tokens = state["tokens"]  # [B, N]; the step's [B, V] logits are reduced to [B] values as it runs
    produced = tokens >= 0
    return {"tokens": tokens, "lengths": jnp.sum(produced, axis=1).astype(jnp.int32),
            **{k: jnp.where(produced, state[k], 0.0) for k in ("sample_logprobs", "policy_logprobs", "entropy")}}


def left_padded(tokens, lengths) -> dict:
    """`rollout`'s prompt from LEFT-padded prompt tokens [B, P] and their real lengths [B]
    (traceable): segment 1 and positions 0, 1, … on each row's last `lengths` slots, 0 before."""
    prompt_len = tokens.shape[1]
    first = (prompt_len - jnp.asarray(lengths, jnp.int32))[:, None]
    slot = jnp.arange(prompt_len, dtype=jnp.int32)[None, :]
    return {"tokens": tokens, "lengths": lengths, "segment_ids": (slot >= first).astype(jnp.int32),
            "positions": jnp.maximum(slot - first, 0).astype(jnp.int32)}


def sequences(prompt: dict, tokens: Array, pad_id: int = 0) -> dict:
    """Prompt + completion as a batch of the token contract ([B, T], T = P + N; traceable).

    inputs = the left-padded prompt then the completion (−1 → pad_id); targets[t] = inputs[t+1]
    (pad at the end); segment_ids 1 on real prompt tokens and on generated ones, 0 elsewhere;
    positions continue the prompt's; loss_mask 1 exactly on the targets that are generated
    tokens (t = P−1 … P−2+len), so `target_logprobs` there are the completion's log-probs and
    row b's i-th scored target is its i-th generated token.
    """
    batch, prompt_len = prompt["tokens"].shape
    new = tokens.shape[1]
    produced = tokens >= 0
    inputs = jnp.concatenate([prompt["tokens"], jnp.where(produced, tokens, pad_id)], axis=1).astype(jnp.int32)
    targets = jnp.concatenate([inputs[:, 1:], jnp.full((batch, 1), pad_id, jnp.int32)], axis=1)
    segment_ids = jnp.concatenate([prompt["segment_ids"], produced.astype(jnp.int32)], axis=1)
    gen_positions = prompt["lengths"][:, None] + jnp.arange(new, dtype=jnp.int32)[None, :]
    positions = jnp.concatenate([prompt["positions"], jnp.where(produced, gen_positions, 0)], axis=1)
    # target t predicts inputs[t+1]: the completion's token i is the target at t = P−1+i
    scored = jnp.concatenate([jnp.zeros((batch, prompt_len - 1), bool), produced, jnp.zeros((batch, 1), bool)], axis=1)
    return {"inputs": inputs, "targets": targets, "loss_mask": scored.astype(jnp.float32),
            "segment_ids": segment_ids, "positions": positions.astype(jnp.int32)}


def completion_values(per_target: Array, prompt_len: int) -> Array:
    """[B, T] per-target values (T = P + N) → [B, N]: those of the completion's tokens."""
    new = per_target.shape[1] - prompt_len
    return per_target[:, prompt_len - 1:prompt_len - 1 + new]


def stop_ids_of(tokenizer) -> tuple[int, ...]:
    """Every id that ends a generation: the tokenizer's own list (`stop_ids`: an imported Hugging
    Face model's eos_token plus its generation_config.json eos_token_id list,
    lm.data.hf_tokenizer), its end_of_turn and its eos, in that order, without repeats."""
    ids = list(getattr(tokenizer, "stop_ids", None) or ())
    for name in ("end_of_turn_id", "eos_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            ids.append(int(value))
    return tuple(dict.fromkeys(int(i) for i in ids))


def stop_array(stop_ids) -> np.ndarray:
    """Stop ids → the int32 array `rollout` takes, padded with −1 (never sampled) to a multiple of 4
    (few distinct shapes: few compilations)."""
    stop_ids = tuple(int(i) for i in stop_ids)
    out = np.full((max(4, -(-len(stop_ids) // 4) * 4),), -1, np.int32)
    out[:len(stop_ids)] = stop_ids
    return out
