"""The train state, and what the trainer plans before any array exists: the model (from a factory),
the frozen models the loss reads, their shapes and their shardings on the mesh.

**Model factory.** `make_model(rngs) -> nnx.Module` builds what is trained: a Transformer (give
a ModelConfig), a RewardModel, a policy with a value head (lm/model/heads.py), or any module
whose parameters carry logical axes.

**Frozen models.** `frozen = {name: make_model}`: models the loss reads but never trains (the
reference policy of DPO and RL, a reward model). Their parameters are passed to the loss as
`frozen[name]`, sharded like trained parameters by their logical axes, never updated, never
donated, and not in the optimizer state or the train state (a checkpoint holds only what
training changes; a resumed run loads its frozen models again from where they came from).
They are held in the model's compute dtype (`ModelConfig.dtype`, e.g. bfloat16: half the
memory of float32 and no per-step cast; `Setup.abstract_frozen` says so): they are only ever
read in the compute dtype, and checkpoints keep float32 (lm/train/init.py casts after reading).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lm.model import ModelConfig, Transformer, activation_sharding
from lm.parallel import sharding as shd

ModelFactory = Callable[[nnx.Rngs], nnx.Module]


@dataclasses.dataclass(frozen=True)
class FrozenModel:
    """A model the loss reads but never trains: how to build it, and the run (or checkpoint) its
    parameters come from (None: freshly initialized, for tests)."""

    make_model: ModelFactory
    path: str | None = None


class TrainState(NamedTuple):
    """Everything a step changes. A plain pytree: jit, donate and checkpoint it as is."""

    step: jax.Array  # [] int32, optimizer steps taken
    params: Any  # nested dict of float32 arrays (nnx.to_pure_dict of the model's Params)
    opt_state: Any  # optax state
    rng: jax.Array  # [2] uint32 raw key data; split once per step
    bad_steps: jax.Array  # [] int32, consecutive non-finite steps skipped so far


@dataclasses.dataclass
class Setup:
    """What `plan_state` builds besides the state: the pieces later steps need."""

    graphdef: Any  # nnx GraphDef of the trained model
    mesh: jax.sharding.Mesh
    state_shardings: TrainState
    abstract_state: TrainState
    rules: dict  # logical axis → mesh axis (config.mesh.rules), also used for activation hints
    make_model: ModelFactory = None
    frozen_graphdefs: dict = dataclasses.field(default_factory=dict)  # name → GraphDef
    frozen_shardings: dict = dataclasses.field(default_factory=dict)  # name → params' shardings
    abstract_frozen: dict = dataclasses.field(default_factory=dict)  # name → params' ShapeDtypeStructs
    frozen_factories: dict = dataclasses.field(default_factory=dict)  # name → ModelFactory

    def with_activation_hints(self, fn: Callable) -> Callable:
        """`fn` traced with this mesh's activation sharding hints (lm.model.constrain)."""
        hint = shd.activation_constraint(self.mesh, self.rules)

        def traced(*args):
            with activation_sharding(hint):
                return fn(*args)

        return traced


def as_factory(model: ModelConfig | ModelFactory) -> ModelFactory:
    """A ModelConfig means a Transformer of that config; a callable is a factory already."""
    if isinstance(model, ModelConfig):
        return lambda rngs: Transformer(model, rngs=rngs)
    if not callable(model):
        raise TypeError(f"model must be a ModelConfig or a factory rngs -> nnx.Module, got {type(model).__name__}")
    return model


def _init_params(make_model: ModelFactory, seed: int) -> Any:
    return nnx.to_pure_dict(nnx.split(make_model(nnx.Rngs(seed)))[1])


def _plan_params(make_model: ModelFactory, mesh, rules, seed: int, frozen: bool = False):
    """(graphdef, abstract params, their shardings) of the model `make_model` builds; frozen: its
    floating parameters in the model's compute dtype (`compute_dtype_of`)."""
    module = nnx.eval_shape(lambda: make_model(nnx.Rngs(seed)))
    graphdef, abstract = nnx.split(module)
    abstract_params = nnx.to_pure_dict(abstract)
    shardings = shd.param_shardings(shd.logical_axes_tree(abstract), abstract_params, rules, mesh)
    if frozen:
        abstract_params = in_dtype(abstract_params, compute_dtype_of(module))
    return graphdef, abstract_params, shardings


def compute_dtype_of(module: nnx.Module):
    """The dtype a model computes in (its ModelConfig's), or None when it does not say."""
    cfg = getattr(module, "cfg", None)
    return getattr(cfg, "compute_dtype", None)


def in_dtype(tree: Any, dtype) -> Any:
    """Floating arrays (or ShapeDtypeStructs) of `tree` as `dtype` (None: unchanged)."""
    if dtype is None:
        return tree

    def cast(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=getattr(x, "sharding", None))
        return x.astype(dtype)

    return jax.tree.map(cast, tree)


def _init_fn(make_model: ModelFactory, optimizer: optax.GradientTransformation, seed: int):
    def init() -> TrainState:
        params = _init_params(make_model, seed)
        rng = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), rng, jnp.zeros((), jnp.int32))

    return init


def plan_state(model: ModelConfig | ModelFactory, optimizer: optax.GradientTransformation, mesh, rules,
               seed: int = 0, frozen: dict[str, ModelConfig | ModelFactory] | None = None) -> Setup:
    """Shapes and shardings of the train state and the frozen models, without allocating them
    (works for any size)."""
    make_model = as_factory(model)
    graphdef, _, param_sh = _plan_params(make_model, mesh, rules, seed)
    abstract_state = jax.eval_shape(_init_fn(make_model, optimizer, seed))
    repl = shd.replicated(mesh)
    opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, abstract_state.opt_state, param_sh,
                                   transform_non_params=lambda _: repl)
    setup = Setup(graphdef, mesh, TrainState(repl, param_sh, opt_sh, repl, repl), abstract_state, dict(rules),
                  make_model=make_model)
    for name, frozen_model in (frozen or {}).items():
        factory = as_factory(frozen_model)
        setup.frozen_factories[name] = factory
        (setup.frozen_graphdefs[name], setup.abstract_frozen[name],
         setup.frozen_shardings[name]) = _plan_params(factory, mesh, rules, seed, frozen=True)
    return setup


def init_state(model: ModelConfig | ModelFactory, optimizer: optax.GradientTransformation, setup: Setup,
               seed: int) -> TrainState:
    """The initial state of `setup` (from `plan_state`), created directly in its sharded layout."""
    return jax.jit(_init_fn(as_factory(model), optimizer, seed), out_shardings=setup.state_shardings)()


def create_state(model: ModelConfig | ModelFactory, optimizer: optax.GradientTransformation, mesh, rules,
                 seed: int) -> tuple[TrainState, Setup]:
    """Initialize the train state directly in its sharded layout (no full copy on one device)."""
    setup = plan_state(model, optimizer, mesh, rules, seed)
    return init_state(model, optimizer, setup, seed), setup


def init_frozen(setup: Setup, name: str, seed: int) -> Any:
    """Freshly initialized parameters of frozen model `name`, in their sharded layout and the
    compute dtype (tests, and frozen models that are not loaded from a checkpoint)."""
    factory, abstract = setup.frozen_factories[name], setup.abstract_frozen[name]
    cast = lambda params: jax.tree.map(lambda x, a: x.astype(a.dtype), params, abstract)  # noqa: E731
    return jax.jit(lambda: cast(_init_params(factory, seed)), out_shardings=setup.frozen_shardings[name])()
