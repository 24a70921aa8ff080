"""Training with low-rank adapters (config.lora, lm/model/lora.py) for every objective, through the
generic trainer's own pieces: what is trained, the frozen models, the loss and the RL batch.

With lora.rank > 0, `adapt` turns a run's pieces into

  - the trained model: the objective's model with adapters; its *parameters* (the train state's
    `params`, the optimizer's state, the checkpoints) are only the adapters (nnx.LoRAParam) and
    any head a plain language model lacks (a reward or value head: `*_head`, not `lm_head`);
  - the frozen model 'lora_base': every other parameter of the same model, held in
    lora.base_dtype (float32, bfloat16, or int8 / NF4 projections, lm/model/quant.py), loaded
    from train.init_from (converted once, on the devices, in its sharded layout) or freshly
    initialized without one. It is an argument of the step, never donated, never saved;
    a checkpoint refers to it through the run's config (train.init_from);
  - the loss: the objective's own, called with base ∪ adapters as its parameters, so gradients
    exist only for the adapters (the step differentiates `params` alone; frozen models get
    stop_gradient), and the optimizer holds moments for them alone;
  - the reference ('reference', DPO and RL): not a second copy of the weights but the same base
    with adapters off (every B zero), built inside the step: its log-probabilities are exactly
    the base model's;
  - adapter dropout (lora.dropout > 0, PEFT's lora_dropout): the loss of a training step runs the
    model's graph with dropout keys (lm/model/lora.py: DropoutKey), drawn from the step's rng; a
    loss called with rng None (the eval step) and every other use (sampling, rollouts, export)
    runs the deterministic graph. With B zero the dropped-out path adds exactly 0, so the
    reference stays the base.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from lm.model import lora
from lm.train.state import FrozenModel, ModelFactory, Setup, as_factory

BASE = "lora_base"  # the frozen model holding the base weights
REFERENCE = "reference"  # the frozen model name DPO and RL read their reference policy from


def trainable(path: tuple, var: Any = None) -> bool:
    """nnx filter: the adapters, and any head a plain language model lacks (reward / value head)."""
    head = str(path[0]).endswith("_head") and str(path[0]) != "lm_head"
    return isinstance(var, nnx.LoRAParam) or lora.is_adapter(path) or head


frozen_part = nnx.Not(trainable)


@dataclasses.dataclass(frozen=True)
class AdaptedFactory:
    """make_model's model with adapters on lora.targets and its base held in lora.base_dtype.
    `params_filter` (lm/train/state.py) selects which of its variables this use holds."""

    make_model: ModelFactory
    lc: Any  # config.lora
    params_filter: Any = trainable
    quantized: bool = True  # False: the base still in float32 (the form a checkpoint holds)
    dropout_keys: bool = False  # True: the training forward's graph (lm/model/lora.py: add_dropout_keys)

    def __call__(self, rngs: nnx.Rngs) -> nnx.Module:
        model = self.make_model(rngs)
        scale = lora.scaling(self.lc.rank, self.lc.alpha, self.lc.rslora)
        lora.add_adapters(model, lora.target_names(self.lc.targets), self.lc.rank, scale, rngs)
        if self.quantized:
            lora.quantize_base(model, self.lc.base_dtype, self.lc.block_size, keep=trainable)
        if self.dropout_keys:
            lora.add_dropout_keys(model, self.lc.dropout)
        return model


def check(lc: Any) -> None:
    if lc.rank < 0:
        raise ValueError(f"lora.rank must be >= 0 (0: off), got {lc.rank}")
    if lc.alpha <= 0:
        raise ValueError(f"lora.alpha must be > 0, got {lc.alpha}")
    if not 0.0 <= lc.dropout < 1.0:
        raise ValueError(f"lora.dropout must be in [0, 1) (the probability of zeroing an adapter input), "
                         f"got {lc.dropout}")
    lora.target_names(lc.targets)


def combine(params: dict, frozen: dict, reference: bool, keys: dict | None = None) -> tuple[dict, dict]:
    """(the adapted model's whole parameter dict: base ∪ trained (∪ dropout `keys`), the other
    frozen models, with 'reference' = the same parameters with adapters off when `reference`)."""
    full = _merge(frozen[BASE], params)
    if keys is not None:
        full = _merge(full, keys)
    rest = {k: v for k, v in frozen.items() if k != BASE}
    if reference:
        rest[REFERENCE] = lora.adapters_off(full)
    return full, rest


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(a[k], v) if isinstance(v, dict) and k in a else v
    return out


def load_base(factory: AdaptedFactory, seed: int, rules: dict) -> Callable:
    """load(path, target) -> the base parameters: the float32 checkpoint's parameters restored in
    their sharded layout, then converted to lora.base_dtype on the devices (one jit)."""
    from lm.io import checkpoint as ckpt
    from lm.parallel import sharding as shd

    plain = dataclasses.replace(factory, quantized=False, params_filter=frozen_part)

    def load(path: str, target: Any) -> Any:
        shardings = jax.tree.map(lambda x: x.sharding, target)
        mesh = jax.tree.leaves(shardings)[0].mesh
        abstract = nnx.eval_shape(lambda: plain(nnx.Rngs(seed)))
        state = nnx.state(abstract, frozen_part)
        plain_sh = shd.param_shardings(shd.logical_axes_tree(state), nnx.to_pure_dict(state), rules, mesh)
        restored = ckpt.restore_params(path, ckpt.abstract_with_shardings(nnx.to_pure_dict(state), plain_sh)).tree

        def convert(values):
            model = plain(nnx.Rngs(seed))
            base = nnx.state(model, frozen_part)
            nnx.replace_by_pure_dict(base, values)
            nnx.update(model, base)
            lora.quantize_base(model, factory.lc.base_dtype, factory.lc.block_size, keep=trainable)
            return nnx.to_pure_dict(nnx.state(model, frozen_part))

        return jax.block_until_ready(jax.jit(convert, out_shardings=shardings)(restored))

    return load


def adapt(config: Any, model: Any, frozen: dict[str, FrozenModel], make_loss_fn: Callable,
          make_prepare_batch: Callable | None) -> tuple:
    """(trained factory, frozen sources, make_loss_fn, make_prepare_batch) of a LoRA run (module
    docstring); the arguments as they are when lora.rank is 0."""
    lc = config.get("lora")
    if lc is None or not lc.rank:
        if lc is not None:
            check(lc)
        return model, frozen, make_loss_fn, make_prepare_batch
    check(lc)
    trained = AdaptedFactory(as_factory(model), lc)
    base = dataclasses.replace(trained, params_filter=frozen_part)
    reference = REFERENCE in frozen
    sources = {k: v for k, v in frozen.items() if k != REFERENCE}
    sources[BASE] = FrozenModel(base, path=config.train.init_from,
                                load=load_base(base, config.seed, dict(config.mesh.rules)) if config.train.init_from else None)

    def wrap_loss(graphdef):
        inner = make_loss_fn(graphdef)
        if lc.dropout:  # the training forward's graph, with dropout keys beside the adapters
            dropping = dataclasses.replace(trained, dropout_keys=True)
            model = nnx.eval_shape(lambda: dropping(nnx.Rngs(config.seed)))
            inner_train = make_loss_fn(nnx.graphdef(model))
            key_shapes = nnx.to_pure_dict(nnx.state(model, lora.DropoutKey))

        def loss_fn(params, batch, rng, frozen=None):
            if not lc.dropout or rng is None:  # rng None: evaluation, deterministic
                full, rest = combine(params, frozen, reference)
                return inner(full, batch, rng, rest)
            full, rest = combine(params, frozen, reference, keys=lora.dropout_keys(key_shapes, rng))
            return inner_train(full, batch, rng, rest)

        return loss_fn

    def wrap_prepare(setup: Setup):
        inner = make_prepare_batch(prepare_view(setup, reference))

        def prepare(params, batch, rng, frozen):
            full, rest = combine(params, frozen, reference)
            return inner(full, batch, rng, rest)

        prepare.rollouts = getattr(inner, "rollouts", None)
        return prepare

    return trained, sources, wrap_loss, (wrap_prepare if make_prepare_batch is not None else None)


def prepare_view(setup: Setup, reference: bool) -> Setup:
    """The setup as the objective's prepare_batch (RL rollouts and scoring) sees it: its params are the
    whole adapted model's (base ∪ adapters, sharded as each part is), its frozen models the others
    plus, when `reference`, 'reference' (the same graph and shardings: adapters off), never the base."""
    full = _merge(setup.frozen_shardings[BASE], setup.state_shardings.params)
    graphdefs = {k: v for k, v in setup.frozen_graphdefs.items() if k != BASE}
    shardings = {k: v for k, v in setup.frozen_shardings.items() if k != BASE}
    if reference:
        graphdefs[REFERENCE], shardings[REFERENCE] = setup.graphdef, full
    return dataclasses.replace(setup, state_shardings=setup.state_shardings._replace(params=full),
                               frozen_graphdefs=graphdefs, frozen_shardings=shardings)


def full_params(params: dict, frozen: dict) -> tuple[dict, dict]:
    """After a LoRA run: (base ∪ adapters, the other frozen models) for evaluators and export."""
    if BASE not in frozen:
        return params, frozen
    return combine(params, frozen, reference=False)
