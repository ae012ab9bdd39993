"""Decode throughput of the KV-cache sampler against batch size and context length.

    python experiments/bench_decode.py --preset shakespeare --batch-size 1 8 32 \
        --context 16 48 --new-tokens 16

For each (batch, context): prefill time, then decode tokens/s over `--new-tokens` greedy
steps (total time minus prefill), beside the memory-bandwidth bound: every decode step
reads all parameters and the whole preallocated KV cache once, so at best
tokens/s = batch / ((param bytes + cache bytes) / bandwidth). Bandwidth is the datasheet
figure on GPUs/TPUs and a measured elementwise read+write rate on CPU.
"""

from __future__ import annotations

import argparse
import itertools
import time

import jax
import numpy as np

from jaxllm.config import load_config
from jaxllm.generate import Generator
from jaxllm.metrics import decode_bound_tokens_per_sec, memory_bandwidth
from jaxllm.model import LanguageModel


def timed(function, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(function(*args))
    return time.perf_counter() - start


def measure(
    model, params, batch: int, context: int, new_tokens: int, bandwidth: float, phases=None
) -> str:
    generator = Generator(model, model.cfg.vocab_size, 0, new_tokens, decode_phases=phases)
    prompts = np.random.default_rng(0).integers(1, model.cfg.vocab_size, (batch, context))
    prompt_bp, lengths_b = generator._left_pad(prompts.tolist(), batch)
    slots = prompt_bp.shape[1] + new_tokens
    key = jax.random.key(0)

    def run():
        return generator(params, prompts.tolist(), key, temperature=0.0).tokens

    run()  # compile
    generator._prefill(params, prompt_bp, lengths_b, slots)
    prefill_s = min(
        timed(generator._prefill, params, prompt_bp, lengths_b, slots) for _ in range(3)
    )
    total_s = min(timed(run) for _ in range(3))
    decode_s = max(total_s - prefill_s, 1e-9)
    tokens_per_s = batch * new_tokens / decode_s

    bound = decode_bound_tokens_per_sec(model, batch, slots, bandwidth)
    return (
        f"{batch} | {context} | {slots} | {prefill_s * 1e3:.1f} | "
        f"{decode_s / new_tokens * 1e3:.2f} | {tokens_per_s:,.0f} | {bound:,.0f} | "
        f"{tokens_per_s / bound:.0%}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="shakespeare")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--context", type=int, nargs="+", default=[16, 48])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument(
        "--decode-phases", type=int, default=None, help="Generator decode_phases (default: its)"
    )
    parser.add_argument("overrides", nargs="*", help="extra dotted.key=value overrides")
    args = parser.parse_args()
    cfg = load_config(None, [f"preset={args.preset}", *args.overrides])
    model = LanguageModel(cfg.model)
    params = jax.jit(model.init)(jax.random.key(0))
    device = jax.devices()[0]
    bandwidth = memory_bandwidth(device)
    print(
        f"# {device.device_kind} ({device.platform}), jax {jax.__version__}; {args.preset} "
        f"({model.param_count() / 1e6:.3g}M params, {cfg.model.dtype}); bandwidth "
        f"{bandwidth / 1e9:.0f} GB/s; greedy, {args.new_tokens} new tokens"
    )
    print("# bound = batch / ((param bytes + whole KV cache bytes) / bandwidth) per step")
    print(
        "batch | context | cache slots | prefill ms | ms/step | tokens/s | bound tokens/s "
        "| of bound"
    )
    for batch, context in itertools.product(args.batch_size, args.context):
        line = measure(
            model, params, batch, context, args.new_tokens, bandwidth, args.decode_phases
        )
        print(line, flush=True)


if __name__ == "__main__":
    main()
