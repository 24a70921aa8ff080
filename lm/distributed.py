"""Multi-process start-up: `jax.distributed.initialize` from config or environment.

On Cloud TPU, `config.distributed.auto = True` lets JAX find the coordinator itself.
Elsewhere give `coordinator_address`, `num_processes` and `process_id` (config or the
environment variables LM_COORDINATOR_ADDRESS, LM_NUM_PROCESSES, LM_PROCESS_ID).
With none of these set, the run is single-process and nothing is initialized.
"""

from __future__ import annotations

import os
from typing import Any

import jax


def maybe_initialize(config: Any) -> bool:
    """Initialize jax.distributed if this run is multi-process. Returns whether it did."""
    dc = config.get("distributed") if hasattr(config, "get") else None
    address = (dc and dc.coordinator_address) or os.environ.get("LM_COORDINATOR_ADDRESS")
    auto = bool(dc and dc.auto)
    if not address and not auto:
        return False
    if auto and not address:
        jax.distributed.initialize()
        return True
    num = (dc and dc.num_processes) or os.environ.get("LM_NUM_PROCESSES")
    pid = dc.process_id if dc and dc.process_id is not None else os.environ.get("LM_PROCESS_ID")
    if num is None or pid is None:
        raise ValueError("distributed: a coordinator address needs num_processes and process_id "
                         "(config.distributed.* or LM_NUM_PROCESSES / LM_PROCESS_ID)")
    timeout = int(dc.heartbeat_timeout_s) if dc else 60
    jax.distributed.initialize(coordinator_address=address, num_processes=int(num), process_id=int(pid),
                               heartbeat_timeout_seconds=timeout)
    return True
