"""DAPO's dynamic sampling and soft overlong penalty for the RL objectives (lm/objectives/_rl.py).

Dynamic sampling (rl.dynamic_sampling): a group whose G rewards are all equal has advantage 0 and
carries no policy gradient; DAPO drops such groups and samples more until the batch is full. Here
the step's own prompts are sampled again with fresh keys (DAPO draws new prompts), at most
rl.dynamic_sampling_max_rounds more rollouts; the dropped groups are counted
(rl/dynamic_dropped_groups) and any still missing are kept with weight 0 (rl/dynamic_unfilled_groups).
Rule rewards only (they are known on the host before scoring), one process.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lm import losses


def overlong(rc: Any, lengths) -> jax.Array:
    """DAPO's soft overlong penalty of each completion [B] (0 with rl.overlong_cache = 0)."""
    if not rc.overlong_cache:
        return jnp.zeros(jnp.shape(lengths), jnp.float32)
    return losses.overlong_penalty(lengths, rc.max_new_tokens, rc.overlong_cache)


def refill(rollouts: Any, params: Any, prompts: dict, key: jax.Array, seq: dict, out: dict):
    """DAPO's dynamic sampling: groups whose G rewards (overlong penalty included) are all equal
    carry no gradient; they are dropped and counted, and the step's prompts are sampled again
    (fresh keys, up to rl.dynamic_sampling_max_rounds more rollouts) until the batch holds
    only mixed groups. Groups still missing then are the last dropped ones with valid = 0
    (masked out of the loss, counted in rl/dynamic_unfilled_groups).
    → (seq, out, rewards, valid, metrics) of the refilled batch, rows group-major."""
    from lm.objectives import _rl

    rc = rollouts.config.rl
    n_groups = out["tokens"].shape[0] // rollouts.group
    kept: list[tuple] = []
    dropped_total, rounds, last_dropped = 0, 0, []
    host_metrics: dict = {}
    for r in range(rc.dynamic_sampling_max_rounds + 1):
        if r:
            seq, out = rollouts.sample(params, prompts, jax.random.fold_in(key, r))
        values, valid, host_metrics = rollouts.host_rewards(prompts, out)
        rounds += 1
        scored = values + np.asarray(overlong(rc, _rl.to_host(out["lengths"])))
        equal = np.asarray(losses.equal_reward_groups(scored, rollouts.group))
        seq_h = {k: _rl.to_host(v) for k, v in seq.items()}
        out_h = {k: _rl.to_host(v) for k, v in out.items()}
        for g in range(n_groups):
            rows = slice(g * rollouts.group, (g + 1) * rollouts.group)
            piece = ({k: v[rows] for k, v in seq_h.items()}, {k: v[rows] for k, v in out_h.items()},
                     values[rows], valid[rows])
            (last_dropped if equal[g] else kept).append(piece)
        dropped_total += int(equal.sum())
        if len(kept) >= n_groups:
            break
    unfilled = max(n_groups - len(kept), 0)
    pieces = kept[:n_groups] + [(s_, o_, v_, np.zeros_like(m_)) for s_, o_, v_, m_ in last_dropped[-unfilled:]][:unfilled]
    cat = lambda i: {k: np.concatenate([p[i][k] for p in pieces]) for k in pieces[0][i]}  # noqa: E731
    rows = lambda tree: jax.tree.map(lambda v: jax.device_put(v, rollouts.rows), tree)  # noqa: E731
    values = np.concatenate([p[2] for p in pieces]).astype(np.float32)
    valid = np.concatenate([p[3] for p in pieces]).astype(np.float32)
    metrics = {**host_metrics, "rl/dynamic_dropped_groups": float(dropped_total),
               "rl/dynamic_rounds": float(rounds), "rl/dynamic_unfilled_groups": float(unfilled)}
    return rows(cat(0)), rows(cat(1)), rollouts.put(values), rollouts.put(valid), metrics
