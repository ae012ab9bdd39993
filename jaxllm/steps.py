"""Train and eval steps: pure `(state, batch) -> (state, metrics)` functions and their jit.

A loss is `loss_fn(model, params, batch) -> (loss_sum, LossAux)`: the loss summed over what
it trains (tokens, sequences), with the denominator it is divided by and any number of
extra metrics as (sum, count) pairs. Sums and counts add up exactly over micro-batches and
devices, so `train_step` normalises each by its global total: the loss (and its gradient)
by the denominator of the whole global batch, each metric by its own count. A stage whose
update is more than one optimizer step (PPO's epochs x minibatches) builds it from
`loss_and_gradients`, `apply_gradients` and `normalised_metrics` below.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from jaxllm.lora import join, partition_like
from jaxllm.losses import masked_causal_lm_loss
from jaxllm.model import LanguageModel, Params
from jaxllm.moe import load_balancing_loss
from jaxllm.sharding import replicated, row_sharding
from jaxllm.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
DROPOUT_STREAM = 0x10BA  # folded into a step's key for adapter dropout


@struct.dataclass
class LossAux:
    """What a loss returns besides its sum; every field adds up over micro-batches."""

    denominator: jax.Array  # float32 scalar: the loss sum is divided by its global total
    means: dict[str, tuple[jax.Array, jax.Array]] = struct.field(default_factory=dict)
    totals: dict[str, jax.Array] = struct.field(default_factory=dict)  # reported summed

    def __add__(self, other: LossAux) -> LossAux:
        return jax.tree.map(jnp.add, self, other)


LossFn = Callable[[LanguageModel, Params, Batch], tuple[jax.Array, LossAux]]
# An update: (state, batch) -> (state, metrics), pure and jit-able.
UpdateFn = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]


def causal_lm_loss(
    model: LanguageModel, params: Params, batch: Batch, *, vocab_size: int | None = None
) -> tuple[jax.Array, LossAux]:
    """Pre-training and SFT loss: summed masked next-token NLL over a causal-LM batch,
    log_softmax over the tokenizer's `vocab_size` real ids (the model's padding rows get
    probability 0, as in the sampler).

    A mixture of experts adds its router's load-balancing loss (`moe.load_balancing_loss`,
    transformers' value over this batch's tokens) times `model.router_aux_loss_coef` per
    trained token, so the reported `loss` is NLL + coef * router_aux_loss as in
    transformers; `router_aux_loss` itself is logged beside it."""
    hidden_btd, router_stats = model.hidden_and_router_stats(
        params, batch["tokens"], batch["positions"], batch["segment_ids"]
    )
    logits_btv = model.logits_from_hidden(params, hidden_btd)
    loss_sum, num_tokens = masked_causal_lm_loss(
        logits_btv, batch["targets"], batch["loss_mask"], vocab_size
    )
    aux = LossAux(num_tokens, totals={"num_tokens": num_tokens})
    if router_stats is None:
        return loss_sum, aux
    router_loss = load_balancing_loss(router_stats, model.cfg.num_experts)
    loss_sum = loss_sum + model.cfg.router_aux_loss_coef * router_loss * num_tokens
    return loss_sum, aux.replace(means={"router_aux_loss": (router_loss * num_tokens, num_tokens)})


def loss_and_gradients(
    loss_fn: LossFn,
    model: LanguageModel,
    params: Params,
    batch: Batch,
    grad_accum: int = 1,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, LossAux, Params]:
    """(loss_sum, aux, gradients of loss_sum), summed over `grad_accum` sequential
    micro-batches of the rows of `batch` (every leaf's leading axis).

    Gradients are taken with respect to the params that train only
    (`model.split_trainable`: with adapters, the adapters and heads; the frozen base gets
    none). `dropout_key`: the adapters' dropout key for this update (micro-batch i uses
    fold_in(key, i)); None or no adapter dropout: none."""
    trainable, frozen = model.split_trainable(params)

    def grad_fn(trainable, micro_batch, index):
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
        training = model.with_dropout(key)
        return jax.value_and_grad(
            lambda t: loss_fn(training, join(t, frozen), micro_batch), has_aux=True
        )(trainable)

    if grad_accum == 1:
        (loss_sum, aux), grads = grad_fn(trainable, batch, 0)
        return loss_sum, aux, grads

    micro_batches = jax.tree.map(
        lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch
    )
    first = jax.tree.map(lambda x: x[0], micro_batches)
    (_, aux_shape), _ = jax.eval_shape(grad_fn, trainable, first, 0)

    def accumulate(carry, indexed_micro_batch):
        index, micro_batch = indexed_micro_batch
        loss_sum, aux, grads = carry
        (micro_loss, micro_aux), micro_grads = grad_fn(trainable, micro_batch, index)
        grads = jax.tree.map(jnp.add, grads, micro_grads)
        return (loss_sum + micro_loss, aux + micro_aux, grads), None

    zeros = (
        jnp.zeros((), jnp.float32),
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape),
        jax.tree.map(jnp.zeros_like, trainable),
    )
    indexed = (jnp.arange(grad_accum), micro_batches)
    (loss_sum, aux, grads), _ = jax.lax.scan(accumulate, zeros, indexed)
    return loss_sum, aux, grads


def dropout_key(state: TrainState) -> jax.Array:
    """The adapters' dropout key of the state's next optimizer update (its own stream:
    fold_in(rng, step) again folded with a constant, apart from the rollouts' keys)."""
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    return jax.random.fold_in(step_key, DROPOUT_STREAM)


def _ratio(total: jax.Array, count: jax.Array) -> jax.Array:
    return total / jnp.where(count > 0, count, 1.0)


def normalised_metrics(loss_sum: jax.Array, aux: LossAux) -> Metrics:
    """`loss` = sum / denominator, each mean = sum / count (0 when nothing was counted),
    each total as summed."""
    metrics = {"loss": _ratio(loss_sum, aux.denominator)}
    metrics.update({name: _ratio(*pair) for name, pair in aux.means.items()})
    metrics.update(aux.totals)
    return metrics


def apply_gradients(
    state: TrainState, grads: Params, tx: optax.GradientTransformation
) -> tuple[TrainState, jax.Array]:
    """One optimizer update with `grads` (of the params that train: a subtree of
    `state.params`, the rest frozen); the new state (step + 1) and the gradient norm."""
    trainable, frozen = partition_like(state.params, grads)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    params = join(optax.apply_updates(trainable, updates), frozen)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, optax.tree.norm(grads)


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: LanguageModel,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    loss_fn: LossFn = causal_lm_loss,
    grad_accum: int = 1,
) -> tuple[TrainState, Metrics]:
    """One optimizer update on the loss per unit of denominator of the global batch."""
    loss_sum, aux, grads = loss_and_gradients(
        loss_fn, model, state.params, batch, grad_accum, dropout_key(state)
    )
    grads = jax.tree.map(lambda g: _ratio(g, aux.denominator), grads)
    new_state, grad_norm = apply_gradients(state, grads, tx)
    metrics = {**normalised_metrics(loss_sum, aux), "grad_norm": grad_norm}
    return new_state, {**metrics, "lr": schedule(state.step)}


def eval_step(
    params: Params, batch: Batch, *, model: LanguageModel, loss_fn: LossFn = causal_lm_loss
) -> tuple[jax.Array, LossAux]:
    """The loss sum and aux of one batch; callers add them over batches and normalise."""
    return loss_fn(model, params, batch)


@dataclasses.dataclass(frozen=True)
class UpdateContext:
    """What the loop hands a stage's update factory."""

    model: LanguageModel
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    loss_fn: LossFn
    grad_accum: int


def default_update(context: UpdateContext) -> UpdateFn:
    """One optimizer step on the stage's loss (pre-training, SFT and other offline stages)."""
    return functools.partial(
        train_step,
        model=context.model,
        tx=context.tx,
        schedule=context.schedule,
        loss_fn=context.loss_fn,
        grad_accum=context.grad_accum,
    )


def jit_update(update: UpdateFn, mesh: Mesh, shardings: TrainState, model: LanguageModel) -> Any:
    """`update` jitted for `mesh`: state sharded and donated, the rows of every batch leaf
    split over the data-parallel axes, metrics replicated. Returns the `jax.jit` object
    (call it under `jax.set_mesh(mesh)`, or `.lower(...).compile()` it)."""
    return jax.jit(
        update,
        in_shardings=(shardings, row_sharding(mesh, model.rules)),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=0,
    )


def jit_train_step(
    model: LanguageModel,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    shardings: TrainState,
    *,
    loss_fn: LossFn = causal_lm_loss,
    grad_accum: int = 1,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """`train_step` compiled for `mesh` for causal-LM batches. Call it as
    `state, metrics = step(state, batch)`."""
    context = UpdateContext(model, tx, schedule, loss_fn, grad_accum)
    compiled = jit_update(default_update(context), mesh, shardings, model)

    def run(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        with jax.set_mesh(mesh):
            return compiled(state, batch)

    return run


def jit_eval_step(
    model: LanguageModel, mesh: Mesh, *, loss_fn: LossFn = causal_lm_loss
) -> Callable[[Params, Batch], tuple[jax.Array, LossAux]]:
    """The compiled `eval_step`: params sharded as they are, metrics replicated."""
    step = functools.partial(eval_step, model=model, loss_fn=loss_fn)
    compiled = jax.jit(step, out_shardings=replicated(mesh))

    def run(params: Params, batch: Batch) -> tuple[jax.Array, LossAux]:
        with jax.set_mesh(mesh):
            return compiled(params, batch)

    return run


def minibatch_order(
    key: jax.Array, rows: int, epochs: int, minibatches: int, rows_together: int = 1
) -> jax.Array:
    """(epochs * minibatches, rows // minibatches) int32 row indices: each epoch a fresh
    permutation (key `fold_in(key, epoch)`) of the blocks of `rows_together` consecutive
    rows (a block stays whole and in order: a GRPO group whose prompt is computed once),
    cut into equal minibatches."""
    blocks = rows // rows_together
    permutations_ek = jax.vmap(
        lambda e: jax.random.permutation(jax.random.fold_in(key, e), blocks)
    )(jnp.arange(epochs))
    rows_ekr = permutations_ek[:, :, None] * rows_together + jnp.arange(rows_together)
    return rows_ekr.reshape(epochs * minibatches, rows // minibatches)


def minibatch_update(
    context: UpdateContext, *, epochs: int, minibatches: int, rows_together: int = 1
) -> UpdateFn:
    """`epochs` passes over the batch's rows, each cut into `minibatches` shuffled
    minibatches with one optimizer step apiece: epochs x minibatches updates in one compiled
    call (`lax.scan` over the minibatches, the state donated by the loop). Each epoch's
    permutation comes from fold_in(state.rng, state.step), so a resumed run repeats it;
    it moves blocks of `rows_together` consecutive rows, each kept whole (`minibatch_order`).

    `state.step` advances by 1 (one loop step); build the stage's optimizer with
    `updates_per_step = epochs * minibatches` so its schedule counts loop steps. Metrics:
    each loss metric and the gradient norm averaged over the minibatch steps, totals over
    one epoch, and `lr` of the step.
    """
    updates = epochs * minibatches

    def update(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        rows = jax.tree.leaves(batch)[0].shape[0]
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        order_mr = minibatch_order(key, rows, epochs, minibatches, rows_together)

        def one_step(state, rows_r):
            minibatch = jax.tree.map(lambda x: x[rows_r], batch)
            loss_sum, aux, grads = loss_and_gradients(
                context.loss_fn,
                context.model,
                state.params,
                minibatch,
                context.grad_accum,
                dropout_key(state),
            )
            grads = jax.tree.map(lambda g: _ratio(g, aux.denominator), grads)
            state, grad_norm = apply_gradients(state, grads, context.tx)
            metrics = {**normalised_metrics(loss_sum, aux), "grad_norm": grad_norm}
            totals = {name: metrics.pop(name) for name in aux.totals}
            return state, (metrics, totals)

        new_state, (metrics_m, totals_m) = jax.lax.scan(one_step, state, order_mr)
        metrics = {name: jnp.mean(values) for name, values in metrics_m.items()}
        metrics.update({name: jnp.sum(values) / epochs for name, values in totals_m.items()})
        lr = context.schedule(state.step * updates)
        return new_state.replace(step=state.step + 1), {**metrics, "lr": lr}

    return update
