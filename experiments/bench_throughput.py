"""Training throughput: model size x sequence length x batch x remat x attention backend.

    python experiments/bench_throughput.py --preset gpt2_124m llama_1b --seq-len 2048 \
        --batch-size 8 --remat none dots --attention cudnn --dtype bfloat16

For each combination: compile time, median step time, tokens/s (all devices and per
device), MFU and device memory (from the compiled step) of the full train step (forward,
backward, AdamW) on synthetic tokens over all devices (mesh fsdp = all).
MFU = 6N + 12·L·H·Q·T FLOPs per token (PaLM, appendix B) x tokens/s / peak FLOP/s; peaks
are dense bf16 datasheet figures for GPUs/TPUs and a measured float32 matmul rate on CPU.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import time

import jax
import numpy as np

from jaxllm.config import load_config
from jaxllm.losses import lm_batch_from_rows
from jaxllm.metrics import peak_flops
from jaxllm.model import LanguageModel
from jaxllm.sharding import make_mesh, put_batch
from jaxllm.state import create_train_state, learning_rate_schedule, make_optimizer
from jaxllm.steps import UpdateContext, causal_lm_loss, default_update, jit_update

COLUMNS = (
    "preset",
    "params",
    "seq",
    "batch",
    "remat",
    "attn",
    "dtype",
    "compile s",
    "step ms",
    "tok/s",
    "tok/s/dev",
    "MFU",
    "step GiB",
)


def step_memory_gib(executable) -> float:
    """Device memory the compiled step needs: arguments + outputs + temporaries - donated."""
    memory = executable.memory_analysis()
    if memory is None:
        return float("nan")
    total = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    return total / 2**30


def measure(preset, seq_len, batch_size, remat, attention, dtype, steps, extra) -> dict:
    cfg = load_config(
        None,
        [
            f"preset={preset}",
            f"model.max_seq_len={max(seq_len, 1)}",
            f"train.seq_len={seq_len}",
            f"train.batch_size={batch_size}",
            f"model.remat={remat}",
            f"model.attention={attention}",
            f"model.dtype={dtype}",
            "mesh.data=1",
            "mesh.fsdp=-1",
            "mesh.tensor=1",
            *extra,
        ],
    )
    model = LanguageModel(cfg.model)
    mesh = make_mesh(cfg.mesh)
    tx = make_optimizer(cfg.optimizer, model, cfg.train.steps)
    state, shardings = create_train_state(model, tx, mesh, seed=0)
    schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
    step = jit_update(
        default_update(UpdateContext(model, tx, schedule, causal_lm_loss, 1)),
        mesh,
        shardings,
        model,
    )
    rows = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (batch_size, seq_len + 1))
    batch = put_batch(lm_batch_from_rows(rows), mesh)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        executable = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    for _ in range(2):
        state, metrics = executable(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = executable(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    devices = list(mesh.devices.flat)
    tokens_per_s = batch_size * seq_len / step_s
    mfu = model.flops_per_token(seq_len) * tokens_per_s / peak_flops(devices)
    result = {
        "preset": preset,
        "params": f"{model.param_count() / 1e6:.3g}M",
        "seq": seq_len,
        "batch": batch_size,
        "remat": remat,
        "attn": attention,
        "dtype": dtype,
        "compile s": f"{compile_s:.1f}",
        "step ms": f"{step_s * 1e3:.1f}",
        "tok/s": f"{tokens_per_s:,.0f}",
        "tok/s/dev": f"{tokens_per_s / len(devices):,.0f}",
        "MFU": f"{mfu:.1%}",
        "step GiB": f"{step_memory_gib(executable):.1f}",
        "loss": float(metrics["loss"]),
    }
    del state, executable, batch
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", nargs="+", default=["tiny"])
    parser.add_argument("--seq-len", type=int, nargs="+", default=[64])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[8])
    parser.add_argument("--remat", nargs="+", default=["none"])
    parser.add_argument("--attention", nargs="+", default=["xla"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per combination")
    parser.add_argument("overrides", nargs="*", help="extra dotted.key=value config overrides")
    args = parser.parse_args()

    devices = jax.devices()
    print(
        f"# {len(devices)} x {devices[0].device_kind} ({devices[0].platform}); peak "
        f"{peak_flops(devices) / 1e12:.2f} TFLOP/s for MFU; jax {jax.__version__}"
    )
    print("# MFU = (6N + 12*L*H*Q*T) FLOPs/token x tokens/s / peak (PaLM appendix B)")
    print(" | ".join(COLUMNS))
    for combination in itertools.product(
        args.preset, args.seq_len, args.batch_size, args.remat, args.attention
    ):
        try:
            result = measure(*combination, args.dtype, args.steps, args.overrides)
        except Exception as error:  # one failed combination (OOM, say) must not end the table
            print(
                " | ".join(map(str, combination)) + f" | failed: {str(error).splitlines()[0]}",
                flush=True,
            )
            gc.collect()
            continue
        print(" | ".join(str(result[column]) for column in COLUMNS), flush=True)


if __name__ == "__main__":
    main()
