"""Where a reward-model step's time goes: the forward against the forward and backward.

    python experiments/profile_reward_step.py [--preset shakespeare] [--rows 16] \
        [--prompt-len 47] [--reply-len 15] [--autodiff-glu] [--default-malloc] \
        [model.remat=dots ...]

The reward loss of `bench_rl_steps.py`'s shape: `--rows` packed rows, each a prompt of
`--prompt-len` tokens and two replies of `--reply-len` attending to it (segment ids), the
score read at each reply's last token, a Bradley-Terry loss on the pair. Times (median of
20 calls, after two): the backbone's forward, the loss's forward, and the loss with its
gradient, the last layer run at the read columns only (`sequence_scores`) and at every
column; GFLOP/s counts 2 x (non-embedding params) per position forward and 3x that forward
and backward (every column through every layer, so the read-columns rows do less work than
they count). Host memory is kept for reuse as the CLI keeps it on the CPU
(`jaxllm.host_memory`; `--default-malloc`: glibc's defaults), and the minor page faults
and kernel time of one gradient call are printed (the mean over 20 calls, when
warm). Then one gradient call under the JAX profiler, its op time summed
by where each op came from (the forward or the backward of attention, the MLP, the rest).
"""

from __future__ import annotations

import argparse
import collections
import re
import resource
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from profile_decode import op_times

import jaxllm.model
from jaxllm.activations import MLP_ACTIVATIONS
from jaxllm.config import REWARD_HEAD, load_config
from jaxllm.host_memory import keep_freed_host_memory
from jaxllm.losses import sequence_scores
from jaxllm.model import LanguageModel


def packed_pairs(rows: int, prompt: int, reply: int, vocab: int) -> dict[str, np.ndarray]:
    """Rows [prompt | reply a | reply b], the replies attending to the prompt."""
    width = prompt + 2 * reply
    rng = np.random.default_rng(0)
    segments, prefixes = np.zeros((rows, width), np.int32), np.zeros((rows, width), np.int32)
    positions = np.zeros((rows, width), np.int32)
    segments[:, :prompt], positions[:, :prompt] = 1, np.arange(prompt)
    for k, start in enumerate((prompt, prompt + reply)):
        segments[:, start : start + reply] = 2 + k
        prefixes[:, start : start + reply] = 1
        positions[:, start : start + reply] = prompt + np.arange(reply)
    ends = np.array([[prompt + reply - 1, prompt + 2 * reply - 1]] * rows, np.int32)
    tokens = rng.integers(3, vocab, (rows, width)).astype(np.int32)
    return {"tokens": tokens, "positions": positions, "segments": segments,
            "prefixes": prefixes, "ends": ends}  # fmt: skip


def median_time(fn, *args) -> float:
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(20):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def origin(op_name: str) -> str:
    """`backward: mlp`, `forward: attention`, ... from an op's jax `op_name`."""
    side = "backward" if "transpose(" in op_name else "forward"
    scope = re.search(r"jvp\((attention|mlp)\)", op_name)
    return f"{side}: {scope.group(1) if scope else 'other'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="shakespeare")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=47)
    parser.add_argument("--reply-len", type=int, default=15)
    parser.add_argument(
        "--autodiff-glu",
        action="store_true",
        help="the MLP's act(gate) * up differentiated by autodiff (not `activations.gated`)",
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="glibc's default malloc settings (not `host_memory.keep_freed_host_memory`)",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides: model.remat=dots")
    args = parser.parse_args()
    if not args.default_malloc:
        keep_freed_host_memory()  # before JAX starts its threads, as the CLI
    if args.autodiff_glu:
        jaxllm.model.gated = lambda activation, gate, up: MLP_ACTIVATIONS[activation](gate) * up
    overrides = [f"preset={args.preset}", "model.scan_layers=false", *args.overrides]
    cfg = load_config(None, overrides).model
    model = LanguageModel(cfg).with_heads([REWARD_HEAD])
    params = model.init(jax.random.key(0))
    batch = packed_pairs(args.rows, args.prompt_len, args.reply_len, cfg.vocab_size)

    def hidden(params):
        return model.hidden(
            params, batch["tokens"], batch["positions"], batch["segments"], batch["prefixes"]
        )

    def pair_loss(scores):
        return jnp.mean(jax.nn.softplus(scores[:, 1] - scores[:, 0]))

    def loss(params):
        return pair_loss(sequence_scores(
            model, params, REWARD_HEAD, batch["tokens"], batch["positions"],
            batch["segments"], batch["ends"], batch["prefixes"],
        ))  # fmt: skip

    def loss_every_column(params):  # the last layer at every column, the head read after
        values = model.scalar_head(params, REWARD_HEAD, hidden(params))
        return pair_loss(jnp.take_along_axis(values, batch["ends"], axis=1))

    gradient = jax.jit(jax.value_and_grad(loss))
    embedding = cfg.vocab_size * cfg.embed_dim
    positions = batch["tokens"].size
    flops = 2 * (sum(x.size for x in jax.tree.leaves(params)) - embedding) * positions
    print(f"# {args.preset}, {args.rows} rows x {batch['tokens'].shape[1]} columns, CPU")
    print("call | ms | GFLOP/s")
    print("---|---|---")
    for name, fn, work in (
        ("backbone forward", jax.jit(hidden), flops),
        ("loss forward", jax.jit(loss), flops),
        ("loss forward + backward", gradient, 3 * flops),
        (
            "the same, the last layer at every column",
            jax.jit(jax.value_and_grad(loss_every_column)),
            3 * flops,
        ),
    ):
        seconds = median_time(fn, params)
        print(f"{name} | {1e3 * seconds:.1f} | {work / seconds / 1e9:.0f}")

    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(20):
        jax.block_until_ready(gradient(params))
    after = resource.getrusage(resource.RUSAGE_SELF)
    faults = (after.ru_minflt - before.ru_minflt) / 20
    kernel_ms = 1e3 * (after.ru_stime - before.ru_stime) / 20
    malloc = "glibc's defaults" if args.default_malloc else "freed memory kept"
    print(
        f"\nper gradient call ({malloc}): {faults:,.0f} minor page faults, "
        f"{kernel_ms:.1f} ms kernel time (both threads)"
    )

    origins = {}
    for line in gradient.lower(params).compile().as_text().splitlines():
        match = re.match(r'\s*(?:ROOT )?%([\w.-]+) = .*op_name="([^"]*)"', line)
        if match:
            origins[match.group(1)] = origin(match.group(2))
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        jax.block_until_ready(gradient(params))
        jax.profiler.stop_trace()
        trace = next(Path(trace_dir).rglob("*.xplane.pb"))
        time_ns, _ = op_times(jax.profiler.ProfileData.from_file(str(trace)))
    groups = collections.Counter()
    for op, ns in time_ns.items():
        groups[origins.get(op, "unnamed")] += ns
    total = sum(groups.values())
    print(f"\nop time of one gradient call {total / 1e6:.1f} ms (summed over threads)")
    print("from | ms | share")
    print("---|---|---")
    for group, ns in groups.most_common():
        print(f"{group} | {ns / 1e6:.1f} | {100 * ns / total:.0f}%")


if __name__ == "__main__":
    main()
