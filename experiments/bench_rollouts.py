"""Rollout throughput: jaxllm's `Generator` against Hugging Face `transformers` `generate`.

    python experiments/bench_rollouts.py --preset shakespeare --batch-size 1 16 32 64 128
    python experiments/bench_rollouts.py --preset gpt2_124m --batch-size 8 --prompt-len 64 \
        --new-tokens 32

Both sides get random-init models of the same shape (the Llama block: `LlamaForCausalLM`
in float32 on CPU torch), random prompts of `--prompt-len` tokens and greedy decoding of
exactly `--new-tokens` tokens (no stop tokens). A figure is the whole call (prefill +
decode, results back on the host) as new tokens per second, the best of `--repeats` timed
calls after one warm-up call; the two sides alternate batch by batch so both see the same
machine load. The `transformers` side needs the `bench` extra (`pip install -e .[bench]`);
without it that column says so and the jaxllm column is still measured.

`--cpu-devices N` splits the host CPU into N JAX devices and the rows over them (a data
mesh; params replicated): one XLA:CPU device runs a decode step's small ops one after
another on one core, while torch spreads each op over its threads.
"""

from __future__ import annotations

import argparse
import os
import time


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="shakespeare")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 16, 32, 64, 128])
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--cpu-devices", type=int, default=1, help="JAX CPU devices to split the rows over"
    )
    parser.add_argument("overrides", nargs="*", help="extra dotted.key=value overrides")
    args = parser.parse_args()
    if args.cpu_devices < 1:
        parser.error(f"--cpu-devices {args.cpu_devices} must be at least 1")
    return args


ARGS = parse_args()
if ARGS.cpu_devices > 1:  # before JAX starts
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={ARGS.cpu_devices}"
    )

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxllm.config import MeshConfig, ModelConfig, load_config  # noqa: E402
from jaxllm.generate import Generator  # noqa: E402
from jaxllm.model import LanguageModel  # noqa: E402
from jaxllm.sharding import make_mesh, replicated  # noqa: E402


def best_time_s(function, repeats: int) -> float:
    function()  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def hf_model(cfg: ModelConfig):
    """A random-init `LlamaForCausalLM` of the same shape, or None without transformers."""
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    torch.manual_seed(0)
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.embed_dim,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.resolved_head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
    )
    return LlamaForCausalLM(hf_cfg).eval()


def hf_generate_time_s(model, prompts_bp: np.ndarray, new_tokens: int, repeats: int) -> float:
    import torch

    input_ids = torch.as_tensor(prompts_bp)

    def call():
        with torch.no_grad():
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        assert out.shape[1] == prompts_bp.shape[1] + new_tokens

    return best_time_s(call, repeats)


def main(args: argparse.Namespace) -> None:
    cfg = load_config(None, [f"preset={args.preset}", *args.overrides]).model
    needed = args.prompt_len + args.new_tokens
    if cfg.max_seq_len < needed:
        print(f"# model.max_seq_len {cfg.max_seq_len} -> {needed} to fit prompt + new tokens")
        cfg = load_config(
            None, [f"preset={args.preset}", *args.overrides, f"model.max_seq_len={needed}"]
        ).model
    model = LanguageModel(cfg)
    params = jax.jit(model.init)(jax.random.key(0))
    mesh = None
    if args.cpu_devices > 1:
        mesh = make_mesh(MeshConfig(data=args.cpu_devices, fsdp=1, tensor=1))
        params = jax.device_put(params, replicated(mesh))
    generator = Generator(model, cfg.vocab_size, 0, args.new_tokens, mesh=mesh)
    reference = hf_model(cfg)
    device = jax.devices()[0]
    print(
        f"# {device.device_kind} ({device.platform}), jax {jax.__version__}; {args.preset} "
        f"({model.param_count() / 1e6:.3g}M params, {cfg.dtype}); greedy, "
        f"{args.prompt_len}-token prompts, {args.new_tokens} new tokens; whole call, best of "
        f"{args.repeats}" + (f"; rows split over {args.cpu_devices} CPU devices" if mesh else "")
    )
    if reference is None:
        print("# transformers is not installed (pip install -e .[bench]): jaxllm side only")
    else:
        import torch
        import transformers

        print(
            f"# transformers {transformers.__version__}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), LlamaForCausalLM float32"
        )
    key = jax.random.key(0)
    print("batch | jaxllm tokens/s | transformers tokens/s | jaxllm / transformers")
    print("---|---|---|---")
    for batch in args.batch_size:
        prompts_bp = np.random.default_rng(batch).integers(
            1, cfg.vocab_size, (batch, args.prompt_len)
        )
        prompts = prompts_bp.tolist()
        jax_s = best_time_s(
            lambda prompts=prompts: generator(params, prompts, key, temperature=0.0),
            args.repeats,
        )
        jax_rate = batch * args.new_tokens / jax_s
        if reference is None:
            print(f"{batch} | {jax_rate:,.0f} | (not installed) | -", flush=True)
            continue
        hf_s = hf_generate_time_s(reference, prompts_bp, args.new_tokens, args.repeats)
        hf_rate = batch * args.new_tokens / hf_s
        print(f"{batch} | {jax_rate:,.0f} | {hf_rate:,.0f} | {jax_rate / hf_rate:.2f}x", flush=True)


if __name__ == "__main__":
    main(ARGS)
