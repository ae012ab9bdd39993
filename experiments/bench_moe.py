"""Tokens/s of the mixture-of-experts MLP against a dense SwiGLU of the same active size.

    python experiments/bench_moe.py [--width 256] [--experts 8] [--top-k 2]
        [--expert-mlp-dim 256] [--tokens 2048]

Times one layer's forward + backward (the gradient of a sum of its outputs with respect to
its params and input), jitted, on the default device. The dense layer has
mlp_dim = top_k x expert_mlp_dim, so both run the same matmul FLOPs per token; the MoE
adds routing, the sort by expert and, on CPU, the padding of each expert's rows to whole
blocks. A second table times one grouped matmul alone: the blocked form the layer uses on
CPU, `jax.lax.ragged_dot` (what it uses on GPU/TPU), and one dense matmul of as many rows.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.model import GatedMLP
from jaxllm.moe import MoE, grouped_matmul_blocked, grouped_matmul_ragged
from jaxllm.sharding import DEFAULT_RULES


def seconds_per_call(fn, *args, repeats: int = 10) -> float:
    jax.block_until_ready(fn(*args))  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / repeats


def forward_backward_seconds(module: nnx.Module, x_btd: jax.Array, returns_stats: bool) -> float:
    graphdef, state = nnx.split(module)
    params = nnx.to_pure_dict(state)

    def total(params, x_btd):
        out = nnx.merge(graphdef, nnx.State(params))(x_btd)
        return jnp.sum(out[0] if returns_stats else out)

    return seconds_per_call(jax.jit(jax.grad(total, argnums=(0, 1))), params, x_btd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-mlp-dim", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()

    moe_cfg = ModelConfig(
        embed_dim=args.width,
        num_experts=args.experts,
        experts_per_token=args.top_k,
        expert_mlp_dim=args.expert_mlp_dim,
    )
    dense_cfg = ModelConfig(embed_dim=args.width, mlp_dim=args.top_k * args.expert_mlp_dim)
    x_btd = jax.random.normal(jax.random.key(0), (args.tokens // 256, 256, args.width))
    dense = GatedMLP(dense_cfg, DEFAULT_RULES, nnx.Rngs(0))
    moe = MoE(moe_cfg, DEFAULT_RULES, nnx.Rngs(0))
    layers = [
        (f"dense SwiGLU, mlp_dim={dense_cfg.mlp_dim}", dense, False),
        (f"MoE, {args.experts} experts x {args.expert_mlp_dim}, top-{args.top_k}", moe, True),
    ]
    print(f"device: {jax.devices()[0].device_kind}, {args.tokens} tokens, width {args.width}")
    print(f"{'layer (forward + backward)':<42} {'ms':>8} {'tokens/s':>10}")
    for name, module, returns_stats in layers:
        seconds = forward_backward_seconds(module, x_btd, returns_stats)
        print(f"{name:<42} {seconds * 1e3:8.2f} {args.tokens / seconds:10.0f}")

    rows = args.tokens * args.top_k
    rows_rd = jax.random.normal(jax.random.key(1), (rows, args.width))
    weights_shape = (args.experts, args.width, args.expert_mlp_dim)
    weights_edf = jax.random.normal(jax.random.key(2), weights_shape)
    group_sizes_e = jnp.full((args.experts,), rows // args.experts, jnp.int32)
    matmuls = [
        ("grouped, blocked (the CPU path)", jax.jit(grouped_matmul_blocked)),
        ("grouped, jax.lax.ragged_dot", jax.jit(grouped_matmul_ragged)),
        ("one dense matmul, same rows", jax.jit(lambda r, w, _: r @ w[0])),
    ]
    print(f"\n{'one (R, D) x (D, F) matmul, R=' + str(rows):<42} {'ms':>8}")
    for name, fn in matmuls:
        seconds = seconds_per_call(fn, rows_rd, weights_edf, group_sizes_e)
        print(f"{name:<42} {seconds * 1e3:8.2f}")


if __name__ == "__main__":
    main()
