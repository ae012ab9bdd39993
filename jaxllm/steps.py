"""Train steps: pure `(state, batch) -> (state, metrics)` functions and their jitted form.

A stage is a loss function `loss_fn(model, params, batch) -> (loss_sum, aux)` where
`aux["num_tokens"]` is the number of trained tokens in `batch`; `train_step` turns it into
an optimizer update with gradient accumulation, normalising by the tokens of the whole
global batch. `jit_train_step` compiles it with the state's shardings, the batch sharding
and the state donated.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxllm.losses import masked_causal_lm_loss
from jaxllm.model import LanguageModel, Params
from jaxllm.sharding import batch_sharding, replicated
from jaxllm.state import TrainState

Batch = dict[str, jax.Array]
LossFn = Callable[[LanguageModel, Params, Batch], tuple[jax.Array, dict[str, jax.Array]]]


def causal_lm_loss(
    model: LanguageModel, params: Params, batch: Batch
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Pre-training loss: summed masked next-token NLL over a causal-LM batch."""
    logits_btv = model.logits(params, batch["tokens"], batch["positions"], batch["segment_ids"])
    loss_sum, num_tokens = masked_causal_lm_loss(logits_btv, batch["targets"], batch["loss_mask"])
    return loss_sum, {"num_tokens": num_tokens}


def _accumulated_gradients(
    loss_fn: LossFn, model: LanguageModel, params: Params, batch: Batch, grad_accum: int
) -> tuple[jax.Array, jax.Array, Params]:
    """(loss_sum, num_tokens, grads of loss_sum) over `grad_accum` sequential micro-batches."""
    grad_fn = jax.value_and_grad(lambda p, b: loss_fn(model, p, b), has_aux=True)
    if grad_accum == 1:
        (loss_sum, aux), grads = grad_fn(params, batch)
        return loss_sum, aux["num_tokens"], grads

    micro_batches = jax.tree.map(
        lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch
    )

    def accumulate(carry, micro_batch):
        loss_sum, num_tokens, grads = carry
        (micro_loss, aux), micro_grads = grad_fn(params, micro_batch)
        grads = jax.tree.map(jnp.add, grads, micro_grads)
        return (loss_sum + micro_loss, num_tokens + aux["num_tokens"], grads), None

    zeros = (
        jnp.zeros((), jnp.float32),
        jnp.zeros((), jnp.float32),
        jax.tree.map(jnp.zeros_like, params),
    )
    (loss_sum, num_tokens, grads), _ = jax.lax.scan(accumulate, zeros, micro_batches)
    return loss_sum, num_tokens, grads


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: LanguageModel,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    loss_fn: LossFn = causal_lm_loss,
    grad_accum: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on the mean loss per trained token of the global batch."""
    loss_sum, num_tokens, grads = _accumulated_gradients(
        loss_fn, model, state.params, batch, grad_accum
    )
    normaliser = jnp.maximum(num_tokens, 1.0)
    grads = jax.tree.map(lambda g: g / normaliser, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss_sum / normaliser,
        "grad_norm": optax.tree.norm(grads),
        "lr": schedule(state.step),
        "num_tokens": num_tokens,
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


pretrain_step = functools.partial(train_step, loss_fn=causal_lm_loss)


def eval_step(
    params: Params, batch: Batch, *, model: LanguageModel, loss_fn: LossFn = causal_lm_loss
) -> dict[str, jax.Array]:
    """Summed loss and token count of one batch (callers sum these over batches)."""
    loss_sum, aux = loss_fn(model, params, batch)
    return {"loss_sum": loss_sum, "num_tokens": aux["num_tokens"]}


def jit_train_step(
    model: LanguageModel,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    shardings: TrainState,
    *,
    loss_fn: LossFn = causal_lm_loss,
    grad_accum: int = 1,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """`train_step` compiled for `mesh`: state sharded and donated, batch rows split over
    the data-parallel axes, metrics replicated. Call it as `state, metrics = step(state, b)`."""
    step = functools.partial(
        train_step, model=model, tx=tx, schedule=schedule, loss_fn=loss_fn, grad_accum=grad_accum
    )
    compiled = jax.jit(
        step,
        in_shardings=(shardings, batch_sharding(mesh, model.rules)),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=0,
    )

    def run(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        with jax.set_mesh(mesh):
            return compiled(state, batch)

    run.compiled = compiled
    return run


def jit_eval_step(
    model: LanguageModel, mesh: Mesh, param_shardings: Any, *, loss_fn: LossFn = causal_lm_loss
) -> Callable[[Params, Batch], dict[str, jax.Array]]:
    step = functools.partial(eval_step, model=model, loss_fn=loss_fn)
    compiled = jax.jit(
        step,
        in_shardings=(param_shardings, batch_sharding(mesh, model.rules)),
        out_shardings=replicated(mesh),
    )

    def run(params: Params, batch: Batch) -> dict[str, jax.Array]:
        with jax.set_mesh(mesh):
            return compiled(params, batch)

    return run
