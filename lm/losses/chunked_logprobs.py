"""The chunked, one-device core of lm.losses.token_logprobs: per-token statistics of
``softmax(h @ W / T)`` over token chunks and vocabulary blocks, with its own VJP.

The statistics (lse, logprob, entropy, mean_x, correct) are defined in lm/losses/token_logprobs.py's
docstring.

Only ``[chunk, vocab_chunk]`` logits exist at any time, forward or backward: the statistics are
merged across vocabulary blocks online (running max, rescaled sums), and the backward pass
(custom VJP) recomputes each block's logits. For output cotangents ``g_lp, g_lse, g_H, g_mx`` the
gradient with respect to x is, per token::

    dL/dx_v = q_v (g_lse − g_lp − g_H·H) + [v = y] g_lp + g_mx / V − g_H q_v (x_v − lse)

so ``dlogits = dL/dx / T``, ``dh = dlogits Wᵀ`` and ``dW = h dlogitsᵀ``, block by block.

The entry points (checks, sharding, the public API) are lm/losses/sharded_logprobs.py and
lm/losses/token_logprobs.py.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lm.losses.sums import F32

_DK_BLOCK_ELEMS = 8 * 2**20  # kernel-gradient update block: [D, 8Mi/D] f32 = 32 MiB
_BIG = jnp.iinfo(jnp.int32).max


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
