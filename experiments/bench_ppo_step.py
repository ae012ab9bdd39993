"""Where a PPO iteration's time goes: rollout, scoring, and the minibatch updates.

    python experiments/bench_ppo_step.py [--preset shakespeare] [--batch-size 32] [key=value ...]
    python experiments/bench_ppo_step.py --preset llama_1b model.dtype=bfloat16   # a GPU

Random-init models of the preset's shape (the policy with its value head, a reward model
of the same shape), random prompts of `--prompt-len` tokens, rollouts of exactly
`--new-tokens` tokens sampled at temperature 1 (no stop token). Timed, best of `--repeats`
after a warm-up call, each with its results on the host:
- rollout: the `Generator` call;
- scoring: `prepare` compiled alone (the policy's log-probs and values, the reference's
  log-probs, the reward model's score, GAE and whitening);
- update: the stage's whole compiled update (`prepare` + epochs x minibatches optimizer
  steps), as `jaxllm ppo` runs it; minibatch steps = update - scoring.

Beside the times: the rollout's tokens/s against the decode bound, batch / ((param bytes +
whole KV cache bytes) / memory bandwidth) per step. Prefill inside the rollout's time
lowers the fraction; decoding in phases (the CPU default past 64 new tokens) reads less
than the whole cache and raises it; on a CPU a small model's weights and cache sit in its
caches, so the bound, from DRAM bandwidth, does not bind there. And the update's MFU,
FLOPs / time / one device's peak, with per-token FLOPs from
`LanguageModel.flops_per_token` (PaLM's 6N + attention) split into the body (all P + N
positions) and the LM head (the N reply positions only, where the code computes logits):
    FLOPs = (epochs + 1) x body x B x (P + N) + (6 epochs + 4) x V x D x B x N
(per epoch a forward and backward pass; for scoring three forward passes of the body,
policy, reference and reward model, and two of the head, policy and reference).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import PPOConfig, load_config
from jaxllm.generate import Generator
from jaxllm.metrics import decode_bound_tokens_per_sec, memory_bandwidth, peak_flops
from jaxllm.model import LanguageModel
from jaxllm.rl.rollouts import rollout_rows
from jaxllm.stages.ppo import Settings, ppo_loss, ppo_update, prepare
from jaxllm.state import fresh_state, learning_rate_schedule, make_optimizer
from jaxllm.steps import UpdateContext


def best_time_s(function, repeats: int) -> float:
    jax.block_until_ready(function())  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(function())
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="shakespeare")
    parser.add_argument("--batch-size", type=int, default=32, help="rollouts per iteration")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--minibatches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="extra dotted.key=value overrides")
    args = parser.parse_args()
    p, n, b = args.prompt_len, args.new_tokens, args.batch_size
    overrides = [*args.overrides, f"model.max_seq_len={p + n}", f"train.seq_len={p + n}"]
    cfg = load_config(None, [f"preset={args.preset}", *overrides])
    model = LanguageModel(dataclasses.replace(cfg.model, scalar_heads=["value"]))
    reward_model = model.with_heads(["reward"])
    vocab = cfg.model.vocab_size
    tx = make_optimizer(cfg.optimizer, model, 1000, args.epochs * args.minibatches)
    schedule = learning_rate_schedule(cfg.optimizer, 1000, args.epochs * args.minibatches)
    state = fresh_state(model, tx, 0)
    state = state.with_extras(
        ref_params=jax.tree.map(jnp.copy, state.params),
        kl_coef=jnp.float32(0.1),
        reward_params=[reward_model.init(jax.random.key(1))],
    )
    ppo = PPOConfig(vf_coef=0.1, gamma=1.0, lam=0.95, kl_target=0.5, kl_horizon=160)
    s = Settings(ppo, vocab)
    prompts = np.random.default_rng(0).integers(0, vocab, (b, p)).tolist()
    generator = Generator(model, vocab, 0, n)
    key = jax.random.key(0)

    def rollout():
        return generator(state.params, prompts, key, temperature=1.0)

    completion = rollout()
    rows = {k: jnp.asarray(v) for k, v in rollout_rows(prompts, completion, p, 0, -1).items()}
    scoring = jax.jit(lambda st, batch: prepare(model, reward_model, s, st, batch)[0])
    context = UpdateContext(model, tx, schedule, lambda *a: ppo_loss(*a, s=s), 1)
    update = jax.jit(
        ppo_update(
            context,
            reward_model=reward_model,
            s=s,
            epochs=args.epochs,
            minibatches=args.minibatches,
        )
    )
    times = {
        "rollout": best_time_s(rollout, args.repeats),
        "scoring": best_time_s(lambda: scoring(state, rows), args.repeats),
        "update": best_time_s(lambda: update(state, rows), args.repeats),
    }
    steps = args.epochs * args.minibatches
    devices = jax.devices()
    print(
        f"{args.preset} ({model.param_count() / 1e6:.3g}M params, {cfg.model.dtype}), {b} "
        f"rollouts of {p} + {n} tokens, {steps} minibatch steps, {devices[0].device_kind}"
    )
    print("rollout s | scoring s | update s | minibatch steps s | scoring share of update")
    minibatch = times["update"] - times["scoring"]
    print(
        f"{times['rollout']:.4f} | {times['scoring']:.4f} | {times['update']:.4f} | "
        f"{minibatch:.4f} | {times['scoring'] / times['update']:.1%}"
    )
    bound = decode_bound_tokens_per_sec(model, b, p + n, memory_bandwidth(devices[0]))
    mcfg = model.cfg
    rollout_rate = b * n / times["rollout"]
    head = mcfg.vocab_size * mcfg.embed_dim  # LM head params: 2 FLOPs each, 6 with backward
    body = model.flops_per_token(p + n) - 6 * head
    update_flops = (args.epochs + 1) * body * b * (p + n) + (6 * args.epochs + 4) * head * b * n
    mfu = update_flops / times["update"] / peak_flops(devices[:1])
    print("rollout tokens/s | decode bound tokens/s | of bound | update MFU")
    print(f"{rollout_rate:,.0f} | {bound:,.0f} | {rollout_rate / bound:.0%} | {mfu:.1%}")


if __name__ == "__main__":
    main()
