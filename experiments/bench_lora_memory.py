"""Train-state bytes and peak step memory of full fine-tuning, LoRA and QLoRA, and CPU step
times of full fine-tuning against LoRA, as the tables of docs/benchmarks.md.

    python experiments/bench_lora_memory.py

Memory: the train step of `jaxllm.steps` (AdamW, causal-LM loss) compiled for one CPU
device from abstract inputs only (ShapeDtypeStructs: nothing of the 8B model is
allocated), read from XLA's `memory_analysis()`:

- train state = the bytes of params + optimizer state (the step's donated argument);
- peak step = argument + output - alias + temp bytes (the donated state aliases the new
  one, so it counts once; temp holds activations, gradients and one layer's dequantised
  weights).

Rows: preset llama_1b and an 8B Llama-3 shape (32 layers, width 4096, 32 heads, 8 kv
heads, MLP 14336, vocabulary 128256, untied embeddings), one row of `SEQ_LEN` tokens,
bfloat16 compute (float32 params cast once per step, as on accelerators), remat "full"
(each layer's activations recomputed in the backward pass); full fine-tuning,
LoRA r=16 on every projection (float32 and bfloat16 base), QLoRA nf4 r=16.

Time: the median of `TIMED_STEPS` CPU steps of preset gpt2_124m, full fine-tuning against
LoRA r=16, a batch of 2 x 128 tokens.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import numpy as np

from jaxllm.config import MODEL_PRESETS, LoraConfig, MeshConfig, ModelConfig, OptimizerConfig
from jaxllm.losses import lm_batch_from_rows
from jaxllm.model import LanguageModel
from jaxllm.sharding import make_mesh
from jaxllm.state import (
    abstract_with_shardings,
    create_train_state,
    fresh_state,
    learning_rate_schedule,
    make_optimizer,
    state_shardings,
)
from jaxllm.steps import UpdateContext, causal_lm_loss, default_update, jit_update

SEQ_LEN = 2048
TIMED_STEPS = 5
GIB = 2**30

LLAMA3_8B = ModelConfig(
    vocab_size=128_256,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    embed_dim=4096,
    mlp_dim=14_336,
    max_seq_len=SEQ_LEN,
    rope_theta=500_000.0,
    tie_embeddings=False,
)
SETUPS = {
    "full fine-tuning": None,
    "LoRA r=16, float32 base": LoraConfig(rank=16),
    "LoRA r=16, bfloat16 base": LoraConfig(rank=16, base_dtype="bfloat16"),
    "QLoRA nf4 r=16": LoraConfig(rank=16, base_dtype="nf4"),
}


def abstract_batch(rows: int, seq_len: int) -> dict:
    batch = lm_batch_from_rows(np.zeros((rows, seq_len + 1), np.int32))
    return {key: jax.ShapeDtypeStruct(value.shape, value.dtype) for key, value in batch.items()}


def setup(cfg: ModelConfig, lora: LoraConfig | None):
    """(model, optimizer, mesh, abstract state with shardings, the jitted update)."""
    model = LanguageModel(cfg, lora=lora)
    optimizer = OptimizerConfig()
    tx = make_optimizer(optimizer, model, total_steps=100)
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    shapes = jax.eval_shape(lambda: fresh_state(model, tx, 0))
    shardings = state_shardings(model, tx, mesh, shapes)
    context = UpdateContext(model, tx, learning_rate_schedule(optimizer, 100), causal_lm_loss, 1)
    update = jit_update(default_update(context), mesh, shardings, model)
    return model, tx, mesh, abstract_with_shardings(shapes, shardings), update


def gib(tree) -> float:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree)) / GIB


def memory_row(cfg: ModelConfig, lora: LoraConfig | None) -> tuple[float, float, float, float]:
    """(train state GiB, its trainable params and optimizer state GiB, peak step GiB,
    compile seconds) of one setup, from abstract inputs."""
    model, _, mesh, state, update = setup(cfg, lora)
    trainable = (model.split_trainable(state.params)[0], state.opt_state)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = update.lower(state, abstract_batch(1, SEQ_LEN)).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    peak = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    return gib((state.params, state.opt_state)), gib(trainable), peak / GIB, seconds


def step_time_s(cfg: ModelConfig, lora: LoraConfig | None) -> float:
    """Median seconds of `TIMED_STEPS` CPU steps (after one to compile), batch 2 x 128."""
    model, tx, mesh, _, update = setup(cfg, lora)
    state, _ = create_train_state(model, tx, mesh, 0)
    rows = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 129))
    batch = lm_batch_from_rows(rows)
    times = []
    with jax.set_mesh(mesh):
        for _ in range(TIMED_STEPS + 1):
            start = time.perf_counter()
            state, metrics = update(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    models = {
        name: dataclasses.replace(cfg, remat="full", dtype="bfloat16")
        for name, cfg in (("llama_1b", MODEL_PRESETS["llama_1b"]), ("Llama-3 8B shape", LLAMA3_8B))
    }
    print(
        f"Memory: one row of {SEQ_LEN} tokens, bfloat16 compute, remat full, AdamW, one CPU "
        "device.\n"
    )
    print(
        "| model | setup | train state (GiB) | of it trainable + optimizer (GiB) "
        "| peak step (GiB) | compile (s) |"
    )
    print("|---|---|---|---|---|---|")
    full_state = {}
    for name, cfg in models.items():
        for setup_name, lora in SETUPS.items():
            state_gib, trainable_gib, peak_gib, seconds = memory_row(cfg, lora)
            if lora is None:
                full_state[name] = state_gib
            ratio = "" if lora is None else f" ({full_state[name] / state_gib:.1f}x smaller)"
            print(
                f"| {name} | {setup_name} | {state_gib:.2f}{ratio} | {trainable_gib:.3f} "
                f"| {peak_gib:.2f} "
                f"| {seconds:.0f} |",
                flush=True,
            )
    cfg = MODEL_PRESETS["gpt2_124m"]
    print(f"\nCPU step time, gpt2_124m, batch 2 x 128, median of {TIMED_STEPS} steps:\n")
    print("| setup | step (s) |")
    print("|---|---|")
    for setup_name, lora in (("full fine-tuning", None), ("LoRA r=16", LoraConfig(rank=16))):
        print(f"| {setup_name} | {step_time_s(cfg, lora):.3f} |", flush=True)


if __name__ == "__main__":
    main()
