"""The frozen base of a LoRA run stored as `lora.base_dtype`: float32, bfloat16, or quantised
(QLoRA, Dettmers et al. 2023) with Google's qwix (`qwix.QArray`, `qwix.quantize`,
`qwix.dequantize`), imported only when a base is quantised.

What is stored how (`store_frozen`; the trainable leaves, adapters and heads, stay float32):

- `bfloat16`: every frozen leaf cast to bfloat16;
- `int8`: the block projections (q, k, v, o, gate, up, down, every expert's; adapted or
  not) as int8 with one float32 scale per output channel, s = max|W| over the input
  axes / 127.5 (qwix's symmetric bound), |W - s q| <= s / 2; 8 bits per weight is fine
  enough that a scale per column costs nothing and loses little;
- `nf4`: the same projections as 4-bit NormalFloat codes, blockwise: one bfloat16 scale
  (the block's max|W|) per `NF4_BLOCK` = 64 consecutive inputs of an output channel
  (QLoRA's block size; fewer where the input axis is shorter: gcd(64, size)), as QLoRA does
  because 16 levels per output column lose the small weights beside an outlier. A weight
  is W ~ s * NF4[code]; the bfloat16 scale costs 16 / 64 = 0.25 bits per weight (QLoRA's
  double quantisation gets 0.127);
- with int8 or nf4, every other frozen leaf (embeddings, norms) in bfloat16.

An int8 weight is a `qwix.QArray`; a nf4 weight is a `PackedNF4`: its codes two per byte
(uint8; Orbax cannot write uint4, and XLA on the CPU refuses a 4-bit argument to the
donating train step), so it takes 4.25 bits per weight. The pairs run along the block
axis (the last input axis): an even axis has even blocks, so a byte never spans two, and
byte i holds codes 2i and 2i + 1, so a shard of the bytes unpacks to the same shard of the
weight (the bytes shard like the weight's axis where its half divides the mesh axes,
`jaxllm.sharding.tree_shardings`). An odd axis (whose blocks are single weights:
gcd(64, size) = 1) gets one padding code per row.

The forward pass keeps the quantised leaves until the layer that uses them
(`dequantize_layer`, inside the scan body), so a step holds one layer's dequantised
weights at a time, never the whole base. Quantising maps over the leading layers axis for
the same reason (qwix's nf4 rounding compares each weight with all 16 levels at once).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxllm.errors import UserError
from jaxllm.lora import join, split_trainable

Params = dict[str, Any]

QUANTIZED_DTYPES = ("int8", "nf4")
NF4_BLOCK = 64
DEQUANTIZED = "dequantized_base"  # checkpoint name of a layer's dequantised weights

# The input axes of each block projection, counted from its end (leading layers and experts
# axes come first); nf4 blocks run along the last of them.
INPUT_AXES = {
    "wq_dnh": (-3,),
    "wk_dkh": (-3,),
    "wv_dkh": (-3,),
    "wo_nhd": (-3, -2),
    "w_gate_df": (-2,),
    "w_up_df": (-2,),
    "w_down_fd": (-2,),
    "w_gate_edf": (-2,),
    "w_up_edf": (-2,),
    "w_down_efd": (-2,),
}


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["qvalue", "scale"], meta_fields=["axis", "size"]
)
@dataclasses.dataclass(frozen=True)
class PackedNF4:
    """A nf4 weight of logical shape `shape`: `qvalue` its codes, uint8, two per byte
    along `axis` (byte i: code 2i in the low nibble, 2i + 1 in the high one; ceil(size / 2)
    bytes), `scale` qwix's nf4 scales (bfloat16, one per block). `axis` counts from the end,
    so it holds also for one layer of the stacked weight; `size` is the weight's length
    along it."""

    qvalue: jax.Array
    scale: jax.Array
    axis: int
    size: int

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.qvalue.shape)
        shape[self.axis] = self.size
        return tuple(shape)

    @property
    def dtype(self):
        return self.scale.dtype

    def astype(self, dtype) -> PackedNF4:
        """The same codes with the scales cast: it dequantises in `dtype`."""
        return dataclasses.replace(self, scale=self.scale.astype(dtype))


def pack_nf4(codes: jax.Array, axis: int) -> jax.Array:
    """nf4 codes (uint8 values < 16) two per byte along `axis`, as `PackedNF4.qvalue`
    holds them (an odd axis padded with one zero code)."""
    axis %= codes.ndim
    if codes.shape[axis] % 2:
        codes = jnp.pad(codes, [(0, int(a == axis)) for a in range(codes.ndim)])
    pairs = codes.reshape(*codes.shape[:axis], -1, 2, *codes.shape[axis + 1 :])
    low, high = (jax.lax.index_in_dim(pairs, i, axis + 1, keepdims=False) for i in (0, 1))
    return low | (high << 4)


def unpack_nf4(packed: jax.Array, axis: int, size: int) -> jax.Array:
    """The inverse of `pack_nf4`: one code per byte, `size` of them along `axis`."""
    axis %= packed.ndim
    codes = jnp.stack([packed & 0xF, packed >> 4], axis=axis + 1)
    codes = codes.reshape(*packed.shape[:axis], -1, *packed.shape[axis + 1 :])
    return jax.lax.slice_in_dim(codes, 0, size, axis=axis)


def is_quantized(leaf: Any) -> bool:
    """Whether `leaf` is a quantised weight: a `PackedNF4`, or a `qwix.QArray` (none can
    exist before qwix is imported)."""
    qwix = sys.modules.get("qwix")
    return isinstance(leaf, PackedNF4) or (qwix is not None and isinstance(leaf, qwix.QArray))


def quantize_weight(weight: jax.Array, name: str, qtype: str) -> Any:
    """The block projection `name` (leading layers axis, e.g. wq_dnh (L, D, N, H)) as
    `qtype`: an int8 QArray or a `PackedNF4` (laid out as the module docstring says), one
    layer at a time."""
    try:
        import qwix
    except ImportError:
        raise UserError(
            f"lora.base_dtype={qtype} quantises the base with Google's qwix, which is not "
            "installed; run bash scripts/setup.sh (or pip install 'jaxllm[qlora]')"
        ) from None

    def one_layer(w: jax.Array) -> Any:
        inputs = {w.ndim + axis for axis in INPUT_AXES[name]}
        if qtype == "int8":
            channels = tuple(a for a in range(w.ndim) if a not in inputs)
            return qwix.quantize(w, jnp.int8, channelwise_axes=channels)
        block_axis = max(inputs)
        tile = math.gcd(NF4_BLOCK, w.shape[block_axis])
        channels = tuple(a for a in range(w.ndim) if a != block_axis)
        q = qwix.quantize(
            w,
            "nf4",
            channelwise_axes=channels,
            tiled_axes={block_axis: tile},
            scale_dtype=jnp.bfloat16,
        )
        axis = block_axis - w.ndim
        codes = pack_nf4(q.qvalue.astype(jnp.uint8), axis)
        return PackedNF4(codes, q.scale, axis, w.shape[axis])

    return jax.lax.map(one_layer, weight.astype(jnp.float32))


def dequantize(leaf: Any, dtype=None) -> Any:
    """A quantised weight as an array of `dtype` (default: its scale's dtype), computed in
    that dtype (a `PackedNF4` unpacked first); any other leaf as it is (cast to `dtype` when
    given)."""
    if dtype is not None:
        leaf = leaf.astype(dtype)  # a quantised weight's: its scale, so the product is in `dtype`
    if not is_quantized(leaf):
        return leaf
    import qwix

    if isinstance(leaf, PackedNF4):
        codes = unpack_nf4(leaf.qvalue, leaf.axis, leaf.size)
        leaf = qwix.QArray(codes, leaf.scale, qtype="nf4")
    return qwix.dequantize(leaf)


def store_frozen(params: Params, lora) -> Params:
    """`params` (float32) with the frozen leaves stored as `lora.base_dtype`; the same
    params with float32 or without adapters."""
    if lora is None or not lora.rank or lora.base_dtype == "float32":
        return params
    trainable, frozen = split_trainable(params, lora)

    def store(path, leaf):
        name = path[-1].key
        if lora.base_dtype in QUANTIZED_DTYPES and name in INPUT_AXES:
            return quantize_weight(leaf, name, lora.base_dtype)
        return leaf.astype(jnp.bfloat16)

    return join(trainable, jax.tree_util.tree_map_with_path(store, frozen))


def stored_like(leaf: jax.Array, name: str, target: Any) -> Any:
    """The float `leaf` (the param `name`) stored as the abstract `target` says: quantised
    when it is a quantised weight, else cast to its dtype."""
    if is_quantized(target):
        qtype = "nf4" if isinstance(target, PackedNF4) else "int8"
        return quantize_weight(leaf, name, qtype)
    return leaf.astype(target.dtype)


def dequantize_params(params: Params, dtype=jnp.float32) -> Params:
    """Every leaf as an array of `dtype`: quantised weights dequantised, the rest cast."""
    return jax.tree.map(lambda leaf: dequantize(leaf, dtype), params, is_leaf=is_quantized)


def dequantize_layer(layer_params: Any) -> Any:
    """One layer's params (inside the layer scan) with its quantised weights dequantised in their
    scales' dtype (the compute dtype, `LanguageModel.compute_params`), named
    `DEQUANTIZED` so a remat policy can decline to save them."""
    return jax.tree.map(
        lambda leaf: checkpoint_name(dequantize(leaf), DEQUANTIZED) if is_quantized(leaf) else leaf,
        layer_params,
        is_leaf=is_quantized,
    )


def holds_quantized(tree: Any) -> bool:
    return any(is_quantized(leaf) for leaf in jax.tree.leaves(tree, is_leaf=is_quantized))


def float_abstract(abstract: Any) -> Any:
    """An abstract params tree (ShapeDtypeStructs with shardings) in float32: each quantised
    weight as its weight's shape with its codes' sharding (also one of the weight: where
    half an axis divides its mesh axes, the whole does)."""

    def as_float(leaf):
        sharding = leaf.qvalue.sharding if is_quantized(leaf) else leaf.sharding
        return jax.ShapeDtypeStruct(leaf.shape, jnp.float32, sharding=sharding)

    return jax.tree.map(as_float, abstract, is_leaf=is_quantized)


def as_dicts(tree: Any) -> Any:
    """`tree` with each quantised weight as the dict {"qvalue", "scale"} (how Orbax's
    metadata names a saved one)."""
    if isinstance(tree, dict):
        return {key: as_dicts(value) for key, value in tree.items()}
    if is_quantized(tree):
        return {"qvalue": tree.qvalue, "scale": tree.scale}
    return tree


def like_quantized(tree: Any, like: Any) -> Any:
    """`tree` with the dicts at the places of `like`'s quantised weights made such weights
    again (the inverse of `as_dicts`)."""
    if is_quantized(like):
        return dataclasses.replace(like, qvalue=tree["qvalue"], scale=tree["scale"])
    if isinstance(tree, dict) and isinstance(like, dict):
        return {
            key: like_quantized(value, like[key]) if key in like else value
            for key, value in tree.items()
        }
    return tree
