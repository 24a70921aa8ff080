"""Per-token log-probabilities of targets under ``softmax(hidden @ kernel / T)``, chunked over tokens
and vocabulary, optionally sharded over a device mesh: the one computation behind every loss and
score that reads a language model's next-token distribution.

For a token with hidden state ``h`` ``[D]``, unembedding ``W`` (``[D, V]``, or a tied ``[V, D]``
table), temperature ``T`` and target ``y``, with ``x = Wᵀh / T`` and ``q = softmax(x)``::

    lse       = log Σ_v exp x_v
    logprob   = x_y − lse                  (log q_y; NaN when y is outside [0, V))
    entropy   = lse − Σ_v q_v x_v          (H(q) = −Σ q log q)
    mean_x    = (1/V) Σ_v x_v              (label smoothing)
    correct   = [argmax_v x_v = y]         (first index on ties)

Only ``[chunk, vocab_chunk]`` logits exist at any time, forward or backward, and on a mesh each
device computes its own rows (and vocabulary shard) inside ``shard_map``; no device gathers
another's activations. Products run in bf16 with float32 accumulation where the inputs are
bf16; everything after them is float32. The chunked core and its VJP are in
lm/losses/chunked_logprobs.py, the checks, casts and sharding in lm/losses/sharded_logprobs.py.

An out-of-range target (``y < 0`` or ``y ≥ V``) gives a NaN log-probability (loud, never a silent
wrong number); pass ``checked=True`` and run under ``jax.experimental.checkify`` (or use
:func:`lm.losses.checked`) to raise instead.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from lm.losses.sharded_logprobs import _check_shapes, _run, compute_dtype  # noqa: F401  (re-exported)
from lm.losses.sums import F32


class TokenLogprobs(NamedTuple):
    """Per-token statistics, each of the targets' shape ``[...]``, float32."""
    logprobs: jax.Array               # log q(y_t): NaN for an out-of-range target
    entropy: jax.Array | None = None  # H(q_t) (when asked for)
    logsumexp: jax.Array | None = None  # lse_t of the tempered logits (z-loss; when asked for)


def check_targets(targets, vocab, mask=None, where="lm.losses"):
    """Under ``jax.experimental.checkify``: an error naming the first out-of-range target (one
    outside [0, vocab) at an unmasked position). Outside checkify it raises at trace time."""
    targets = jnp.asarray(targets)
    bad = (targets < 0) | (targets >= vocab)
    if mask is not None:
        bad = bad & (jnp.broadcast_to(jnp.asarray(mask), targets.shape) != 0)
    first = jnp.argmax(bad.reshape(-1))
    checkify.check(~jnp.any(bad), f"{where}: target {{value}} at flat index {{index}} is outside [0, {vocab}) "
                   "(the vocabulary); fix the data, or the tokenizer's / model's vocab_size",
                   value=targets.reshape(-1)[first], index=first)


def token_logprobs(hidden, kernel, targets, *, kernel_layout="dv", temperature=1.0, entropy=False,
                   logsumexp=False, chunk_size=None, vocab_chunk_size=None, mesh=None, batch_axes=None,
                   vocab_axis=None, checked=False) -> TokenLogprobs:
    """Per-token ``log softmax(hidden @ kernel / temperature)[targets]`` without the ``[..., V]`` logits.

    Args:
      hidden: ``[..., D]`` final hidden states (e.g. ``[B, T, D]``), any float dtype.
      kernel: the unembedding, ``[D, V]`` (``kernel_layout='dv'``) or a tied ``[V, D]`` table
        (``'vd'``, used as stored).
      targets: ``[...]`` int token ids.
      temperature: T > 0 (a float or a traced scalar): the statistics are those of softmax(logits/T),
        the distribution a sampler at temperature T draws from.
      entropy, logsumexp: also return H(q) and lse of the tempered logits per token.
      chunk_size: tokens per chunk (static; default about 64 MiB of f32 logits per chunk).
      vocab_chunk_size: vocabulary entries per block (default: the whole local vocabulary).
      mesh, batch_axes, vocab_axis: run sharded (module docstring): rows split over
        ``batch_axes`` (mesh axes of size > 1 that divide the rows), the vocabulary over
        ``vocab_axis`` when it divides V. Leave ``mesh`` None for one device or automatic sharding.
      checked: add a ``checkify`` check that every target is in [0, V) (see :func:`lm.losses.checked`).

    Returns a :class:`TokenLogprobs` (float32, ``[...]``). Reverse-mode differentiable in
    ``hidden`` and ``kernel`` (gradients in their dtypes) from every output.
    """
    hidden, kernel, targets = jnp.asarray(hidden), jnp.asarray(kernel), jnp.asarray(targets)
    vocab = _check_shapes(hidden, kernel, targets, kernel_layout)
    if checked:
        check_targets(targets, vocab, where="lm.losses.token_logprobs")
    weights = jnp.zeros(targets.shape, F32)
    per_token, _ = _run(hidden, kernel, targets, weights, layout=kernel_layout, temperature=temperature,
                        z_loss=0.0, smoothing=0.0, chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size,
                        mesh=mesh, batch_axes=batch_axes, vocab_axis=vocab_axis, entropy=entropy,
                        objective=False)
    lp, lse, ent, _, _ = per_token
    return TokenLogprobs(lp, ent if entropy else None, lse if logsumexp else None)
