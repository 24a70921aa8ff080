"""The train and eval steps: pure functions of the state, the frozen parameters and a batch.

The trainer knows no objective by name. An objective is a function

    loss_fn(params, batch, rng, frozen) -> (objective_sum, sums)

(`frozen`: the frozen models' parameters by name, lm/train/state.py; `batch`: any pytree of
[B, ...] arrays, lm/data/batch.py; `rng`: a key in a train step, None in an eval step, where
nothing may be random: LoRA's adapter dropout is on only with a key) where `objective_sum` is the differentiated scalar, a *sum* over the batch's scored
tokens, and `sums` is a dict of scalar sums that must include `count` (the weight
total) and may include `nll_sum`, `correct_sum`, `z_loss_sum`. The step adds
(sum, count) over micro-batches and divides once, so k micro-batches give exactly
the gradient of the whole batch, whatever their mask counts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lm.parallel import sharding as shd
from lm.evals.loss import summary_metrics
from lm.losses import mean_of
from lm.train.state import Setup, TrainState

LossFn = Callable[[Any, dict, jax.Array, dict], tuple[jax.Array, dict]]


def split_micro_batches(batch: dict, k: int) -> dict:
    """[B, ...] → [k, B/k, ...], micro-batch i = rows i, i+k, i+2k, … so each device's rows
    are spread over all micro-batches (no resharding, balanced work)."""
    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {k} micro-batches")
        return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def advance_counts(opt_state):
    """Every step counter in an optax state (the `count` fields) plus one, the rest as it is."""
    def bump(path, leaf):
        name = getattr(path[-1], "name", None) if path else None
        return leaf + 1 if name == "count" else leaf
    return jax.tree_util.tree_map_with_path(bump, opt_state)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    micro_batches: int = 1) -> Callable[..., tuple[TrainState, dict]]:
    """train_step(state, batch, frozen=None) -> (state, metrics): pure; jit it with `jit_train_step`.
    `frozen` (the frozen models' parameters by name) reaches the loss and gets no gradient.

    A step whose loss or gradient norm is not finite leaves params and optimizer moments as
    they were, counts itself in `bad_steps` and reports `skipped = 1`; its step number is spent
    all the same: `state.step` and every optimizer `count` (Adam's, the schedule's) advance
    together, so the logged step, the learning-rate schedule and the optimizer agree after it.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: dict, frozen: dict | None = None) -> tuple[TrainState, dict]:
        frozen = {} if frozen is None else jax.lax.stop_gradient(frozen)
        key = jax.random.wrap_key_data(state.rng)
        key, step_key = jax.random.split(key)
        micro = split_micro_batches(batch, micro_batches) if micro_batches > 1 else None

        def accumulate(carry, xs):
            grads, sums = carry
            mb, i = xs
            (obj, mb_sums), g = grad_fn(state.params, mb, jax.random.fold_in(step_key, i), frozen)
            mb_sums = dict(mb_sums, objective_sum=obj)
            return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, mb_sums)), None

        if micro_batches == 1:  # no accumulator to zero-fill and add into
            (obj, sums), grad_sum = grad_fn(state.params, batch, jax.random.fold_in(step_key, 0), frozen)
            sums = dict(sums, objective_sum=obj)
        else:
            zero_grads = jax.tree.map(jnp.zeros_like, state.params)
            sums_shape = jax.eval_shape(lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro), step_key,
                                                         frozen))
            zero_sums = dict(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape[0][1]),
                             objective_sum=jnp.zeros((), jnp.float32))
            (grad_sum, sums), _ = jax.lax.scan(accumulate, (zero_grads, zero_sums),
                                               (micro, jnp.arange(micro_batches)))
        count = sums["count"]
        grads = jax.tree.map(lambda g: mean_of(g, count), grad_sum)
        loss = mean_of(sums["objective_sum"], count)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(params, opt_state):
            updates, new_opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_opt_state

        # A cond, not a select of new against old: with a select XLA keeps the old state alive
        # beside the new one and copies every optimizer moment first (2 × 4 bytes per parameter
        # read and written each step; the bench model's step was 2.7% slower, benchmarks/README.md).
        new_params, new_opt_state = jax.lax.cond(finite, update, lambda p, o: (p, advance_counts(o)),
                                                 state.params, state.opt_state)
        new_state = TrainState(
            step=state.step + 1,
            params=new_params,
            opt_state=new_opt_state,
            rng=jax.random.key_data(key),
            bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step),
            "tokens": count,
            "skipped": (~finite).astype(jnp.int32),
            "bad_steps": new_state.bad_steps,
        }
        metrics.update(summary_metrics(sums))
        return new_state, metrics

    return train_step


def frozen_args(setup: Setup, frozen: dict | None) -> tuple:
    """The trailing arguments of a jitted step: (frozen,) when the setup has frozen models, else ()."""
    if not setup.frozen_graphdefs:
        return ()
    if frozen is None or set(frozen) != set(setup.frozen_graphdefs):
        raise ValueError(f"the step needs the frozen models {sorted(setup.frozen_graphdefs)}, got "
                         f"{None if frozen is None else sorted(frozen)}")
    return (frozen,)


def jit_train_step(train_step, setup: Setup):
    """Jit with the state's shardings in and out, batch split over (data, fsdp), state donated.
    Called as step(state, batch, *frozen_args(setup, frozen)): the frozen parameters are an
    argument (sharded by their logical axes, never donated) only when the setup has frozen models."""
    batch_sh = shd.batch_sharding(setup.mesh)
    in_sh = (setup.state_shardings, batch_sh) + ((setup.frozen_shardings,) if setup.frozen_graphdefs else ())
    return jax.jit(setup.with_activation_hints(train_step), in_shardings=in_sh,
                   out_shardings=(setup.state_shardings, shd.replicated(setup.mesh)), donate_argnums=0)


def make_eval_step(loss_fn: LossFn, setup: Setup):
    """eval_step(params, batch, *frozen_args) -> sums (jitted); add the sums over batches, then divide
    once (`summary_metrics`, `evaluate`)."""
    def eval_step(params, batch, frozen=None):
        obj, sums = loss_fn(params, batch, None, {} if frozen is None else frozen)  # no key: deterministic
        return dict(sums, objective_sum=obj)

    in_sh = ((setup.state_shardings.params, shd.batch_sharding(setup.mesh))
             + ((setup.frozen_shardings,) if setup.frozen_graphdefs else ()))
    return jax.jit(setup.with_activation_hints(eval_step), in_shardings=in_sh, out_shardings=shd.replicated(setup.mesh))


def global_batch(local_batch: dict, mesh) -> dict:
    """This process's rows (a batch pytree of numpy [B_local, ...], lm/data/batch.py) → global
    jax.Arrays [B, ...] sharded over (data, fsdp) by their first axis ([B] leaves too)."""
    sharding = shd.batch_sharding(mesh)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.spec[0]))  # a [B] leaf
    n = shd.batch_shard(mesh)[1]  # processes that share rows (a tensor axis across hosts) count once
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding if v.ndim > 1 else rows, v,
                                                                         (v.shape[0] * n, *v.shape[1:])),
                        local_batch)
