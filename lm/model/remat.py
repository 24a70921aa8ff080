"""Rematerialization policies: what a block keeps from its forward pass for the backward pass.

`model.remat` names one (each a `jax.checkpoint_policies` policy applied to every block):

  none           no checkpoint: autodiff keeps every residual it needs (most memory, no recompute)
  full           keep only each block's input; the backward pass recomputes the whole block
  save_qkv_proj  also keep the q, k, v projections (tagged 'qkv_proj' in lm/model/attention.py):
                 the backward pass skips recomputing those three products
  save_out_proj  also keep the attention output projection (tagged 'out_proj'): q, k, v and the
                 attention block's output are not recomputed
  save_dots      keep every weight product's output (dots without batch dimensions): only the
                 elementwise work, norms and attention are recomputed
  offload        like save_out_proj, but the saved names go to host memory (pinned_host) and come
                 back for the backward pass: TPU/GPU HBM holds only each block's input

True and False (also as the strings 'true'/'false') mean 'full' and 'none'.
"""

from __future__ import annotations

import jax

POLICIES = ("none", "full", "save_qkv_proj", "save_out_proj", "save_dots", "offload")
_ALIASES = {True: "full", False: "none", "true": "full", "false": "none"}

QKV = "qkv_proj"  # the checkpoint_name tags the block sets (attention.py)
OUT = "out_proj"


def canonical(remat: bool | str) -> str:
    """A `model.remat` value → one of POLICIES; ValueError names the choices."""
    key = remat.strip().lower() if isinstance(remat, str) else remat
    name = _ALIASES.get(key, key)
    if name not in POLICIES:
        raise ValueError(f"model.remat={remat!r}: expected one of {', '.join(POLICIES)} (or True/False)")
    return name


def policy(remat: bool | str):
    """The `jax.checkpoint` policy of `remat`, or None for 'none' (no checkpoint at all)."""
    name = canonical(remat)
    cp = jax.checkpoint_policies
    if name == "none":
        return None
    if name == "full":
        return cp.nothing_saveable
    if name == "save_qkv_proj":
        return cp.save_only_these_names(QKV)
    if name == "save_out_proj":
        return cp.save_only_these_names(QKV, OUT)
    if name == "save_dots":
        return cp.dots_with_no_batch_dims_saveable
    return cp.save_and_offload_only_these_names(names_which_can_be_saved=(), names_which_can_be_offloaded=(QKV, OUT),
                                                offload_src="device", offload_dst="pinned_host")
