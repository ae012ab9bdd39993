"""Decode throughput of the KV-cache sampler against batch size and context length.

    python experiments/bench_decode.py --preset shakespeare --batch-size 1 8 32 \
        --context 16 48 --new-tokens 16

For each (batch, context): prefill time, then decode tokens/s over `--new-tokens` greedy
steps (total time minus prefill), beside the memory-bandwidth bound: every decode step
reads all parameters and the whole preallocated KV cache once, so at best
tokens/s = batch / ((param bytes + cache bytes) / bandwidth). Bandwidth is the datasheet
figure on GPUs/TPUs and a measured elementwise read+write rate on CPU.

`--loop host` times the same steps driven from Python instead of `Generator`'s
`lax.while_loop`: one compiled call per token (model step and greedy argmax; params cast
and layers sliced once; the cache donated), dispatched without waiting, so the device runs
each step as one top-level executable (on a GPU, one that XLA can replay as CUDA graphs).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import load_config
from jaxllm.generate import Generator, first_argmax
from jaxllm.metrics import decode_bound_tokens_per_sec, memory_bandwidth
from jaxllm.model import LanguageModel


def timed(function, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(function(*args))
    return time.perf_counter() - start


def host_driven(generator: Generator, params, prompt_bp, lengths_b, slots: int):
    """A function running `max_new_tokens` greedy steps from Python, one call each."""
    model, new_tokens = generator.model, generator.max_new_tokens
    compute = jax.jit(model.compute_params)(params)
    layers = jax.jit(model.layer_params)(compute)

    @functools.partial(jax.jit, donate_argnums=2)
    def step(layers, logits_bv, cache, position_b):
        token_b = first_argmax(logits_bv).astype(jnp.int32)
        logits_bv, cache = generator._decode_one(compute, cache, token_b, position_b, layers)
        return logits_bv, cache

    def run():
        logits_bv, cache = generator._prefill(params, prompt_bp, lengths_b, slots)
        for i in range(new_tokens):
            logits_bv, cache = step(layers, logits_bv, cache, lengths_b + i)
        return logits_bv

    return run


def measure(
    model,
    params,
    batch: int,
    context: int,
    new_tokens: int,
    bandwidth: float,
    phases=None,
    loop: str = "device",
) -> str:
    generator = Generator(model, model.cfg.vocab_size, 0, new_tokens, decode_phases=phases)
    prompts = np.random.default_rng(0).integers(1, model.cfg.vocab_size, (batch, context))
    prompt_bp, lengths_b = generator._left_pad(prompts.tolist(), batch)
    slots = prompt_bp.shape[1] + new_tokens
    key = jax.random.key(0)

    def run():
        return generator(params, prompts.tolist(), key, temperature=0.0).tokens

    if loop == "host":
        run = host_driven(generator, params, prompt_bp, lengths_b, slots)

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
    parser.add_argument(
        "--loop",
        choices=["device", "host"],
        default="device",
        help="decode in Generator's lax.while_loop, or one compiled call per token",
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
        f"{bandwidth / 1e9:.0f} GB/s; greedy, {args.new_tokens} new tokens; {args.loop} loop"
    )
    print("# bound = batch / ((param bytes + whole KV cache bytes) / bandwidth) per step")
    print(
        "batch | context | cache slots | prefill ms | ms/step | tokens/s | bound tokens/s "
        "| of bound"
    )
    for batch, context in itertools.product(args.batch_size, args.context):
        line = measure(
            model,
            params,
            batch,
            context,
            args.new_tokens,
            bandwidth,
            args.decode_phases,
            args.loop,
        )
        print(line, flush=True)


if __name__ == "__main__":
    main()
