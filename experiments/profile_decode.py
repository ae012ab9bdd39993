"""Where a decode step's time goes: one `Generator` call under the JAX profiler.

    python experiments/profile_decode.py --preset shakespeare --batch-size 128

Greedy decoding of a random-init model (the shapes of bench_rollouts.py). The trace of one
call, after a warm-up, is read back with `jax.profiler.ProfileData`, and each op's device
time is summed over the call. Ops that ran at every decode step are grouped by the jax
operation they came from (the `op_name` of their definition in the compiled decode loop:
attention, mlp, the sampling around them); batched dots, which on the CPU are the attention
reading its cache, are a group of their own. Ops run fewer times (prefill, growing the
cache between decode phases, gathering the results) are one line. Prints each group's
share and the most expensive ops.

On a GPU the ops are the kernels on the device's streams (several kernels of one op count
as that op's runs), and the first line also gives the call's wall time per step beside
the kernels' busy time per step and the kernels launched per step: a step whose wall time
is far above its kernels' time is bound by launching them, not by the kernels.

    python experiments/profile_decode.py --preset llama_1b --batch-size 64 \
        --prompt-len 128 --new-tokens 128 model.dtype=bfloat16 model.attention=xla
"""

from __future__ import annotations

import argparse
import collections
import re
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jaxllm.config import load_config
from jaxllm.generate import Generator
from jaxllm.model import LanguageModel


def op_origins(hlo_text: str) -> dict[str, str]:
    """Op name -> the group its definition in `hlo_text` belongs to."""
    origins = {}
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%([\w.-]+) = .*", line)
        if not match:
            continue
        if " dot(" in line and "lhs_batch_dims" in line:
            origins[match.group(1)] = "attention: batched dots over the cache"
            continue
        op_name = re.search(r'op_name="[^"]*?while/body/([^"/]+)', line)
        origins[match.group(1)] = f"step: {op_name.group(1)}" if op_name else "step: other"
    return origins


def op_lines(profile) -> list:
    """The trace lines whose events are ops: the GPU's (or TPU's) streams when a device
    plane has them, else the CPU threads that run XLA:CPU's ops (its Eigen pool and the
    client's own thread)."""
    device = [
        line
        for plane in profile.planes
        if plane.name.startswith("/device:")
        for line in plane.lines
        if line.name.startswith("Stream") or line.name == "XLA Ops"
    ]
    if any(line.name.startswith("Stream") for line in device):
        return [line for line in device if line.name.startswith("Stream")]
    if device:  # a TPU: its "XLA Ops" line
        return device
    return [
        line
        for plane in profile.planes
        if plane.name.startswith("/host:CPU")
        for line in plane.lines
        if any(thread in line.name for thread in ("XLAEigen", "XLAPjRtCpuClient"))
    ]


def op_times(profile) -> tuple[collections.Counter, collections.Counter]:
    """Each op's summed duration (ns) and runs over the trace, named by its HLO op (the
    event's `hlo_op` stat when it has one: a GPU kernel's name is not its op's)."""
    time_ns, count = collections.Counter(), collections.Counter()
    for line in op_lines(profile):
        for event in line.events:
            name = event.name
            if "Thunk" in name or "threadpool" in name.lower() or name.startswith("end: "):
                continue  # XLA:CPU's executor spans and markers, not ops
            name = dict(event.stats).get("hlo_op", name)
            if re.fullmatch(r"(while|conditional|call)(\.\d+)?", name):
                continue  # control flow: its span holds the ops it ran, counted themselves
            time_ns[name] += event.duration_ns
            count[name] += 1
    return time_ns, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="shakespeare")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--top", type=int, default=15, help="ops listed one by one")
    parser.add_argument("overrides", nargs="*", help="extra dotted.key=value overrides")
    args = parser.parse_args()
    needed = args.prompt_len + args.new_tokens
    cfg = load_config(None, [f"preset={args.preset}", *args.overrides]).model
    if cfg.max_seq_len < needed:
        cfg = load_config(
            None, [f"preset={args.preset}", *args.overrides, f"model.max_seq_len={needed}"]
        ).model
    model = LanguageModel(cfg)
    params = jax.jit(model.init)(jax.random.key(0))
    generator = Generator(model, cfg.vocab_size, 0, args.new_tokens)
    shape = (args.batch_size, args.prompt_len)
    prompts = np.random.default_rng(0).integers(1, cfg.vocab_size, shape).tolist()

    def call():
        return generator(params, prompts, jax.random.key(0), temperature=0.0)

    steps = call().num_steps  # warm-up: every phase compiled
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        start = time.perf_counter()
        call()
        wall_s = time.perf_counter() - start
        jax.profiler.stop_trace()
        trace = next(Path(trace_dir).rglob("*.xplane.pb"))
        profile = jax.profiler.ProfileData.from_file(str(trace))
    time_ns, count = op_times(profile)
    # The decode loop's HLO (first phase; op names repeat across phases), built the way
    # `Generator.__call__` builds its arguments.
    prompt_bp, lengths_b = generator._left_pad(prompts, args.batch_size)
    slots = generator._phase_slots(prompt_bp.shape[1], prompt_bp.shape[1])
    live_b = np.ones(args.batch_size, bool)
    budget_b = np.full(args.batch_size, generator.max_new_tokens, np.int32)
    state = generator._start(
        params, prompt_bp, lengths_b, None, budget_b, live_b, jax.random.key(0), slots
    )
    sampling = generator._sampling_args(0.0, 0, 1.0)
    stops = np.asarray([-1], np.int32)
    lowered = generator._decode.lower(params, state, *sampling, stops, "greedy")
    hlo = lowered.compile().as_text()
    origins = op_origins(hlo)
    groups = collections.Counter()
    for name, ns in time_ns.items():
        per_step = count[name] >= steps and name in origins
        groups[origins[name] if per_step else "once per call (prefill, growth, results)"] += ns
    total = sum(time_ns.values())
    device = jax.devices()[0]
    per_step_runs = sum(runs for name, runs in count.items() if runs >= steps)
    print(
        f"# {device.device_kind} ({device.platform}); {args.preset}, batch {args.batch_size}, "
        f"{args.prompt_len}-token prompts, {steps} greedy steps; device-op time of one call "
        f"{total / 1e6:.1f} ms ({total / 1e3 / steps:.0f} us per step); wall time "
        f"{wall_s * 1e3:.1f} ms ({wall_s * 1e6 / steps:.0f} us per step); "
        f"{per_step_runs / steps:.0f} op runs per step"
    )
    print("group | ms | share")
    print("---|---|---")
    for group, ns in groups.most_common():
        print(f"{group} | {ns / 1e6:.1f} | {ns / total:.0%}")
    print("\nop | runs | us per run | group\n---|---|---|---")
    for name, ns in time_ns.most_common(args.top):
        group = origins.get(name, "-") if count[name] >= steps else "once per call"
        print(f"{name} | {count[name]} | {ns / 1e3 / count[name]:.1f} | {group}")


if __name__ == "__main__":
    main()
