"""Sampling from the Transformer: a jit-compiled decode loop over its KV cache.

The logit filters (temperature, top-k, top-p, min-p; their math and order) are in ``lm.sampling.filters``
and re-exported here.

Decoding
--------
Prompts of different lengths are LEFT-padded to a common length P (pad: token 0, segment 0, never
attended to; real tokens: segment 1, positions 0, 1, … from each row's first real token), so every
row's next token goes into the same cache slot. The prompt fills slots 0 … P−1 in one forward call;
generated token i is sampled from the logits of step i and fed back at slot P+i, position
``len(prompt)+i``. Each call is the model's one forward pass (``Transformer.forward`` with the cache)
on a copy of the model laid out for decoding (``lm.model.cpu.for_decoding``: fused, row-blocked
weights, and on a CPU per-layer modules). The cache has ``max_len ≥ P + max_new_tokens`` slots, all
of them attended over (masked) at every step, so the cost per token does not grow with the
generated length.

The loop is a ``lax.while_loop`` inside ``jax.jit``, stopping when all rows have produced a stop
token or ``max_new_tokens`` tokens. A row that stopped keeps running (batched) but its outputs are
discarded (stored as −1). Knobs (temperature, top-k, top-p, min-p, seed) are traced values, so
changing them does not recompile; compiled functions are cached by jit per model structure and
shape (P is rounded up to a power of two, at least 16, when max_len allows).

Streaming: with ``chunk_size=n`` the same compiled loop runs for at most n tokens per call, the
state (cache included, donated) is handed back, ``on_chunk`` gets the new tokens, and the next call
continues. Sampling randomness is keyed by (seed, row, step), so chunking never changes the text:
the same seed gives the same text, and a row's text does not depend on the other rows (up to float
rounding: its logits agree to ~1e-6 whatever the padding).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.sampling.filters import (  # noqa: F401  (re-exported by lm.sampling)
    apply_temperature, behaviour_logprobs, filter_logits, min_p_filter, sample_token, top_k_filter, top_p_filter)
from lm.model.cpu import for_decoding
from lm.model.platform import compile_platform
from lm.sampling.placement import Placement

Array = jax.Array
F32 = jnp.float32
_MIN_PROMPT_PAD = 16  # P, the padded prompt length, is a power of two ≥ this (when max_len allows)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn; see the module docstring for the filter math and order."""

    temperature: float = 1.0  # ≥ 0; 0: greedy (argmax)
    top_k: int = 0  # ≥ 0; 0: off
    top_p: float = 1.0  # in (0, 1]; 1: off
    min_p: float = 0.0  # in [0, 1]; 0: off
    max_new_tokens: int = 64  # ≥ 1; tokens generated per prompt, stop token included
    stop_ids: tuple[int, ...] = ()  # end-of-sequence / end-of-turn ids: a row stops after one

    def __post_init__(self):
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
        problems = []
        if not _is_real(self.temperature) or not self.temperature >= 0:
            problems.append(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            problems.append(f"min_p must be in [0, 1] (0 = off), got {self.min_p!r}")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if problems:
            raise ValueError("SamplingConfig: " + "; ".join(problems))


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


# -- the decode loop ----------------------------------------------------------------------------


def _sample_rows(row_keys: Array, step: Array, logits: Array, knobs: dict[str, Array]) -> Array:
    """logits [B, V] → tokens [B], row b keyed by fold_in(row_keys[b], step)."""
    def one(key, row_logits):
        return sample_token(jax.random.fold_in(key, step), row_logits, **knobs)
    return jax.vmap(one)(row_keys, logits)


def _sample_and_score(row_keys: Array, step: Array, logits: Array, knobs: dict[str, Array]) -> tuple[Array, dict]:
    """`_sample_rows` (the same draws, bit for bit) that also returns, per row, what RL keeps of the
    step instead of its [B, V] logits: {sample_logprobs (log q(token) of the distribution drawn
    from, `behaviour_logprobs`), policy_logprobs (log softmax(x)[token], temperature 1, no filter),
    entropy (of q)}, each [B] float32."""
    filtered = filter_logits(logits, knobs["temperature"], knobs["top_k"], knobs["top_p"], knobs["min_p"])

    def one(key, row_filtered, row_logits):
        drawn = jax.random.categorical(jax.random.fold_in(key, step), row_filtered, axis=-1)
        return jnp.where(jnp.asarray(knobs["temperature"]) == 0, jnp.argmax(row_logits, axis=-1), drawn).astype(jnp.int32)

    token = jax.vmap(one)(row_keys, filtered, logits)
    logq = jax.nn.log_softmax(filtered, axis=-1)
    q = jnp.exp(logq)
    pick = lambda logp: jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]  # noqa: E731
    return token, {"sample_logprobs": pick(logq), "policy_logprobs": pick(jax.nn.log_softmax(logits, axis=-1)),
                   "entropy": -jnp.sum(jnp.where(q > 0, q * logq, 0.0), axis=-1)}


_KEPT = ("sample_logprobs", "policy_logprobs", "entropy")  # [B, N] per generated token (keep_logprobs)


def _is_stop(tokens: Array, stop_ids: Array) -> Array:
    return jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)


def _last_logits(model, inputs, positions, segment_ids, cache, cache_index):
    """The model's forward pass over the cache → (logits of the last position [B, V] float32, cache)."""
    hidden, cache = model.forward(inputs, positions, segment_ids, cache=cache, cache_index=cache_index)
    return model.logits_from_hidden(hidden[:, -1]).astype(F32), cache  # only the last position is sampled


def _prefill_fn(graphdef, params, prompt, knobs, stop_ids, key, *, max_len, max_new_tokens, keep_logits,
                keep_logprobs=False, placement: Placement | None = None):
    """Run the padded prompt through an empty cache and sample token 0: returns the loop state
    (laid out by `placement`, lm/sampling/placement.py, when given; traced under its hints)."""
    if placement is not None:
        with placement.traced():
            state = _prefill_fn(graphdef, params, prompt, knobs, stop_ids, key, max_len=max_len,
                                max_new_tokens=max_new_tokens, keep_logits=keep_logits, keep_logprobs=keep_logprobs)
        return placement.constrain(state)
    model = nnx.merge(graphdef, params)
    tokens, positions, segment_ids = prompt["tokens"], prompt["positions"], prompt["segment_ids"]
    batch, prompt_len = tokens.shape
    cache = model.init_cache(batch, max_len)
    logits, cache = _last_logits(model, tokens, positions, segment_ids, cache, 0)  # 0: the cache is empty
    # left padding puts every row's last real token at P−1: logits [B, V] are each row's next token's
    row_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(batch))
    if keep_logprobs:
        token, kept = _sample_and_score(row_keys, 0, logits, knobs)
    else:
        token = _sample_rows(row_keys, 0, logits, knobs)
    state = {
        "cache": cache,
        "tokens": jnp.full((batch, max_new_tokens), -1, jnp.int32).at[:, 0].set(token),
        "done": _is_stop(token, stop_ids),
        "step": jnp.int32(1),  # tokens produced so far (per row, until it stops)
        "lengths": prompt["lengths"],
        "prompt_len": jnp.int32(prompt_len),
        "row_keys": row_keys,
    }
    if keep_logits:
        state["logits"] = jnp.zeros((batch, max_new_tokens, logits.shape[-1]), F32).at[:, 0].set(logits)
    if keep_logprobs:  # [B, N] per generated token, never [B, N, V]
        state.update({k: jnp.zeros((batch, max_new_tokens), F32).at[:, 0].set(kept[k]) for k in _KEPT})
    return state


_prefill = jax.jit(_prefill_fn, static_argnames=("graphdef", "max_len", "max_new_tokens", "keep_logits",
                                                 "keep_logprobs", "placement"))


# XLA:CPU's default copy insertion copies every layer's k and v cache (read, then updated in place)
# at every decode step: 3 copies per cache buffer, ~25 MB per token at 528 slots. Its region
# analysis proves the update safe after the reads and writes in place (no copy). The option is a
# field of XLA's DebugOptions, named for the CPU backend; other backends do not read it. XLA's
# YNNPACK fusions stay on (turning them off made batch-8 steps faster on an AMD EPYC
# but ~16% slower on an Intel Xeon, and batch 1 no faster on either; benchmarks/README.md).
_DECODE_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


def _decode_fn(graphdef, params, state, knobs, stop_ids, stop_at, placement: Placement | None = None):
    """Continue the loop until `step` reaches `stop_at` or every row is done; returns the state
    (laid out by `placement` at every step, when given; traced under its hints)."""
    if placement is not None:
        with placement.traced():
            return _decode_loop(graphdef, params, placement.constrain(state), knobs, stop_ids, stop_at,
                                placement.constrain)
    return _decode_loop(graphdef, params, state, knobs, stop_ids, stop_at, lambda s: s)


def _decode_loop(graphdef, params, state, knobs, stop_ids, stop_at, constrain):
    max_new_tokens = state["tokens"].shape[1]

    def cond(s):
        return (s["step"] < jnp.minimum(stop_at, max_new_tokens)) & ~jnp.all(s["done"])

    def body(s):
        model = nnx.merge(graphdef, params)
        i = s["step"]
        previous = jax.lax.dynamic_index_in_dim(s["tokens"], i - 1, axis=1, keepdims=True)  # [B, 1]
        previous = jnp.maximum(previous, 0)  # stopped rows hold −1: feed any valid id
        positions = (s["lengths"] + i - 1)[:, None]
        logits, cache = _last_logits(model, previous, positions, jnp.ones_like(previous), s["cache"],
                                     s["prompt_len"] + i - 1)
        if "sample_logprobs" in s:
            token, kept = _sample_and_score(s["row_keys"], i, logits, knobs)
        else:
            token = _sample_rows(s["row_keys"], i, logits, knobs)
        was_done = s["done"]
        token = jnp.where(was_done, -1, token)
        s = dict(s, cache=cache, step=i + 1, done=s["done"] | _is_stop(token, stop_ids),
                 tokens=jax.lax.dynamic_update_index_in_dim(s["tokens"], token, i, axis=1))
        if "logits" in s:
            s["logits"] = jax.lax.dynamic_update_index_in_dim(s["logits"], logits, i, axis=1)
        if "sample_logprobs" in s:
            for k in _KEPT:
                s[k] = jax.lax.dynamic_update_index_in_dim(s[k], jnp.where(was_done, 0.0, kept[k]), i, axis=1)
        return constrain(s)

    return jax.lax.while_loop(cond, body, state)


_decode_chunk = jax.jit(_decode_fn, static_argnames=("graphdef", "placement"), donate_argnames=("state",),
                        compiler_options=_DECODE_COMPILER_OPTIONS)


class Generation(NamedTuple):
    """What `generate_batch` returns (numpy, on the host)."""

    tokens: np.ndarray  # [B, max_new_tokens] int32; −1 after a row's stop token
    lengths: np.ndarray  # [B] tokens generated per row, stop token included
    logits: np.ndarray | None  # [B, max_new_tokens, V] float32 logits each token was drawn from


def _split(graphdef_or_model, params):
    if isinstance(graphdef_or_model, nnx.Module):
        return nnx.split(graphdef_or_model)
    if params is None:
        raise ValueError("generate: params is None; pass (graphdef, params) or (model, None)")
    return graphdef_or_model, params


def prepare_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, max_new_tokens: int,
                    max_len: int | None) -> tuple[dict[str, np.ndarray], int]:
    """Check and LEFT-pad prompts: returns ({tokens, positions, segment_ids: [B, P], lengths: [B]}, max_len).

    Raises ValueError, before anything is compiled, for no prompts, an empty prompt, an id outside
    [0, vocab_size), or a prompt that with max_new_tokens does not fit in max_len cache slots.
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError(f"prompts must be a non-empty list of token-id lists, got {type(prompts).__name__}"
                         f"{'' if not isinstance(prompts, Sequence) else ' of length ' + str(len(prompts))}")
    if max_len is not None and (not _is_int(max_len) or max_len < 2):
        raise ValueError(f"max_len must be an integer >= 2 or None, got {max_len!r}")
    rows = []
    for r, prompt in enumerate(prompts):
        ids = np.asarray(prompt)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"prompt {r} is empty or not a flat list of token ids (shape {ids.shape}); "
                             "every prompt needs at least one token (e.g. a beginning-of-sequence id)")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"prompt {r} holds non-integer values (dtype {ids.dtype})")
        bad = (ids < 0) | (ids >= vocab_size)
        if bad.any():
            j = int(np.argmax(bad))
            raise ValueError(f"prompt {r}, token {j}: id {int(ids[j])} is outside the vocabulary [0, {vocab_size})")
        rows.append(ids.astype(np.int32))
    longest = max(len(ids) for ids in rows)
    bucket = max(_MIN_PROMPT_PAD, 1 << (longest - 1).bit_length())  # few shapes: few compilations
    if max_len is None:
        max_len = bucket + max_new_tokens
    if longest + max_new_tokens > max_len:
        r = int(np.argmax([len(ids) for ids in rows]))
        what = "is longer than" if longest > max_len else f"plus max_new_tokens={max_new_tokens} exceeds"
        raise ValueError(f"prompt {r} has {longest} tokens, which {what} max_len={max_len}; shorten the prompt, "
                         "lower max_new_tokens or raise max_len")
    padded_len = min(bucket, max_len - max_new_tokens)
    batch = len(rows)
    out = {name: np.zeros((batch, padded_len), np.int32) for name in ("tokens", "positions", "segment_ids")}
    for r, ids in enumerate(rows):
        start = padded_len - len(ids)
        out["tokens"][r, start:] = ids
        out["positions"][r, start:] = np.arange(len(ids))
        out["segment_ids"][r, start:] = 1
    out["lengths"] = np.array([len(ids) for ids in rows], np.int32)
    return out, max_len


class DecodingInputs(NamedTuple):
    """The arguments of the prefill and decode jits, placed on the mesh (`decoding_inputs`)."""

    graphdef: object  # of the model laid out for decoding (lm/model/cpu.py)
    params: dict  # its parameters (pure dict), sharded by their logical axes
    prompt: dict  # prepare_prompts' arrays, rows over the batch axes
    knobs: dict  # temperature, top_k, top_p, min_p: replicated scalars
    stop_ids: jax.Array  # [S] int32, padded with −1, replicated
    key: jax.Array  # the sampling key, replicated
    placement: Placement  # the mesh, its rules: the loop state's layout (lm/sampling/placement.py)
    max_len: int  # cache slots


def decoding_inputs(graphdef_or_model, params, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                    seed: int, max_len: int | None = None, unroll_layers: bool | None = None, mesh=None,
                    rules=None) -> DecodingInputs:
    """Check everything (before compiling anything), lay the model out for decoding and place
    the arguments of the jits on the mesh; see `generate_batch` for the arguments."""
    if not isinstance(sampling, SamplingConfig):
        raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
    if not _is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    graphdef, params = _split(graphdef_or_model, params)
    model = nnx.merge(graphdef, params)  # on the host: only to read the config
    if not all(hasattr(model, name) for name in ("cfg", "init_cache", "forward", "blocks")):
        raise TypeError(f"generate needs an lm.model.Transformer (or its graphdef), got {type(model).__name__}")
    vocab_size = model.cfg.vocab_size
    if any(not 0 <= i < vocab_size for i in sampling.stop_ids):
        raise ValueError(f"stop_ids {sampling.stop_ids} must lie in [0, {vocab_size})")
    prompt, max_len = prepare_prompts(prompts, vocab_size, sampling.max_new_tokens, max_len)
    knobs = {"temperature": np.float32(sampling.temperature), "top_k": np.int32(sampling.top_k),
             "top_p": np.float32(sampling.top_p), "min_p": np.float32(sampling.min_p)}
    slots = -(-len(sampling.stop_ids) // 4) * 4  # padded with −1 (never sampled): fewer recompiles
    stop_ids = np.full((max(slots, 4),), -1, np.int32)
    stop_ids[:len(sampling.stop_ids)] = sampling.stop_ids
    key = jax.random.key(np.uint32(seed % 2**32))
    placement = Placement.of(mesh, rules)
    # the model laid out for decoding (fused, row-blocked weights; per-layer on CPU): lm/model/cpu.py
    per_layer = compile_platform(placement.mesh) == "cpu" if unroll_layers is None else unroll_layers
    graphdef, state = nnx.split(for_decoding(model, per_layer=per_layer))
    params, param_shardings = placement.params(state)
    knobs, stop_ids, key = placement.replicate((knobs, stop_ids, key))
    return DecodingInputs(graphdef, jax.device_put(params, param_shardings), placement.put(prompt), knobs, stop_ids,
                          key, placement, max_len)


def generate_batch(graphdef_or_model, params, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                   seed: int, max_len: int | None = None, chunk_size: int | None = None,
                   on_chunk: Callable[[list[list[int]]], None] | None = None,
                   keep_logits: bool = False, unroll_layers: bool | None = None, mesh=None,
                   rules=None) -> Generation:
    """Sample continuations of `prompts` (lists of token ids); see the module docstring.

    max_len: cache slots (≥ longest prompt + max_new_tokens; None: just enough). chunk_size:
    tokens per jitted call (None: all in one); after each call `on_chunk(new)` gets, per row, the
    tokens produced by it (stopped rows: []). keep_logits: also return every step's logits [B, N, V].
    unroll_layers: decode with per-layer copies of the blocks (lm/model/cpu.py) instead of the
    stacked ones; None: per-layer when compiling for a CPU, where it is faster.
    mesh, rules: the run's mesh and its logical-axis rules (config.mesh.rules): the prefill and
    decode jits take their in/out shardings from them (lm/sampling/placement.py: rows over the
    batch axes, the KV cache by rows and kv heads, parameters by their logical axes). None: one
    device.
    """
    if chunk_size is not None and (not _is_int(chunk_size) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    run = decoding_inputs(graphdef_or_model, params, prompts, sampling, seed=seed, max_len=max_len,
                          unroll_layers=unroll_layers, mesh=mesh, rules=rules)
    graphdef, params, knobs, stop_ids, placement = run.graphdef, run.params, run.knobs, run.stop_ids, run.placement
    new_tokens = sampling.max_new_tokens
    state = _prefill(graphdef, params, run.prompt, knobs, stop_ids, run.key, max_len=run.max_len,
                     max_new_tokens=new_tokens, keep_logits=keep_logits, placement=placement)
    chunk = new_tokens if chunk_size is None else chunk_size
    stop_at, emitted, step = 0, 0, 1  # the prefill produced token 0
    while True:
        stop_at = min(stop_at + chunk, new_tokens)
        if stop_at > step:
            state = _decode_chunk(graphdef, params, state, knobs, stop_ids, placement.replicate(np.int32(stop_at)),
                                  placement=placement)
        step, all_done = int(state["step"]), bool(jnp.all(state["done"]))
        if on_chunk is not None:
            block = np.asarray(state["tokens"][:, emitted:step])
            on_chunk([[int(t) for t in row if t >= 0] for row in block])
        emitted = step
        if all_done or step >= new_tokens:
            break
    tokens = np.asarray(state["tokens"])
    lengths = (tokens >= 0).sum(axis=1).astype(np.int32)
    logits = np.asarray(state["logits"]) if keep_logits else None
    return Generation(tokens=tokens, lengths=lengths, logits=logits)


def generate(graphdef_or_model, params, prompts: list[list[int]], sampling: SamplingConfig, *, seed: int,
             max_len: int | None = None, mesh=None, rules=None) -> list[list[int]]:
    """The generated continuation (without the prompt) of each prompt, its stop token included if hit.

    `graphdef_or_model, params`: `nnx.split(model)`, or `(model, None)`. Same seed → same output.
    mesh, rules: as for `generate_batch`.
    """
    out = generate_batch(graphdef_or_model, params, prompts, sampling, seed=seed, max_len=max_len, mesh=mesh,
                         rules=rules)
    return [row[:n].tolist() for row, n in zip(out.tokens, out.lengths)]
