"""QLoRA (`lora.base_dtype`): quantisation error bounds, nf4 codes packed two per byte (exact
round trip, half a byte per weight, qwix's dequantisation), step 0 equal to the dequantised
base, the frozen base stored quantised with no optimizer slots, one device equal to eight,
and a nf4 run that trains, resumes exactly and generates."""

from __future__ import annotations

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from helpers import (
    build,
    cpu_environment,
    finished_checkpoints,
    kill_9_after_first_checkpoint,
    random_batches,
    run_steps,
    tiny_config,
    tiny_sft_run,
)
from jax.sharding import PartitionSpec as P
from qwix._src.core.numerics import get_nf4_buckets

from jaxllm.checkpoint import Checkpointer
from jaxllm.cli import main as cli_main
from jaxllm.config import LoraConfig, MeshConfig
from jaxllm.lora import split_trainable, strip_adapters
from jaxllm.metrics import read_metrics
from jaxllm.model import LanguageModel
from jaxllm.quant import (
    INPUT_AXES,
    PackedNF4,
    dequantize,
    dequantize_params,
    is_quantized,
    pack_nf4,
    quantize_weight,
    unpack_nf4,
)
from jaxllm.sharding import make_mesh, tree_shardings
from jaxllm.stages.common import load_run, read_run_params
from jaxllm.state import (
    abstract_with_shardings,
    create_train_state,
    fresh_state,
    learning_rate_schedule,
    make_optimizer,
)
from jaxllm.steps import UpdateContext, causal_lm_loss, default_update, jit_update

MOE = ["model.num_experts=4", "model.experts_per_token=2", "model.expert_mlp_dim=32"]
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 300, (2, 12)), jnp.int32)


def test_nf4_code_book_values_round_trip_exactly():
    # Per output column j: 64 inputs, the 16 code book values x4, times a scale of 2^-j.
    buckets = np.asarray(get_nf4_buckets())
    column = np.tile(buckets, 4)
    weight = np.stack([column * 2.0**-j for j in range(3)], axis=1)[None]  # (L=1, D=64, F=3)
    stored = quantize_weight(jnp.asarray(weight, jnp.float32), "w_gate_df", "nf4")
    assert stored.qvalue.dtype == jnp.uint8 and stored.scale.dtype == jnp.bfloat16
    assert stored.shape == (1, 64, 3) and stored.qvalue.shape == (1, 32, 3)  # 2 codes a byte
    assert stored.scale.shape == (1, 1, 3)  # one block of 64 per column
    # Byte i holds code 2i (low nibble) and 2i + 1 (high nibble).
    expected_bytes = np.arange(0, 16, 2) | (np.arange(1, 16, 2) << 4)
    np.testing.assert_array_equal(np.asarray(stored.qvalue[0, :8, 0]), expected_bytes)
    np.testing.assert_array_equal(dequantize(stored, jnp.float32), weight)


@pytest.mark.parametrize(
    ("shape", "axis"),
    [((2, 6, 4, 8), -3), ((2, 4, 6, 8), -2), ((3, 7, 5), -2), ((9,), -1)],
    ids=["even", "middle", "odd", "one_axis"],
)
def test_packing_nf4_codes_round_trips_exactly(shape, axis):
    codes = jnp.asarray(np.random.default_rng(0).integers(0, 16, shape), jnp.uint8)
    packed = pack_nf4(codes, axis)
    halved = list(shape)
    halved[axis] = (shape[axis] + 1) // 2
    assert packed.dtype == jnp.uint8 and packed.shape == tuple(halved)
    np.testing.assert_array_equal(unpack_nf4(packed, axis, shape[axis]), codes)


@pytest.mark.parametrize(
    ("name", "shape"),
    [("wq_dnh", (2, 128, 4, 16)), ("wo_nhd", (2, 4, 16, 128)), ("w_down_fd", (2, 37, 8))],
    ids=["wq_dnh", "wo_nhd", "w_down_fd_odd"],
)
def test_nf4_dequantises_as_qwix_does_at_half_a_byte_per_weight(name, shape):
    """The packed weight dequantises exactly as qwix's own nf4 QArray (codes one per
    uint4); it holds half a byte of codes per weight (one padding code per row along an odd
    axis) and a bfloat16 scale per block of gcd(64, inputs)."""
    weight = jax.random.normal(jax.random.key(0), shape)
    stored = quantize_weight(weight, name, "nf4")
    assert isinstance(stored, PackedNF4) and stored.shape == shape
    block_axis = len(shape) - 1 + max(INPUT_AXES[name])  # of one layer
    inputs = shape[1:][block_axis]
    one_layer = qwix.quantize(
        weight[1],
        "nf4",
        channelwise_axes=tuple(a for a in range(len(shape) - 1) if a != block_axis),
        tiled_axes={block_axis: math.gcd(64, inputs)},
        scale_dtype=jnp.bfloat16,
    )
    np.testing.assert_array_equal(dequantize(stored)[1], qwix.dequantize(one_layer))
    rows = math.prod(shape) // inputs
    assert stored.qvalue.nbytes == (inputs + 1) // 2 * rows
    assert stored.scale.nbytes == 2 * math.prod(shape) // math.gcd(64, inputs)


def test_nf4_blocks_are_64_inputs_and_int8_errs_by_at_most_half_a_step():
    weight = jax.random.normal(jax.random.key(0), (2, 128, 4, 16))  # wq_dnh (L, D, N, H)
    nf4 = quantize_weight(weight, "wq_dnh", "nf4")
    assert nf4.scale.shape == (2, 2, 4, 16)  # D in blocks of 64
    # The largest |w| of each block is a code book end (+-1) times its scale: exact in bf16.
    blocks = np.asarray(weight).reshape(2, 2, 64, 4, 16)
    np.testing.assert_allclose(
        np.asarray(nf4.scale, np.float32), np.abs(blocks).max(axis=2), rtol=2**-8
    )
    int8 = quantize_weight(weight, "wq_dnh", "int8")
    assert int8.qvalue.dtype == jnp.int8 and int8.scale.shape == (2, 1, 4, 16)
    expected_scale = np.abs(weight).max(axis=1, keepdims=True) / 127.5
    np.testing.assert_allclose(int8.scale, expected_scale, rtol=1e-6)
    error = np.abs(np.asarray(dequantize(int8)) - np.asarray(weight))
    assert (error <= np.asarray(int8.scale) * (0.5 + 1e-5)).all()
    assert error.max() > 0.4 * float(int8.scale.min())  # the bound is not loose


def qlora_model(base_dtype: str, *overrides: str) -> LanguageModel:
    return LanguageModel(
        tiny_config(*overrides).model, lora=LoraConfig(rank=4, base_dtype=base_dtype)
    )


@pytest.mark.parametrize(
    ("base_dtype", "overrides"),
    [("nf4", []), ("int8", []), ("nf4", MOE), ("bfloat16", [])],
    ids=["nf4", "int8", "nf4_moe", "bfloat16"],
)
def test_step_0_is_the_dequantised_base_and_the_base_has_no_optimizer_slots(base_dtype, overrides):
    model = qlora_model(base_dtype, *overrides)
    cfg = tiny_config(*overrides)
    tx = make_optimizer(cfg.optimizer, model, 5)
    state = fresh_state(model, tx, 0)
    trainable, frozen = split_trainable(state.params, model.lora)
    for path, leaf in jax.tree_util.tree_leaves_with_path(frozen, is_leaf=is_quantized):
        name = path[-1].key
        if base_dtype != "bfloat16" and name in INPUT_AXES:
            kind = PackedNF4 if base_dtype == "nf4" else qwix.QArray
            assert isinstance(leaf, kind), name
            assert leaf.qvalue.dtype == (jnp.uint8 if base_dtype == "nf4" else jnp.int8)
        else:
            assert leaf.dtype == jnp.bfloat16, name
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(trainable))
    # Adam's two moments hold the trainable leaves only.
    moments = [leaf.size for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim]
    assert sum(moments) == 2 * sum(leaf.size for leaf in jax.tree.leaves(trainable))
    assert model.abstract_params == jax.eval_shape(lambda: state.params)
    # Counted as weights, not as bytes of codes.
    assert model.param_count() == qlora_model("float32", *overrides).param_count()

    base = dequantize_params(strip_adapters(state.params), jnp.float32)
    np.testing.assert_array_equal(
        model.logits(state.params, TOKENS), model.base.logits(base, TOKENS)
    )
    # The sampler's merged weights are that base too (the adapters' B is zero).
    merged = model.sampling_params(state.params)
    assert all(leaf.dtype == model.dtype for leaf in jax.tree.leaves(merged))
    up = "w_up_edf" if overrides else "w_up_df"
    np.testing.assert_array_equal(merged["blocks"]["mlp"][up], base["blocks"]["mlp"][up])


def test_a_step_does_not_keep_a_dequantised_copy_of_the_base():
    """The compiled step's temp memory (remat full): dequantised weights are recomputed per
    layer in the backward pass, not saved for it (16 layers of ~4 MiB of float32 weights)."""
    overrides = [
        "model.num_layers=16",
        "model.embed_dim=256",
        "model.mlp_dim=1024",
        "model.remat=full",
    ]
    cfg = tiny_config(*overrides)
    temps = {}
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    batch = random_batches(1, batch_size=2, seq_len=16)[0]
    for base_dtype in ("float32", "nf4"):
        model = qlora_model(base_dtype, *overrides)
        tx = make_optimizer(cfg.optimizer, model, 5)
        state, shardings = create_train_state(model, tx, mesh, 0)
        schedule = learning_rate_schedule(cfg.optimizer, 5)
        context = UpdateContext(model, tx, schedule, causal_lm_loss, 1)
        update = jit_update(default_update(context), mesh, shardings, model)
        with jax.set_mesh(mesh):
            compiled = update.lower(state, batch).compile()
        temps[base_dtype] = compiled.memory_analysis().temp_size_in_bytes
    block_bytes = 16 * 4 * (4 * 256 * 256 + 3 * 256 * 1024)
    assert temps["nf4"] < temps["float32"] + block_bytes / 4, (temps, block_bytes)


def test_eight_devices_train_as_one():
    """Also where packed nf4 codes cannot shard as their weight: mlp_dim 346 shards over
    tensor=2, its 173 bytes of codes of w_down_fd (L, F, D) do not (replicated there)."""
    overrides = ["model.mlp_dim=346"]
    cfg = tiny_config(*overrides)
    batches = random_batches(3)
    losses = {}
    for shape in ((1, 1, 1), (2, 2, 2)):
        model = qlora_model("nf4", *overrides)
        _, _, state, _, step = build(cfg, shape, model)
        _, losses[shape] = run_steps(step, state, batches)
    mlp = state.params["blocks"]["mlp"]
    assert mlp["w_down_fd"].qvalue.sharding.spec == P(None, None, "fsdp")
    assert mlp["w_gate_df"].qvalue.sharding.spec == P(None, "fsdp", "tensor")
    np.testing.assert_allclose(losses[(2, 2, 2)], losses[(1, 1, 1)], rtol=1e-5)


# --- a run ---------------------------------------------------------------------------------

COMMAND = [sys.executable, "-m", "jaxllm.cli"]


def qlora_argv(base, out_dir) -> list[str]:
    return [
        "sft",
        f"sft.init_from={base}",
        "data.path=builtin",
        "sft.builtin_examples=64",
        "sft.eval_prompts=0",
        "train.batch_size=8",
        "train.seq_len=64",
        "train.samples=0",
        "train.steps=6",
        "train.eval_every=6",
        "train.eval_at_start=true",
        "checkpoint.every=3",
        f"out_dir={out_dir}",
        "lora.rank=4",
        "lora.base_dtype=nf4",
        "optimizer.lr=1e-2",
        "optimizer.warmup_steps=0",
    ]


def saved_params(out_dir, step: int) -> dict:
    checkpointer = Checkpointer(out_dir / "checkpoints", read_only=True)
    try:
        return checkpointer.manager.restore(step)["state"]["params"]
    finally:
        checkpointer.close()


def test_a_nf4_run_trains_resumes_exactly_and_generates(tmp_path):
    base = tmp_path / "base"
    tiny_sft_run(base)
    run = tmp_path / "run"
    subprocess.run(
        [*COMMAND, *qlora_argv(base, run)], env=cpu_environment(1), check=True, capture_output=True
    )
    evals = {
        r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "eval"
    }
    assert evals[6] < evals[0] - 0.05, evals
    saved = saved_params(run, 6)
    assert saved["blocks"]["attention"]["wq_dnh"]["qvalue"].dtype == np.uint8  # as Orbax keeps it

    killed = tmp_path / "killed"
    kill_9_after_first_checkpoint([*COMMAND, *qlora_argv(base, killed)], killed)
    assert finished_checkpoints(killed) == [3]
    subprocess.run(
        [*COMMAND, *qlora_argv(base, killed)],
        env=cpu_environment(1),
        check=True,
        capture_output=True,
    )
    for a, b in zip(jax.tree.leaves(saved_params(killed, 6)), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(a, b)

    argv = ["generate", "--checkpoint", str(run), "--prompt", "hi", "--max-new-tokens", "4"]
    assert cli_main(argv) == 0

    # A later stage starts from the merged model: the packed base read back, dequantised.
    loaded = load_run(run)
    assert isinstance(loaded.params["blocks"]["mlp"]["w_up_df"], PackedNF4)
    base = loaded.model.base
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    shardings = tree_shardings(mesh, base.abstract_params, base.logical_axes, base.rules)
    abstract = abstract_with_shardings(base.abstract_params, shardings)
    merged = read_run_params(run, abstract, None, "sft.init_from")
    expected = loaded.model.merged_params(loaded.params)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_a_quantised_base_without_qwix_installed_is_one_clear_error(monkeypatch):
    from jaxllm.errors import UserError
    from jaxllm.quant import quantize_weight

    monkeypatch.setitem(sys.modules, "qwix", None)  # `import qwix` raises ImportError
    with pytest.raises(UserError, match=r"lora.base_dtype=nf4 quantises the base with .* qwix"):
        quantize_weight(jnp.ones((1, 64, 8)), "wq_dnh", "nf4")
