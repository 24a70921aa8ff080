"""Flash attention in plain XLA: causal within packed segments, online softmax over key blocks,
with its own backward pass. Memory O(T·block) where dense attention needs O(T²).

The T positions are cut into nb blocks of c (padded with segment 0). Forward, for each query
block i, the key blocks j = 0..i (the later ones are all masked) in a loop, keeping per query row
the running maximum m, the normalizer l and the unnormalized output acc:

    s = q_i k_jᵀ (float32),  m' = max(m, max_s s),  p = [mask] exp(s − m'),
    l ← e^{m − m'} l + Σ_s p,  acc ← e^{m − m'} acc + p v_j,  m ← m'

then out_i = acc / l and the log-normalizer lse_i = m + log l. Only q, k, v, out and lse are kept
for the backward pass, which recomputes each block's probabilities p = [mask] exp(s − lse) and,
for each key block j and query blocks i ≥ j (with Δ = Σ_d dout · out per query row):

    dv_j += pᵀ dout_i,  ds = p ⊙ (dout_i v_jᵀ − Δ_i),  dk_j += dsᵀ q_i,  dq_i += ds k_j.

A query with no key to attend to (padding, segment 0) gets output 0 and zero gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array
_F32 = jnp.float32
_NEG = jnp.finfo(jnp.float32).min / 2  # a masked score: finite, below every real one


def blockwise_attention(q: Array, k: Array, v: Array, segment_ids: Array, block: int) -> Array:
    """q [B, T, H, hd] (pre-scaled), k, v [B, T, K, hd], segment_ids [B, T] → [B, T, H, hd]
    (lm/model/attention_ops.py has the contract). `block`: positions per query and key block; T
    is padded to a multiple of it (T ≤ block: one block of T)."""
    b, t, h, hd = q.shape
    kv = k.shape[2]
    c = t if t <= block else block
    extra = -t % c
    if extra:
        pad = lambda x: jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
        q, k, v, segment_ids = pad(q), pad(k), pad(v), pad(segment_ids)
    tp = t + extra
    qg = q.reshape(b, tp, kv, h // kv, hd).transpose(0, 2, 1, 3, 4)  # [B, K, T, G, hd]
    out = _flash(qg, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), segment_ids.astype(jnp.int32), c)
    return out.transpose(0, 2, 1, 3, 4).reshape(b, tp, h, hd)[:, :t]


def _block(x: Array, i, c: int, axis: int) -> Array:
    return jax.lax.dynamic_slice_in_dim(x, i * c, c, axis=axis)


def _mask(seg: Array, i, j, c: int) -> Array:
    """[B, 1, c, 1, c] bool: query block i may attend to key block j (causal, same segment, not
    padding)."""
    qs, ks = _block(seg, i, c, 1), _block(seg, j, c, 1)
    causal = (j * c + jnp.arange(c))[None, :] <= (i * c + jnp.arange(c))[:, None]
    mask = causal[None] & (qs[:, :, None] == ks[:, None, :]) & (qs[:, :, None] != 0)
    return mask[:, None, :, None, :]


def _forward(q, k, v, seg, c):
    """q [B, K, T, G, hd], k, v [B, K, T, hd], seg [B, T] → (out like q, lse [B, K, T, G] f32)."""
    nb = q.shape[2] // c
    stats_shape = q.shape[:2] + (c,) + q.shape[3:4]

    def query_block(i, carry):
        out, lse = carry
        qi = _block(q, i, c, 2)

        def key_block(j, state):
            m, l, acc = state
            kj, vj = _block(k, j, c, 2), _block(v, j, c, 2)
            mask = _mask(seg, i, j, c)
            s = jnp.where(mask, jnp.einsum("bktgd,bksd->bktgs", qi, kj, preferred_element_type=_F32), _NEG)
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            alpha = jnp.exp(m - m_new)
            acc = alpha[..., None] * acc + jnp.einsum("bktgs,bksd->bktgd", p.astype(v.dtype), vj,
                                                      preferred_element_type=_F32)
            return m_new, alpha * l + p.sum(axis=-1), acc

        init = (jnp.full(stats_shape, _NEG, _F32), jnp.zeros(stats_shape, _F32),
                jnp.zeros(stats_shape + q.shape[-1:], _F32))
        m, l, acc = jax.lax.fori_loop(0, i + 1, key_block, init)
        seen = l > 0
        out_i = (acc / jnp.where(seen, l, 1.0)[..., None]).astype(q.dtype)
        lse_i = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        return (jax.lax.dynamic_update_slice_in_dim(out, out_i, i * c, axis=2),
                jax.lax.dynamic_update_slice_in_dim(lse, lse_i, i * c, axis=2))

    init = (jnp.zeros_like(q), jnp.zeros(q.shape[:4], _F32))
    return jax.lax.fori_loop(0, nb, query_block, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, seg, c):
    return _forward(q, k, v, seg, c)[0]


def _flash_fwd(q, k, v, seg, c):
    out, lse = _forward(q, k, v, seg, c)
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(c, saved, dout):
    q, k, v, seg, out, lse = saved
    nb = q.shape[2] // c
    delta = jnp.sum(dout.astype(_F32) * out.astype(_F32), axis=-1)  # [B, K, T, G]

    def key_block(j, carry):
        dq, dk, dv = carry
        kj, vj = _block(k, j, c, 2), _block(v, j, c, 2)

        def query_block(i, state):
            dk_j, dv_j, dq = state
            qi, doi = _block(q, i, c, 2), _block(dout, i, c, 2)
            mask = _mask(seg, i, j, c)
            s = jnp.einsum("bktgd,bksd->bktgs", qi, kj, preferred_element_type=_F32)
            p = jnp.where(mask, jnp.exp(s - _block(lse, i, c, 2)[..., None]), 0.0)
            dv_j = dv_j + jnp.einsum("bktgs,bktgd->bksd", p.astype(doi.dtype), doi, preferred_element_type=_F32)
            dp = jnp.einsum("bktgd,bksd->bktgs", doi, vj, preferred_element_type=_F32)
            ds = p * (dp - _block(delta, i, c, 2)[..., None])
            dk_j = dk_j + jnp.einsum("bktgs,bktgd->bksd", ds.astype(qi.dtype), qi, preferred_element_type=_F32)
            dq_i = _block(dq, i, c, 2) + jnp.einsum("bktgs,bksd->bktgd", ds.astype(kj.dtype), kj,
                                                    preferred_element_type=_F32)
            return dk_j, dv_j, jax.lax.dynamic_update_slice_in_dim(dq, dq_i, i * c, axis=2)

        zeros = jnp.zeros(kj.shape, _F32)
        dk_j, dv_j, dq = jax.lax.fori_loop(j, nb, query_block, (zeros, zeros, dq))
        return (dq, jax.lax.dynamic_update_slice_in_dim(dk, dk_j, j * c, axis=2),
                jax.lax.dynamic_update_slice_in_dim(dv, dv_j, j * c, axis=2))

    init = (jnp.zeros(q.shape, _F32), jnp.zeros(k.shape, _F32), jnp.zeros(v.shape, _F32))
    dq, dk, dv = jax.lax.fori_loop(0, nb, key_block, init)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)
