"""How lm.losses.token_logprobs runs: the inputs checked and cast to one compute dtype, the
tokens flattened and padded to whole chunks, and, on a mesh, the chunked core
(lm/losses/chunked_logprobs.py) run per device inside ``shard_map``.

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
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lm.losses.chunked_logprobs import _core, _Static
from lm.losses.sums import F32

_CHUNK_BYTES = 64 * 2**20  # auto token chunk: about this many bytes of f32 logits per chunk


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
