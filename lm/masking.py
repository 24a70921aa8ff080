"""Teacher forcing, attention masks and loss masks, in pure ``jax.numpy``.

Two different masks decide what a language model learns (seed 004):

* the **attention mask** says what each position may *see*: causal (no
  future tokens) and, for packed rows, only its own document;
* the **loss mask** says which predictions are *scored*: all real tokens for
  pretraining, only assistant tokens for chat SFT.

Every mask here is built from explicit arrays (positions, segment ids, role
ids), never by comparing token values with a pad id: a real token that happens
to equal the pad id still counts.

Conventions: ``segment_ids`` are int, one id per packed document, 0 = padding.
A loss mask is float32 and **aligned with targets**: ``loss_mask[..., t]``
weighs the prediction of ``targets[..., t]``, i.e. it belongs to the token
being predicted, not to the input that predicts it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Role ids for chat data, one per token (the chat/SFT code writes these).
ROLE_PAD = 0        # padding: never trained on, never attended to
ROLE_SYSTEM = 1     # system prompt
ROLE_USER = 2       # user turns
ROLE_ASSISTANT = 3  # assistant turns (including the end-of-turn token that closes them)
ROLE_TOOL = 4       # tool / function outputs fed back to the model
ROLE_NAMES = {"pad": ROLE_PAD, "system": ROLE_SYSTEM, "user": ROLE_USER,
              "assistant": ROLE_ASSISTANT, "tool": ROLE_TOOL}


def shift_tokens(tokens, *, loss_mask=None, segment_ids=None):
    """Teacher forcing: ``inputs = tokens[..., :-1]``, ``targets = tokens[..., 1:]``.

    Args:
      tokens: ``[..., L]`` int token ids (e.g. ``[B, T+1]``).
      loss_mask: optional ``[..., L]`` weights *per token of ``tokens``*: the
        weight of learning to predict that token (e.g. from
        :func:`loss_mask_from_roles`). Its first entry is dropped, so that the
        result is aligned with ``targets``.
      segment_ids: optional ``[..., L]`` document ids of ``tokens`` (0 = padding).

    Returns:
      ``(inputs, targets, loss_mask)``, each ``[..., L-1]``; ``loss_mask`` is
      float32 and aligned with targets::

        loss_mask[t] = loss_mask_in[t+1]
                       · [segment_ids[t] == segment_ids[t+1]] · [segment_ids[t+1] != 0]

      so a target that crosses from one packed document into the next, or that
      is padding, gets weight 0. Without ``segment_ids`` every target counts
      (times ``loss_mask``). The input segment ids for the model are
      ``segment_ids[..., :-1]``.
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim < 1 or tokens.shape[-1] < 2:
        raise ValueError(f"shift_tokens needs at least 2 tokens on the last axis, got shape {tokens.shape}")
    inputs, targets = tokens[..., :-1], tokens[..., 1:]
    mask = jnp.ones(targets.shape, jnp.float32)
    if loss_mask is not None:
        loss_mask = jnp.asarray(loss_mask)
        if loss_mask.shape != tokens.shape:
            raise ValueError(f"loss_mask {loss_mask.shape} must have the shape of tokens {tokens.shape}")
        mask = mask * loss_mask[..., 1:].astype(jnp.float32)
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids)
        if segment_ids.shape != tokens.shape:
            raise ValueError(f"segment_ids {segment_ids.shape} must have the shape of tokens {tokens.shape}")
        same = (segment_ids[..., :-1] == segment_ids[..., 1:]) & (segment_ids[..., 1:] != 0)
        mask = mask * same.astype(jnp.float32)
    return inputs, targets, mask


def segment_positions(segment_ids):
    """Positions restarting at 0 in every segment: ``[..., T] -> [..., T]`` int32.

    A new segment starts wherever the id differs from the previous one (or at
    index 0). Padding (id 0) gets position 0.
    """
    segment_ids = jnp.asarray(segment_ids)
    index = jnp.broadcast_to(jnp.arange(segment_ids.shape[-1], dtype=jnp.int32), segment_ids.shape)
    start = jnp.concatenate([jnp.ones_like(segment_ids[..., :1], bool),
                             segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
    last_start = jax.lax.cummax(jnp.where(start, index, 0), axis=segment_ids.ndim - 1)
    return jnp.where(segment_ids != 0, index - last_start, 0).astype(jnp.int32)


def causal_mask(q_index, kv_index):
    """``[..., Tq], [..., Tk] -> [..., Tq, Tk]`` bool, True where ``kv_index <= q_index``.

    True = the query may attend to that key. The indices are positions in one
    common frame: ``arange(T)`` for training, or the absolute cache positions
    of queries and keys when decoding with a KV cache. (Within one packed
    document, per-document positions give the same mask; across documents
    :func:`segment_mask` decides.)
    """
    q_index, kv_index = jnp.asarray(q_index), jnp.asarray(kv_index)
    return kv_index[..., None, :] <= q_index[..., :, None]


def segment_mask(q_segment_ids, kv_segment_ids):
    """``[B, Tq], [B, Tk] -> [B, Tq, Tk]`` bool: same segment and not padding (id 0).

    Any leading shape works (``[..., Tq]``). A padding query row is all False:
    an attention implementation must turn it into finite scores (e.g. a large
    negative bias, not -inf) or zero output, never NaN.
    """
    q, kv = jnp.asarray(q_segment_ids), jnp.asarray(kv_segment_ids)
    return (q[..., :, None] == kv[..., None, :]) & (q[..., :, None] != 0)


def attention_mask(q_segment_ids, kv_segment_ids, q_index, kv_index):
    """Causal and same-segment: ``[B, Tq, Tk]`` bool (True = may attend).

    ``causal_mask(q_index, kv_index) & segment_mask(q_segment_ids, kv_segment_ids)``.
    For a packed training row: ``attention_mask(seg, seg, arange(T), arange(T))``.
    """
    return causal_mask(q_index, kv_index) & segment_mask(q_segment_ids, kv_segment_ids)


def loss_mask_from_roles(role_ids, *, train_on="assistant"):
    """Float32 loss mask from per-token role ids (``ROLE_*`` constants), elementwise.

    ``mask[i] = 1.0`` iff ``role_ids[i]`` is one of the trained roles, so the
    mask has the alignment of the ``role_ids`` you pass:

    * role ids of the *unshifted* tokens ``[B, T+1]``: pass the result to
      ``shift_tokens(tokens, loss_mask=...)``, which aligns it with targets;
    * role ids already aligned with targets (the role of ``targets[t]``,
      ``[B, T]``): the result is the ``loss_mask`` as is.

    Either way a prediction is scored when the token *predicted* belongs to a
    trained role: with ``'assistant'`` the model learns to write the assistant
    turns (and their closing end-of-turn token), never the user's words, while
    still seeing them through attention.

    Args:
      role_ids: ``[...]`` int role ids.
      train_on: ``'assistant'`` (assistant-only SFT), ``'all'`` (every
        non-padding token, as in pretraining), a role name from ``ROLE_NAMES``,
        or a sequence of role ids / names.
    """
    role_ids = jnp.asarray(role_ids)
    if isinstance(train_on, str) and train_on == "all":
        return (role_ids != ROLE_PAD).astype(jnp.float32)
    roles = [train_on] if isinstance(train_on, (str, int)) else list(train_on)
    ids = []
    for role in roles:
        if isinstance(role, str):
            if role not in ROLE_NAMES:
                raise ValueError(f"unknown role {role!r} in train_on; expected 'all' or one of "
                                 f"{sorted(ROLE_NAMES)} or role ids")
            ids.append(ROLE_NAMES[role])
        elif isinstance(role, int) and not isinstance(role, bool):
            ids.append(role)
        else:
            raise ValueError(f"train_on entries must be role names or int ids, got {role!r}")
    if not ids:
        raise ValueError("train_on is empty: no token would be trained on")
    return jnp.isin(role_ids, jnp.asarray(ids, role_ids.dtype)).astype(jnp.float32)
