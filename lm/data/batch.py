"""The batch contract, defined once: its fields, dtypes and shapes (DESIGN.md).

A **token batch** is a dict of [B, T] arrays:

    inputs       int32    token ids the model reads
    targets      int32    the token after each input (already shifted)
    loss_mask    float32  weight of each target's loss; 0 = not scored
    segment_ids  int32    one id per packed document; 0 = padding
    positions    int32    position within the document, restarting at 0 in each

A token batch may also carry `ref_logprobs` (float32 [B, T]): log π_ref(targets[t] | inputs ≤ t)
of a known reference policy, computed by the data (kind "preference_ref": DPO against the true
data distribution of a synthetic benchmark instead of a frozen model).

A **preference batch** is a pair of token batches with the same [B, T]: row b of `chosen` and
row b of `rejected` are two answers to the same prompt, the first preferred. Both are pytrees:
micro-batching, sharding and the memory check map over their leaves, so a kind of batch is only
its structure (`spec`). Data pipelines, the memory planner and `lm.train.global_batch` all read
the fields from here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FIELDS: dict[str, Any] = {"inputs": np.int32, "targets": np.int32, "loss_mask": np.float32,
                          "segment_ids": np.int32, "positions": np.int32}
KEYS = tuple(FIELDS)
REFERENCE_FIELD = {"ref_logprobs": np.float32}  # optional: precomputed reference log-probabilities
PAIR = ("chosen", "rejected")
KINDS = ("tokens", "preference", "preference_ref")


def spec(kind, batch_size: int, seq_len: int, make=None) -> dict:
    """The batch of `kind` as `make(shape, dtype)` leaves (default: numpy zeros of that shape).
    `make=jax.ShapeDtypeStruct` (with a sharding bound) gives an abstract batch. `kind` may also
    be a function `(batch_size, seq_len, make) -> pytree` (an objective's own batch, e.g. a
    rollout with its log-probabilities and advantages)."""
    make = make or (lambda shape, dtype: np.zeros(shape, dtype))
    if callable(kind):
        return kind(batch_size, seq_len, make)
    def tokens(fields=FIELDS):
        return {key: make((batch_size, seq_len), dtype) for key, dtype in fields.items()}

    if kind == "tokens":
        return tokens()
    if kind == "preference":
        return {side: tokens() for side in PAIR}
    if kind == "preference_ref":
        return {side: tokens({**FIELDS, **REFERENCE_FIELD}) for side in PAIR}
    raise ValueError(f"batch kind must be one of {KINDS}, got {kind!r}")


def check(batch: dict, kind: str, where: str = "batch") -> None:
    """Raise ValueError naming the field, if `batch` does not follow the contract of `kind`."""
    if kind in ("preference", "preference_ref"):
        if not isinstance(batch, dict) or set(batch) != set(PAIR):
            raise ValueError(f"{where}: a preference batch has exactly the keys {PAIR}, got "
                             f"{sorted(batch) if isinstance(batch, dict) else type(batch).__name__}")
        for side in PAIR:
            check(batch[side], "tokens_ref" if kind == "preference_ref" else "tokens", f"{where}[{side!r}]")
        if batch["chosen"]["inputs"].shape != batch["rejected"]["inputs"].shape:
            raise ValueError(f"{where}: chosen {batch['chosen']['inputs'].shape} and rejected "
                             f"{batch['rejected']['inputs'].shape} must have the same [B, T]")
        return
    if kind not in ("tokens", "tokens_ref"):
        raise ValueError(f"batch kind must be one of {KINDS}, got {kind!r}")
    fields = {**FIELDS, **REFERENCE_FIELD} if kind == "tokens_ref" else FIELDS
    missing, extra = set(fields) - set(batch), set(batch) - set(fields)
    if missing or extra:
        raise ValueError(f"{where}: missing fields {sorted(missing)}, unknown fields {sorted(extra)} "
                         f"(the contract: {KEYS})")
    shape = batch["inputs"].shape
    for key, dtype in fields.items():
        value = batch[key]
        if value.shape != shape or len(shape) != 2:
            raise ValueError(f"{where}[{key!r}] has shape {value.shape}; every field is [B, T] = {shape}")
        if np.dtype(value.dtype) != np.dtype(dtype):
            raise ValueError(f"{where}[{key!r}] has dtype {value.dtype}, the contract says {np.dtype(dtype).name}")
