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

Only ``[chunk, vocab_chunk]`` logits exist at any time, forward or backward: the statistics are
merged across vocabulary blocks online (running max, rescaled sums), and the backward pass
(custom VJP) recomputes each block's logits. For output cotangents ``g_lp, g_lse, g_H, g_mx`` the
gradient with respect to x is, per token::

    dL/dx_v = q_v (g_lse − g_lp − g_H·H) + [v = y] g_lp + g_mx / V − g_H q_v (x_v − lse)

so ``dlogits = dL/dx / T``, ``dh = dlogits Wᵀ`` and ``dW = h dlogitsᵀ``, block by block.

Precision: the products run in the narrower of the hidden and kernel dtypes (bf16 × bf16 on an
accelerator) with float32 accumulation (``preferred_element_type``); everything after (max,
exp, sums, lse) is float32. A float32 kernel is cast once to a bf16 hidden's dtype, as every
layer of a mixed-precision model casts its weights; it is never copied to float32.

Sharding: given a mesh, the rows (first axis of ``hidden``/``targets``) are split over
``batch_axes`` and, with a ``vocab_axis``, the vocabulary over it (the kernel's ``V`` axis). Each
device computes its own rows against its own vocabulary shard inside ``shard_map``; the
per-token statistics are combined across the vocabulary axis with ``pmax``/``psum`` of
``[rows]`` vectors. No device gathers another device's activations; the only gathered array is
the kernel over any mesh axis that splits its ``D`` axis (FSDP's usual weight gather).

An out-of-range target (``y < 0`` or ``y ≥ V``) gives a NaN log-probability (loud, never a silent
wrong number); pass ``checked=True`` and run under ``jax.experimental.checkify`` (or use
:func:`lm.losses.checked`) to raise instead.
"""
from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import checkify
from jax.sharding import PartitionSpec as P

from lm.losses.sums import F32

_CHUNK_BYTES = 64 * 2**20  # auto token chunk: about this many bytes of f32 logits per chunk
_DK_BLOCK_ELEMS = 8 * 2**20  # kernel-gradient update block: [D, 8Mi/D] f32 = 32 MiB
_BIG = jnp.iinfo(jnp.int32).max


class TokenLogprobs(NamedTuple):
    """Per-token statistics, each of the targets' shape ``[...]``, float32."""
    logprobs: jax.Array               # log q(y_t): NaN for an out-of-range target
    entropy: jax.Array | None = None  # H(q_t) (when asked for)
    logsumexp: jax.Array | None = None  # lse_t of the tempered logits (z-loss; when asked for)


class _Static(NamedTuple):
    chunk: int        # tokens per chunk
    vchunk: int       # vocabulary entries per block (of the local shard)
    layout: str       # 'dv' or 'vd'
    vocab: int        # global V
    vocab_axis: str | None  # mesh axis splitting V (inside shard_map), or None
    entropy: bool     # compute the entropy
    objective: bool   # also the fused cross-entropy objective Σ w·loss (and its gradient in forward)


# -- blocks of the vocabulary -------------------------------------------------------------------


def _kslice(kernel, start, size, layout):
    return jax.lax.dynamic_slice_in_dim(kernel, start, size, axis=1 if layout == "dv" else 0)


def _logits(h, kernel_block, layout):
    dims = ((1,), (0,)) if layout == "dv" else ((1,), (1,))
    return jax.lax.dot_general(h, kernel_block, (dims, ((), ())), preferred_element_type=F32)


def _over_vocab(body, carry, v_local, vchunk):
    """carry = body(carry, start, size) over blocks [start, start+size) covering [0, v_local):
    full blocks in a fori_loop (one at a time), then a static tail."""
    n_full, tail = divmod(v_local, vchunk)
    if n_full == 1:
        carry = body(carry, 0, vchunk)
    elif n_full > 1:
        carry = jax.lax.fori_loop(0, n_full, lambda i, c: body(c, i * vchunk, vchunk), carry)
    if tail:
        carry = body(carry, n_full * vchunk, tail)
    return carry


def _vocab_offset(st, v_local):
    return jax.lax.axis_index(st.vocab_axis) * v_local if st.vocab_axis else 0


def _chunk_stats(h, kernel, t, inv_temp, st):
    """(lse, entropy | None, mean_x, target logit x_y, argmax index, x if one block else None)
    for a token chunk: h ``[c, D]``, t ``[c]``; statistics over the whole (global) vocabulary."""
    v_local = kernel.shape[1 if st.layout == "dv" else 0]
    offset = _vocab_offset(st, v_local)
    c = h.shape[0]

    def block(carry, start, size, keep_x=False):
        m, s, u, sx, tgt, idx = carry
        x = _logits(h, _kslice(kernel, start, size, st.layout), st.layout) * inv_temp  # [c, size]
        bm = jnp.max(x, axis=-1)
        nm = jnp.maximum(m, bm)
        e = jnp.exp(x - nm[:, None])
        rescale = jnp.exp(m - nm)
        s = s * rescale + jnp.sum(e, axis=-1)
        if st.entropy:
            u = u * rescale + jnp.sum(e * x, axis=-1)
        sx = sx + jnp.sum(x, axis=-1)
        local = t - offset - start  # the target's index in this block (a gather, not a [c, size] pass)
        inside = (local >= 0) & (local < size)
        picked = jnp.take_along_axis(x, jnp.clip(local, 0, size - 1)[:, None], axis=-1)[:, 0]
        tgt = tgt + jnp.where(inside, picked, 0.0)
        idx = jnp.where(bm > m, jnp.argmax(x, axis=-1).astype(jnp.int32) + offset + start, idx)
        return (nm, s, u, sx, tgt, idx), (x if keep_x else None)

    zeros = jnp.zeros((c,), F32)
    init = (jnp.full((c,), -jnp.inf, F32), zeros, zeros, zeros, zeros, jnp.zeros((c,), jnp.int32))
    x = None
    if v_local <= st.vchunk:
        carry, x = block(init, 0, v_local, keep_x=True)
    else:
        carry = _over_vocab(lambda cr, a, n: block(cr, a, n)[0], init, v_local, st.vchunk)
    m, s, u, sx, tgt, idx = carry
    if st.vocab_axis:  # combine the shards' statistics: rescale to the global max, then add
        mg = jax.lax.pmax(m, st.vocab_axis)
        scale = jnp.exp(m - mg)
        s, u = (jax.lax.psum(v * scale, st.vocab_axis) for v in (s, u))
        sx, tgt = (jax.lax.psum(v, st.vocab_axis) for v in (sx, tgt))
        idx = jax.lax.pmin(jnp.where(m == mg, idx, _BIG), st.vocab_axis)
        m = mg
    lse = m + jnp.log(s)
    ent = lse - u / s if st.entropy else None
    return lse, ent, sx / st.vocab, tgt, idx, x


def _chunk_grad(h, kernel, t, lse, coefs, inv_temp, st, x, want_h, want_k, dk):
    """dh ``[c, D]`` (f32) and dk += h-part for per-token coefficients (a, b, c, e):
    dL/dx = a·q + b·onehot(y) + c + e·q·(x − lse), dlogits = dL/dx / T."""
    a, b, cc, e = coefs
    v_local = kernel.shape[1 if st.layout == "dv" else 0]
    offset = _vocab_offset(st, v_local)
    cdt = h.dtype

    def block(carry, start, size, x=None):
        dh, dk = carry
        kb = _kslice(kernel, start, size, st.layout)
        if x is None:
            x = _logits(h, kb, st.layout) * inv_temp
        q = jnp.exp(x - lse[:, None])
        hit = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1) == (t - offset - start)[:, None]
        dx = a[:, None] * q + jnp.where(hit, b[:, None], 0.0) + cc[:, None]
        if st.entropy:
            dx = dx + e[:, None] * q * (x - lse[:, None])
        dx = (dx * inv_temp).astype(cdt)
        if want_h:
            dims = ((1,), (1,)) if st.layout == "dv" else ((1,), (0,))
            dh = dh + jax.lax.dot_general(dx, kb, (dims, ((), ())), preferred_element_type=F32)
        if want_k:
            dk = _add_dk(dk, dx, h, start, st.layout)
        return dh, dk

    carry = (jnp.zeros(h.shape, F32) if want_h else None, dk)
    if x is not None:
        return block(carry, 0, v_local, x)
    return _over_vocab(block, carry, v_local, st.vchunk)


def _add_dk(dk, dx, h, base, layout):
    """dk[:, base:base+n] += h_cᵀ dx ('dv'; 'vd': rows), one sub-block at a time in a loop (so
    that no second kernel-sized temporary exists beside the f32 accumulator)."""
    n, dim = dx.shape[1], h.shape[1]
    sub = min(n, max(128, _DK_BLOCK_ELEMS // dim))

    def update(dk, start, size):
        dx_b = jax.lax.dynamic_slice_in_dim(dx, start, size, axis=1)
        if layout == "dv":
            prod = jax.lax.dot_general(h, dx_b, (((0,), (0,)), ((), ())), preferred_element_type=F32)
            at = (0, base + start)
        else:
            prod = jax.lax.dot_general(dx_b, h, (((0,), (0,)), ((), ())), preferred_element_type=F32)
            at = (base + start, 0)
        return jax.lax.dynamic_update_slice(dk, jax.lax.dynamic_slice(dk, at, prod.shape) + prod, at)

    return _over_vocab(update, dk, n, sub)


# -- the chunked core with its VJP --------------------------------------------------------------


def _chunked(xs, chunk):
    return jax.tree.map(lambda v: v.reshape((v.shape[0] // chunk, chunk) + v.shape[1:]), xs)


def _unchunk(v):
    return None if v is None else v.reshape((-1,) + v.shape[2:])


def _objective_coefs(lse, weights, z_loss, smoothing):
    """Per-token cotangents (g_lp, g_lse, g_mx) of Σ w·[(1−α)(−lp) + α(lse − mean_x) + z·lse²]."""
    return -(1.0 - smoothing) * weights, (smoothing + 2.0 * z_loss * lse) * weights, -smoothing * weights


def _coefs(lse, ent, g_lp, g_lse, g_ent, g_mx, vocab):
    """(a, b, c, e) of `_chunk_grad` from per-token output cotangents."""
    a = g_lse - g_lp - (0.0 if ent is None else g_ent * ent)
    return a, g_lp, g_mx / vocab, -g_ent


def _forward(st, hidden, kernel, targets, weights, inv_temp, z_loss, smoothing, want_h, want_k):
    """Per-token (lp, lse, ent, mean_x, correct), the objective (if st.objective) and, when
    differentiated, the objective's gradient (dh [N, D] f32, dk f32)."""
    grad_obj = st.objective and (want_h or want_k)

    def step(dk, xs):
        h, t, w = xs
        lse, ent, mx, tgt, idx, x = _chunk_stats(h, kernel, t, inv_temp, st)
        lp = jnp.where((t >= 0) & (t < st.vocab), tgt - lse, jnp.nan)
        correct = (idx == t).astype(F32)
        obj = dh = None
        if st.objective:
            keep = w != 0
            loss = (1.0 - smoothing) * (-lp) + smoothing * (lse - mx) + z_loss * lse**2
            obj = jnp.sum(jnp.where(keep, loss, 0.0) * w)
        if grad_obj:
            g_lp, g_lse, g_mx = _objective_coefs(lse, jnp.where(w != 0, w, 0.0), z_loss, smoothing)
            zero = jnp.zeros_like(lse)
            dh, dk = _chunk_grad(h, kernel, t, lse, _coefs(lse, None, g_lp, g_lse, zero, g_mx, st.vocab),
                                 inv_temp, st._replace(entropy=False), x, want_h, want_k, dk)
        return dk, (lp, lse, ent, mx, correct, obj, dh)

    dk0 = jnp.zeros(kernel.shape, F32) if grad_obj and want_k else None
    dk, outs = jax.lax.scan(step, dk0, _chunked((hidden, targets, weights), st.chunk))
    lp, lse, ent, mx, correct, obj, dh = outs
    per_token = tuple(_unchunk(v) for v in (lp, lse, ent, mx, correct))
    return per_token, (None if obj is None else jnp.sum(obj)), _unchunk(dh), dk


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(st, hidden, kernel, targets, weights, inv_temp, z_loss, smoothing):
    per_token, obj, _, _ = _forward(st, hidden, kernel, targets, weights, inv_temp, z_loss, smoothing,
                                    False, False)
    return per_token, obj


def _core_fwd(st, hidden, kernel, targets, weights, inv_temp, z_loss, smoothing):
    want_h, want_k = hidden.perturbed, kernel.perturbed
    args = [v.value for v in (hidden, kernel, targets, weights, inv_temp, z_loss, smoothing)]
    per_token, obj, dh, dk = _forward(st, *args, want_h, want_k)
    return (per_token, obj), (*args, per_token[1], per_token[2], dh, dk, want_h, want_k)


def _core_bwd(st, res, cts):
    hidden, kernel, targets, weights, inv_temp, z_loss, smoothing, lse, ent, dh_obj, dk_obj, want_h, want_k = res
    (g_lp, g_lse, g_ent, g_mx, _), g_obj = cts
    zero = lambda g: g is None or isinstance(g, jax.custom_derivatives.SymbolicZero)  # noqa: E731
    full = lambda g: g if st.vocab_axis is None else jax.lax.psum(g, st.vocab_axis)  # noqa: E731
    # (inside shard_map without vma checks each vocabulary shard receives 1/n of the cotangent of
    # an output it shares with the others: their sum is the whole cotangent)
    dh = jnp.zeros(hidden.shape, F32) if want_h else None
    dk = jnp.zeros(kernel.shape, F32) if want_k else None
    if st.objective and not zero(g_obj):
        g = full(g_obj)
        dh = dh + g * dh_obj if want_h else None
        dk = dk + g * dk_obj if want_k else None
    if not all(zero(g) for g in (g_lp, g_lse, g_ent, g_mx)):
        vec = lambda g: jnp.zeros_like(lse) if zero(g) else full(g)  # noqa: E731
        valid = (targets >= 0) & (targets < st.vocab)
        g_lp = jnp.where(valid, vec(g_lp), 0.0)
        coefs = _coefs(lse, ent, g_lp, vec(g_lse), vec(g_ent), vec(g_mx), st.vocab)

        def step(dk, xs):
            h, t, l, *c = xs
            return _chunk_grad(h, kernel, t, l, c, inv_temp, st, None, want_h, want_k, dk)[::-1]

        dk, dh2 = jax.lax.scan(step, dk, _chunked((hidden, targets, lse) + coefs, st.chunk))
        dh = dh + _unchunk(dh2) if want_h else None
    cast = lambda g, like: None if g is None else g.astype(like.dtype)  # noqa: E731
    return cast(dh, hidden), cast(dk, kernel), None, None, None, None, None


_core.defvjp(_core_fwd, _core_bwd, symbolic_zeros=True)


# -- the public entry points --------------------------------------------------------------------


def _check_shapes(hidden, kernel, targets, layout):
    if layout not in ("dv", "vd"):
        raise ValueError(f"kernel_layout must be 'dv' ([D, V]) or 'vd' ([V, D]), got {layout!r}")
    dim = hidden.shape[-1]
    k_dim, vocab = (-1, 0) if kernel.ndim != 2 else (kernel.shape if layout == "dv" else kernel.shape[::-1])
    if k_dim != dim:
        raise ValueError(f"kernel {kernel.shape} ({layout}) does not match hidden {hidden.shape}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {hidden.shape} must be targets {targets.shape} + [D]")
    return vocab


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


def compute_dtype(hidden, kernel):
    """The products' operand dtype: the narrower of the two (bf16 when either is bf16)."""
    return hidden.dtype if jnp.dtype(hidden.dtype).itemsize <= jnp.dtype(kernel.dtype).itemsize else kernel.dtype


def _run(hidden, kernel, targets, weights, *, layout, temperature, z_loss, smoothing, chunk_size,
         vocab_chunk_size, mesh, batch_axes, vocab_axis, entropy, objective):
    """Flatten, pad, shard and call the core. Returns (per-token tuple in [...], objective)."""
    vocab = _check_shapes(hidden, kernel, targets, layout)
    cdt = compute_dtype(hidden, kernel)
    hidden, kernel = hidden.astype(cdt), kernel.astype(cdt)
    token_shape, dim = targets.shape, hidden.shape[-1]
    rows = token_shape[0] if token_shape else 1
    if mesh is not None:
        batch_axes = tuple(a for a in (batch_axes or ()) if mesh.shape[a] > 1)
        n_rows = 1
        for a in batch_axes:
            n_rows *= mesh.shape[a]
        if not token_shape or rows % n_rows:
            batch_axes, n_rows = (), 1
        if vocab_axis is not None and (mesh.shape[vocab_axis] == 1 or vocab % mesh.shape[vocab_axis]):
            vocab_axis = None
        if not batch_axes and vocab_axis is None:
            mesh = None
    else:
        batch_axes, vocab_axis, n_rows = (), None, 1
    v_local = vocab // (mesh.shape[vocab_axis] if vocab_axis else 1)
    local_tokens = max(1, (rows // n_rows) * math.prod(token_shape[1:]))
    if chunk_size is None:
        chunk_size = max(8, min(4096, _CHUNK_BYTES // (4 * min(v_local, vocab_chunk_size or v_local))) // 8 * 8)
    st = _Static(chunk=int(max(1, min(chunk_size, local_tokens))), vchunk=int(min(vocab_chunk_size or v_local,
                 v_local)), layout=layout, vocab=vocab, vocab_axis=vocab_axis, entropy=entropy,
                 objective=objective)
    scalars = (jnp.asarray(1.0 / temperature, F32), jnp.asarray(z_loss, F32), jnp.asarray(smoothing, F32))

    def local(h, k, t, w, *scalars):
        n = t.size
        h, t, w = h.reshape(n, dim), t.reshape(n).astype(jnp.int32), w.reshape(n)
        pad = -n % st.chunk
        if pad:
            h, t, w = jnp.pad(h, ((0, pad), (0, 0))), jnp.pad(t, (0, pad)), jnp.pad(w, (0, pad))
        per_token, obj = _core(st, h, k, t, w, *scalars)
        per_token = tuple(None if v is None else v[:n] for v in per_token)
        return per_token, (jnp.zeros((1,), F32) if obj is None else obj.reshape(1))

    if mesh is None:
        per_token, obj = local(hidden, kernel, targets, weights, *scalars)
        return tuple(None if v is None else v.reshape(token_shape) for v in per_token), obj[0]
    rows_spec = batch_axes or None
    tok = P(rows_spec, *([None] * (len(token_shape) - 1)))
    k_spec = P(None, vocab_axis) if layout == "dv" else P(vocab_axis, None)
    h_spec = P(rows_spec, *([None] * len(token_shape)))
    out_tok = tuple(None if (i == 2 and not entropy) else tok for i in range(5))
    fn = jax.shard_map(lambda h, k, t, w, *s: (lambda pt, o: (tuple(None if v is None else v.reshape(t.shape)
                                                                     for v in pt), o))(*local(h, k, t, w, *s)),
                       mesh=mesh, in_specs=(h_spec, k_spec, tok, tok, P(), P(), P()),
                       out_specs=(out_tok, P(rows_spec)), check_vma=False)
    per_token, obj = fn(hidden, kernel, targets, weights, *scalars)
    return per_token, jnp.sum(obj)


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
