"""The one TrainState of every stage, the optimizer, and sharded state creation.

`TrainState` holds what Orbax saves: step, params, optimizer state and RNG, plus `extras`,
the parts a stage adds by name (a frozen reference policy, the adaptive KL coefficient,
reward models, a separate critic and its optimizer state, ...). The state names no stage:
a stage puts what it needs into `extras` (`with_extras`) and reads it back by name. Their
layout on the mesh follows the name (`state_shardings`): `*_params` is sharded like the
params (a list of them member by member), `*_opt_state` like the moments of the params of
the same prefix, anything else is replicated.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from jaxllm.config import OptimizerConfig
from jaxllm.lora import has_adapters
from jaxllm.model import LanguageModel, Params
from jaxllm.sharding import replicated, tree_shardings


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: loop steps done (PPO/GRPO: several updates each)
    params: Params
    opt_state: optax.OptState
    rng: jax.Array  # uint32 raw key data; `jax.random.wrap_key_data` to use
    # A stage's own parts by name, e.g. `ref_params` (a frozen reference policy), `kl_coef`
    # (PPO's controller), `reward_params` (a list of frozen reward models), `critic_params`
    # and `critic_opt_state` (PPO's separate critic).
    extras: dict[str, Any] = struct.field(default_factory=dict)

    def with_extras(self, **parts: Any) -> TrainState:
        """A copy with `parts` added to (or replacing those of the same name in) `extras`."""
        return self.replace(extras={**self.extras, **parts})


def with_reference(model: LanguageModel, state: TrainState) -> TrainState:
    """`state` with a frozen copy of its params as the `ref_params` extra (no optimizer
    slots), the reference policy of DPO, PPO and GRPO. A model with adapters keeps none:
    its base, the params without the adapters, is the reference (`reference_params`)."""
    if model.lora is not None:
        return state
    return state.with_extras(ref_params=jax.tree.map(jnp.copy, state.params))


def reference_params(model: LanguageModel, state: TrainState) -> Params:
    """The reference policy's params: the `ref_params` extra, or with adapters the base
    params of the policy itself (the same arrays, which a model with adapters runs as its
    base model)."""
    if model.lora is not None:
        return model.base_params(state.params)
    return state.extras["ref_params"]


def learning_rate_schedule(
    cfg: OptimizerConfig, total_steps: int, updates_per_step: int = 1
) -> optax.Schedule:
    """nanoGPT's schedule: linear warmup to `lr`, cosine to `min_lr` at `decay_steps`, then flat.

    Steps are loop steps: a stage that applies `updates_per_step` optimizer updates per loop
    step (PPO's epochs x minibatches) gets the learning rate of loop step
    `update_count // updates_per_step` (warmup and decay keep their meaning)."""
    decay_steps = cfg.decay_steps if cfg.decay_steps is not None else total_steps
    warmup_steps = min(cfg.warmup_steps, decay_steps)

    def schedule(update_count: jax.Array) -> jax.Array:
        step = jnp.asarray(update_count // updates_per_step, jnp.float32)
        warmup_lr = cfg.lr * (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(decay_steps - warmup_steps, 1)
        cosine = 0.5 * (1 + jnp.cos(jnp.pi * jnp.clip(progress, 0.0, 1.0)))
        decay_lr = cfg.min_lr + cosine * (cfg.lr - cfg.min_lr)
        return jnp.where(step < warmup_steps, warmup_lr, decay_lr)

    return schedule


def weight_decay_mask(logical_axes: Params) -> Params:
    """True for weight matrices (two or more axes besides `layers`, one of them `embed`)
    and adapter factors (an axis `lora_rank`); False for norms, vectors and biases (Qwen2's
    (heads, head_dim) query bias included)."""

    def decayed(axes: tuple) -> bool:
        matrix = sum(axis != "layers" for axis in axes) >= 2 and "embed" in axes
        return matrix or "lora_rank" in axes

    return jax.tree.map(decayed, logical_axes, is_leaf=lambda x: isinstance(x, tuple))


def make_optimizer(
    cfg: OptimizerConfig, model: LanguageModel, total_steps: int, updates_per_step: int = 1
) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW with the schedule and decay mask above, over the
    params that train (`model.split_trainable`: with adapters, the adapters and heads)."""
    adamw = optax.adamw(
        learning_rate_schedule(cfg, total_steps, updates_per_step),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=weight_decay_mask(model.split_trainable(model.logical_axes)[0]),
    )
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw


def fresh_state(model: LanguageModel, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """A new state: params from `seed`, optimizer slots for the params that train (none
    for a frozen base), RNG; jit it with out_shardings."""
    params_key, rng_key = jax.random.split(jax.random.key(seed))
    params = model.init(params_key)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(model.split_trainable(params)[0]),
        rng=jax.random.key_data(rng_key),
    )


def state_shardings(
    model: LanguageModel, tx: optax.GradientTransformation, mesh: Mesh, abstract_state: TrainState
) -> TrainState:
    """Shardings of every leaf: params by their logical axes (frozen `*_params` extras too,
    whatever scalar heads they carry), optimizer moments like their params (a
    `NAME_opt_state` extra like `NAME_params`), everything else replicated."""
    param_shardings = tree_shardings(mesh, model.abstract_params, model.logical_axes, model.rules)

    def like_params(tree: Any) -> Any:
        if isinstance(tree, list):
            return [like_params(member) for member in tree]
        owner = model if has_adapters(tree) else model.base  # frozen reward models: no adapters
        logical_axes = owner.with_heads(list(tree.get("heads", {}))).logical_axes
        return tree_shardings(mesh, tree, logical_axes, model.rules)

    def like_moments(opt_state: Any, shardings: Any) -> Any:
        """An optimizer state's moments sharded like their params (`tx`'s structure: a
        separate critic's optimizer is built the same way)."""
        return optax.tree_map_params(
            tx,
            lambda _, sharding: sharding,
            opt_state,
            shardings,
            transform_non_params=lambda _: replicated(mesh),
        )

    extras = abstract_state.extras
    extra_shardings = {}
    for name, part in extras.items():
        if name.endswith("_params"):
            extra_shardings[name] = like_params(part)
        elif name.endswith("_opt_state"):
            owner = name.removesuffix("_opt_state") + "_params"
            if owner not in extras:
                raise ValueError(f"state extra {name} has no {owner} beside it to be sharded like")
            extra_shardings[name] = like_moments(part, like_params(extras[owner]))
        else:
            extra_shardings[name] = jax.tree.map(lambda _: replicated(mesh), part)
    trainable_shardings = model.split_trainable(param_shardings)[0]
    return abstract_state.replace(
        step=replicated(mesh),
        params=param_shardings,
        opt_state=like_moments(abstract_state.opt_state, trainable_shardings),
        rng=replicated(mesh),
        extras=extra_shardings,
    )


def create_train_state(
    model: LanguageModel, tx: optax.GradientTransformation, mesh: Mesh, seed: int
) -> tuple[TrainState, TrainState]:
    """A fresh state created directly in its sharded layout (never whole on one device).

    Returns:
        (state, shardings): the state and a TrainState-shaped tree of its shardings.
    """
    abstract_state = jax.eval_shape(lambda: fresh_state(model, tx, seed))
    shardings = state_shardings(model, tx, mesh, abstract_state)
    with jax.set_mesh(mesh):
        state = jax.jit(lambda: fresh_state(model, tx, seed), out_shardings=shardings)()
    return state, shardings


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying target shardings (what Orbax restores onto)."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_tree,
        shardings,
    )
