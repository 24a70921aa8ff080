"""The generic trainer: train state, the jitted train and eval steps, and the loop.

It knows no objective by name. An objective is a function

    loss_fn(params, batch, rng) -> (objective_sum, sums)

where `objective_sum` is the differentiated scalar, a *sum* over the batch's scored
tokens, and `sums` is a dict of scalar sums that must include `count` (the weight
total) and may include `nll_sum`, `correct_sum`, `z_loss_sum`. The step adds
(sum, count) over micro-batches and divides once, so k micro-batches give exactly
the gradient of the whole batch, whatever their mask counts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lm.parallel import sharding as shd
from lm.losses import mean_of
from lm.model import ModelConfig, Transformer, activation_sharding

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


class TrainState(NamedTuple):
    """Everything a step changes. A plain pytree: jit, donate and checkpoint it as is."""

    step: jax.Array  # [] int32, optimizer steps taken
    params: Any  # nested dict of float32 arrays (nnx.to_pure_dict of the model's Params)
    opt_state: Any  # optax state
    rng: jax.Array  # [2] uint32 raw key data; split once per step
    bad_steps: jax.Array  # [] int32, consecutive non-finite steps skipped so far


@dataclasses.dataclass
class Setup:
    """What `create_state` builds besides the state: the pieces later steps need."""

    graphdef: Any  # nnx GraphDef of the Transformer
    mesh: jax.sharding.Mesh
    state_shardings: TrainState
    abstract_state: TrainState
    rules: dict  # logical axis → mesh axis (config.mesh.rules), also used for activation hints

    def with_activation_hints(self, fn: Callable) -> Callable:
        """`fn` traced with this mesh's activation sharding hints (lm.model.constrain)."""
        hint = shd.activation_constraint(self.mesh, self.rules)

        def traced(*args):
            with activation_sharding(hint):
                return fn(*args)

        return traced


def _init_fn(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, seed: int):
    def init() -> TrainState:
        _, params = nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(seed)))
        params = nnx.to_pure_dict(params)
        rng = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), rng,
                          jnp.zeros((), jnp.int32))

    return init


def plan_state(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh, rules,
               seed: int = 0) -> Setup:
    """Shapes and shardings of the train state, without allocating it (works for any size)."""
    abstract_model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(seed)))
    graphdef, abstract_params = nnx.split(abstract_model)
    axes = shd.logical_axes_tree(abstract_params)
    abstract_state = jax.eval_shape(_init_fn(model_cfg, optimizer, seed))
    param_sh = shd.param_shardings(axes, abstract_state.params, rules, mesh)
    repl = shd.replicated(mesh)
    opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, abstract_state.opt_state, param_sh,
                                   transform_non_params=lambda _: repl)
    return Setup(graphdef, mesh, TrainState(repl, param_sh, opt_sh, repl, repl), abstract_state, dict(rules))


def create_state(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh, rules,
                 seed: int) -> tuple[TrainState, Setup]:
    """Initialize the train state directly in its sharded layout (no full copy on one device)."""
    setup = plan_state(model_cfg, optimizer, mesh, rules, seed)
    return init_state(model_cfg, optimizer, setup, seed), setup


def init_state(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, setup: Setup,
               seed: int) -> TrainState:
    """The initial state of `setup` (from `plan_state`), created directly in its sharded layout."""
    return jax.jit(_init_fn(model_cfg, optimizer, seed), out_shardings=setup.state_shardings)()


def split_micro_batches(batch: dict, k: int) -> dict:
    """[B, ...] → [k, B/k, ...], micro-batch i = rows i, i+k, i+2k, … so each device's rows
    are spread over all micro-batches (no resharding, balanced work)."""
    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {k} micro-batches")
        return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    micro_batches: int = 1) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """train_step(state, batch) -> (state, metrics): pure; jit it with `jit_train_step`.

    A step whose loss or gradient norm is not finite leaves params and optimizer state as
    they were, counts itself in `bad_steps` and reports `skipped = 1`.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.wrap_key_data(state.rng)
        key, step_key = jax.random.split(key)
        micro = split_micro_batches(batch, micro_batches) if micro_batches > 1 else None

        def accumulate(carry, xs):
            grads, sums = carry
            mb, i = xs
            (obj, mb_sums), g = grad_fn(state.params, mb, jax.random.fold_in(step_key, i))
            mb_sums = dict(mb_sums, objective_sum=obj)
            return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, mb_sums)), None

        if micro_batches == 1:  # no accumulator to zero-fill and add into
            (obj, sums), grad_sum = grad_fn(state.params, batch, jax.random.fold_in(step_key, 0))
            sums = dict(sums, objective_sum=obj)
        else:
            zero_grads = jax.tree.map(jnp.zeros_like, state.params)
            sums_shape = jax.eval_shape(lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro), step_key))
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
        new_params, new_opt_state = jax.lax.cond(finite, update, lambda p, o: (p, o), state.params,
                                                 state.opt_state)
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


def summary_metrics(sums: dict) -> dict:
    """Means from sums: nll (→ perplexity), token accuracy, z-loss; each 0 when count is 0."""
    count = sums["count"]
    out = {}
    if "nll_sum" in sums:
        out["nll"] = mean_of(sums["nll_sum"], count)
        out["perplexity"] = jnp.exp(out["nll"])
    if "correct_sum" in sums:
        out["accuracy"] = mean_of(sums["correct_sum"], count)
    if "z_loss_sum" in sums:
        out["z_loss"] = mean_of(sums["z_loss_sum"], count)
    return out


def jit_train_step(train_step, setup: Setup):
    """Jit with the state's shardings in and out, batch split over (data, fsdp), state donated."""
    batch_sh = shd.batch_sharding(setup.mesh)
    return jax.jit(setup.with_activation_hints(train_step), in_shardings=(setup.state_shardings, batch_sh),
                   out_shardings=(setup.state_shardings, shd.replicated(setup.mesh)), donate_argnums=0)


def make_eval_step(loss_fn: LossFn, setup: Setup):
    """eval_step(params, batch) -> sums (jitted); add the sums over batches, then `summary_metrics`."""
    def eval_step(params, batch):
        obj, sums = loss_fn(params, batch, jax.random.key(0))
        return dict(sums, objective_sum=obj)

    return jax.jit(setup.with_activation_hints(eval_step), in_shardings=(setup.state_shardings.params, shd.batch_sharding(setup.mesh)),
                   out_shardings=shd.replicated(setup.mesh))


def evaluate(eval_step, params, batches) -> dict[str, float]:
    """Run `eval_step` over an iterable of global batches; sums added, then means taken once."""
    total = None
    for batch in batches:
        sums = eval_step(params, batch)
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    if total is None:
        raise ValueError("evaluation got no batches")
    out = {k: float(v) for k, v in summary_metrics(total).items()}
    out["loss"] = float(mean_of(total["objective_sum"], total["count"]))
    out["tokens"] = float(total["count"])
    return out


def global_batch(local_batch: dict, mesh) -> dict:
    """This process's rows (numpy [B_local, T]) → global jax.Arrays [B, T] sharded over (data, fsdp)."""
    sharding = shd.batch_sharding(mesh)
    n = shd.batch_shard(mesh)[1]  # processes that share rows (a tensor axis across hosts) count once
    return {k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * n, *v.shape[1:]))
            for k, v in local_batch.items()}
