"""The device mesh and the one table that maps logical axis names to mesh axes.

Every parameter declares logical axes (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`,
`mlp`, `layers`, a mixture of experts' `expert` and `expert_mlp`, an adapter's `lora_rank`);
activations use `batch`, `act_seq`, `act_embed`, `act_heads`, `act_kv_heads`, `act_mlp`,
`act_vocab`. `ShardingRules`
maps each to zero or more mesh axes of (`data`, `fsdp`, `tensor`); param, optimizer-state,
batch and activation shardings are all derived from it, so changing the layout is a config
change, never a code change.

Expert parallelism: `expert` maps to the `tensor` mesh axis, so each tensor-parallel device
holds `num_experts / tensor` whole experts (their `expert_mlp` axis unsharded). The attention
heads map to `tensor` too; that is no collision, since a mesh axis is refused only when two
logical axes of ONE array map to it, and no array has both heads and experts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxllm.config import MeshConfig
from jaxllm.errors import ConfigError
from jaxllm.quant import is_quantized

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None


@dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axes. Hashable, so it can live in a jit-static model."""

    rules: tuple[tuple[str, MeshAxes], ...]

    def mesh_axes(self, logical_axis: str | None) -> tuple[str, ...]:
        if logical_axis is None:
            return ()
        for name, target in self.rules:
            if name == logical_axis:
                if target is None:
                    return ()
                return (target,) if isinstance(target, str) else tuple(target)
        raise KeyError(f"logical axis '{logical_axis}' has no sharding rule")

    def spec(self, logical_axes: Sequence[str | None], what: str = "an array") -> PartitionSpec:
        """PartitionSpec for an array with these logical axes.

        Raises:
            ConfigError: if two logical axes of the array map to the same mesh axis.
        """
        used: dict[str, str] = {}
        entries = []
        for logical_axis in logical_axes:
            targets = self.mesh_axes(logical_axis)
            for mesh_axis in targets:
                if mesh_axis in used:
                    raise ConfigError(
                        f"sharding rules map logical axes '{used[mesh_axis]}' and "
                        f"'{logical_axis}' of {what} both to mesh axis '{mesh_axis}'; "
                        "map each mesh axis at most once per array"
                    )
                used[mesh_axis] = logical_axis
            entries.append(None if not targets else targets[0] if len(targets) == 1 else targets)
        return PartitionSpec(*entries)


DEFAULT_RULES = ShardingRules(
    rules=(
        # parameters
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("mlp", "tensor"),
        ("expert", "tensor"),
        ("expert_mlp", None),
        ("layers", None),
        ("lora_rank", None),  # an adapter's rank: A shares its weight's input axes, B the output
        # activations
        ("batch", ("data", "fsdp")),
        ("act_seq", None),
        ("act_embed", None),
        ("act_heads", "tensor"),
        ("act_kv_heads", "tensor"),
        ("act_mlp", "tensor"),
        ("act_vocab", "tensor"),
    )
)


def resolve_mesh_shape(mesh_config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Axis sizes with -1 replaced by the devices left over.

    Raises:
        ConfigError: if the sizes do not multiply to exactly `num_devices`.
    """
    sizes = [mesh_config.data, mesh_config.fsdp, mesh_config.tensor]
    fixed = math.prod(size for size in sizes if size != -1)
    described = " x ".join(f"{axis}={size}" for axis, size in zip(MESH_AXES, sizes, strict=True))
    if -1 in sizes:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh {described} cannot fill {num_devices} devices: {fixed} does not divide "
                f"{num_devices}; change mesh.data/mesh.fsdp/mesh.tensor"
            )
        sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"mesh {described} needs {math.prod(sizes)} devices but {num_devices} exist; "
            f"set mesh.data x mesh.fsdp x mesh.tensor to {num_devices} (or one of them to -1)"
        )
    return tuple(sizes)


def make_mesh(mesh_config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def named_sharding(
    mesh: Mesh,
    shape: Sequence[int],
    logical_axes: Sequence[str | None],
    rules: ShardingRules = DEFAULT_RULES,
    what: str = "an array",
) -> NamedSharding:
    """The sharding of one array, checked for axis collisions and divisibility."""
    if len(shape) != len(logical_axes):
        raise ValueError(f"{what} has shape {tuple(shape)} but logical axes {logical_axes}")
    spec = rules.spec(logical_axes, what)
    for size, entry, logical_axis in zip(shape, spec, logical_axes, strict=True):
        mesh_axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
        parts = math.prod(mesh.shape[axis] for axis in mesh_axes)
        if size % parts:
            raise ConfigError(
                f"{what}: dimension '{logical_axis}' of size {size} does not divide over mesh "
                f"axes {mesh_axes} of size {parts}; change the mesh or the model size"
            )
    return NamedSharding(mesh, spec)


def tree_shardings(
    mesh: Mesh,
    abstract_tree: Any,
    logical_tree: Any,
    rules: ShardingRules = DEFAULT_RULES,
) -> Any:
    """Shardings for a pytree of arrays given a matching pytree of logical-axis tuples.

    A quantised weight (`jaxllm.quant`: a `qwix.QArray`, a `PackedNF4`) gets one of
    shardings: its codes and scales sharded as the weight along each dimension that divides
    the mesh axes (a block's scale lives with the block, a byte of two nf4 codes with them),
    replicated along one that does not (a scale per output channel has size 1 along the
    input axis; half of an input axis may not divide where the whole does)."""
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(
        abstract_tree, is_leaf=is_quantized
    )
    logical_leaves = treedef.flatten_up_to(logical_tree)
    shardings = []
    for (path, leaf), axes in zip(paths_and_leaves, logical_leaves, strict=True):
        sharding = named_sharding(mesh, leaf.shape, axes, rules, jax.tree_util.keystr(path))
        if is_quantized(leaf):
            sharding = jax.tree.map(lambda part, s=sharding: _fitted(s, part.shape), leaf)
        shardings.append(sharding)
    return jax.tree.unflatten(treedef, shardings)


def _fitted(sharding: NamedSharding, shape: Sequence[int]) -> NamedSharding:
    """`sharding` for an array of `shape` (same rank), replicated along each dimension
    that does not divide over its mesh axes."""
    mesh = sharding.mesh
    spec = []
    for size, entry in zip(shape, (*sharding.spec, *[None] * len(shape)), strict=False):
        mesh_axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
        spec.append(entry if size % math.prod(mesh.shape[a] for a in mesh_axes) == 0 else None)
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a (batch, seq) array: rows split over the data-parallel axes."""
    return NamedSharding(mesh, rules.spec(("batch", "act_seq")))


def row_sharding(mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of an array of any rank whose leading axis is rows: rows split over the
    data-parallel axes, the other axes whole (RL batches hold (B,) and (B, T) arrays)."""
    return NamedSharding(mesh, rules.spec(("batch",)))


def data_parallel_size(mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> int:
    """The devices a batch's rows are split over: the mesh axes "batch" maps to."""
    return math.prod(mesh.shape[axis] for axis in rules.mesh_axes("batch"))


def check_batch_fits(
    mesh: Mesh,
    batch_size: int,
    grad_accum: int = 1,
    rules: ShardingRules = DEFAULT_RULES,
    what: str = "train.batch_size",
) -> None:
    """Raises ConfigError unless every micro-batch (batch_size / grad_accum rows) splits
    evenly over the data-parallel devices. `what` names the rows' setting."""
    parts = data_parallel_size(mesh, rules)
    if batch_size % parts:
        raise ConfigError(
            f"{what}={batch_size} does not divide over {parts} data-parallel devices "
            f"(mesh axes {rules.mesh_axes('batch')}); use a multiple of {parts}"
        )
    micro_batch = batch_size // grad_accum
    if micro_batch % parts:
        raise ConfigError(
            f"a micro-batch of train.batch_size={batch_size} / train.grad_accum={grad_accum} = "
            f"{micro_batch} rows does not divide over {parts} data-parallel devices; make "
            f"batch_size / grad_accum a multiple of {parts}"
        )


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: ShardingRules) -> jax.Array:
    """Activation sharding constraint; a no-op when no mesh is set (plain single-device use)."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, rules.spec(logical_axes))


def unsharded(rules: ShardingRules, *logical_axes: str) -> bool:
    """True when no mesh is set, or every mesh axis these logical axes map to has size 1
    (so an array along them can be concatenated or split without moving data)."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = [axis for logical in logical_axes for axis in rules.mesh_axes(logical)]
    return mesh.empty or all(mesh.shape[axis] == 1 for axis in axes)


def put_rows_padded(
    batch: Mapping[str, Any], mesh: Mesh, rules: ShardingRules = DEFAULT_RULES
) -> dict:
    """`put_batch` for any number of rows: rows are added (copies of row 0) up to a
    multiple of the data-parallel devices; callers keep the results of the first rows."""
    parts = data_parallel_size(mesh, rules)
    rows = len(next(iter(batch.values())))
    extra = -rows % parts
    padded = {
        key: np.concatenate([np.asarray(v), np.repeat(np.asarray(v)[:1], extra, axis=0)])
        for key, v in batch.items()
    }
    return put_batch(padded, mesh, rules)


def put_batch(batch: Mapping[str, Any], mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> dict:
    """Place host arrays of rows ((B,), (B, T), ...) on the mesh, rows split over the
    data-parallel axes. Every process passes the whole batch and keeps its own rows."""
    sharding = row_sharding(mesh, rules)
    return {
        key: jax.make_array_from_callback(
            np.shape(value), sharding, lambda index, value=value: np.asarray(value)[index]
        )
        for key, value in batch.items()
    }
