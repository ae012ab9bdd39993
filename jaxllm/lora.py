"""Low-rank adapters (LoRA, Hu et al. 2021) on the projections of every block.

A targeted projection y = x W (W of input axes I and output axes O, e.g. q's (D, N, H))
becomes

    y = x W + s * dropout(x) A B,   A (I..., r), B (r, O...),
    s = alpha / r (rsLoRA: alpha / sqrt(r)),

with A drawn as PEFT draws it (uniform, bound 1 / sqrt(prod(I))) and B zero, so a fresh
adapter changes nothing: step 0 is the base model exactly. An expert's adapter has a leading
expert axis on both factors.

The params pytree stays one tree: each adapted module holds an `Adapter` named
`<target>_lora` (paths like `blocks/attention/q_lora/a`) beside its frozen weight. What
trains is a subtree (`split_trainable`): the adapters, the scalar heads and, when asked,
the embeddings; the optimizer sees only that subtree, so the frozen base has no slots and
no gradient. Functions here work on the nested dicts by path, so they apply alike to
params, their shardings and their logical axes.

Shapes: M rows (tokens), r the rank.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Params = dict[str, Any]

ADAPTER_SUFFIX = "_lora"
# The frozen weight each target adapts, by the module that holds it.
ADAPTED_WEIGHTS = {
    "q": "wq_dnh",
    "k": "wk_dkh",
    "v": "wv_dkh",
    "o": "wo_nhd",
    "gate": ("w_gate_df", "w_gate_edf"),  # a dense MLP's, an expert layer's
    "up": ("w_up_df", "w_up_edf"),
    "down": ("w_down_fd", "w_down_efd"),
}
EMBEDDINGS = ("token_embedding_vd", "lm_head_dv")


class Adapter(nnx.Module):
    """The factors A (E?, I..., r) and B (E?, r, O...) of one projection, and its scale."""

    def __init__(
        self,
        in_shape: tuple[int, ...],
        in_axes: tuple[str, ...],
        out_shape: tuple[int, ...],
        out_axes: tuple[str, ...],
        rank: int,
        scale: float,
        dropout: float,
        rngs: nnx.Rngs,
        experts: int = 0,
    ):
        lead, lead_axes = ((experts,), ("expert",)) if experts else ((), ())
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a = jax.random.uniform(rngs.params(), (*lead, *in_shape, rank), jnp.float32, -bound, bound)
        self.a = nnx.Param(
            a, out_sharding=(*lead_axes, *in_axes, "lora_rank"), eager_sharding=False
        )
        self.b = nnx.Param(
            jnp.zeros((*lead, rank, *out_shape), jnp.float32),
            out_sharding=(*lead_axes, "lora_rank", *out_axes),
            eager_sharding=False,
        )
        self.rank, self.scale, self.dropout = rank, scale, dropout

    def _dropped(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        if key is None or not self.dropout:
            return x
        keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
        return jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)

    def __call__(self, x_mi: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """s * dropout(x) A B for rows x (M, prod(I)): (M, prod(O))."""
        a_ir = self.a[...].reshape(-1, self.rank)
        b_ro = self.b[...].reshape(self.rank, -1)
        low_mr = (self._dropped(x_mi, key) @ a_ir) * jnp.asarray(self.scale, x_mi.dtype)
        return low_mr @ b_ro

    def grouped(self, rows_pi: jax.Array, grouped_matmul, key: jax.Array | None = None):
        """The same for expert rows: `grouped_matmul(rows, weights_e..)` multiplies each row
        by its own expert's factor (the layer's ragged or blocked matmul)."""
        low_pr = grouped_matmul(self._dropped(rows_pi, key), self.a[...])
        return grouped_matmul(low_pr * jnp.asarray(self.scale, rows_pi.dtype), self.b[...])


def adapter_of(
    lora, target: str, in_shape, in_axes, out_shape, out_axes, rngs: nnx.Rngs, experts: int = 0
) -> Adapter | None:
    """The adapter of projection `target` when the `LoraConfig` `lora` adapts it, else None."""
    if lora is None or not lora.rank or target not in lora.targets:
        return None
    return Adapter(
        in_shape, in_axes, out_shape, out_axes, lora.rank, lora.scale, lora.dropout, rngs, experts
    )


def adapter_key(key: jax.Array | None, index: int) -> jax.Array | None:
    """An adapter's own dropout key (None: no dropout)."""
    return None if key is None else jax.random.fold_in(key, index)


# --- the params tree, by path ------------------------------------------------------------


def is_adapter(name: str) -> bool:
    return name.endswith(ADAPTER_SUFFIX)


def has_adapters(tree: Params) -> bool:
    """Whether any module of the nested dict `tree` holds an adapter."""
    return any(
        is_adapter(key) or (isinstance(value, dict) and has_adapters(value))
        for key, value in tree.items()
    )


def partition(tree: Params, keep, path: tuple[str, ...] = ()) -> tuple[Params, Params]:
    """(the leaves that `keep(path, leaf)` accepts, the rest), as two nested dicts without
    empty branches. Non-dict values are leaves (tuples of axes, shardings, QArrays)."""
    kept, rest = {}, {}
    for key, value in tree.items():
        where = (*path, key)
        if isinstance(value, dict):
            sub_kept, sub_rest = partition(value, keep, where)
            if sub_kept:
                kept[key] = sub_kept
            if sub_rest:
                rest[key] = sub_rest
        elif keep(where, value):
            kept[key] = value
        else:
            rest[key] = value
    return kept, rest


def partition_like(tree: Params, like: Params) -> tuple[Params, Params]:
    """(the leaves of `tree` at the paths of `like`'s leaves, the rest of `tree`)."""

    def at(path: tuple[str, ...], leaf: Any) -> bool:
        node = like
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return False
            node = node[key]
        return not isinstance(node, dict)

    return partition(tree, at)


def join(first: Params, second: Params) -> Params:
    """Two nested dicts with disjoint leaves as one (the inverse of a partition)."""
    joined = dict(first)
    for key, value in second.items():
        joined[key] = join(joined[key], value) if key in joined else value
    return joined


def trainable_path(path: tuple[str, ...], train_embeddings: bool) -> bool:
    """Whether the leaf at `path` trains in a LoRA run: an adapter's factor, a scalar head,
    or, with `train_embeddings`, the embedding table and an untied output head."""
    return (
        any(is_adapter(key) for key in path)
        or path[0] == "heads"
        or (train_embeddings and path[0] in EMBEDDINGS)
    )


def split_trainable(tree: Params, lora) -> tuple[Params, Params]:
    """(trainable, frozen) of a params-shaped nested dict; without LoRA, (tree, {})."""
    if lora is None or not lora.rank:
        return tree, {}
    return partition(tree, lambda path, _: trainable_path(path, lora.train_embeddings))


def strip_adapters(tree: Params) -> Params:
    """The nested dict without its adapters: the base model's params (no copy)."""
    return partition(tree, lambda path, _: not any(is_adapter(key) for key in path))[0]


def adapters_of(tree: Params) -> Params:
    """Only the adapters of the nested dict."""
    return partition(tree, lambda path, _: any(is_adapter(key) for key in path))[0]


def _adapted_weight_name(module: Params, target: str) -> str:
    names = ADAPTED_WEIGHTS[target]
    for name in (names,) if isinstance(names, str) else names:
        if name in module:
            return name
    raise KeyError(f"no weight for adapter {target}{ADAPTER_SUFFIX} among {sorted(module)}")


def adapter_delta(weight: Any, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """s * A B laid out as `weight` (float32): leading axes (layers, experts) shared by all
    three, A's trailing input axes and B's trailing output axes as the weight's."""
    lead = a.ndim + b.ndim - 2 - len(weight.shape)
    rank = a.shape[-1]
    a_lir = a.reshape(*a.shape[:lead], -1, rank).astype(jnp.float32)
    b_lro = b.reshape(*b.shape[:lead], rank, -1).astype(jnp.float32)
    delta = jnp.einsum("...ir,...ro->...io", a_lir, b_lro) * scale
    return delta.reshape(weight.shape)


def merge_adapters(params: Params, scale: float, dequantize=None) -> Params:
    """The base model's params with each adapter folded into its weight, W + s A B
    (float32; `dequantize` reads a stored frozen weight as float32 first)."""
    merged = {}
    for key, value in params.items():
        if is_adapter(key):
            continue
        if isinstance(value, dict):
            merged[key] = merge_adapters(value, scale, dequantize)
        else:
            merged[key] = value
    for key, value in params.items():
        if is_adapter(key):
            name = _adapted_weight_name(params, key.removesuffix(ADAPTER_SUFFIX))
            weight = params[name] if dequantize is None else dequantize(params[name])
            delta = adapter_delta(weight, value["a"], value["b"], scale)
            merged[name] = weight.astype(jnp.float32) + delta
    return merged
