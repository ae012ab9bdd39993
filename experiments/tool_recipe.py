"""Tool-use RL with GRPO: the calculator on two- and three-digit multiplication (CPU).

    python experiments/tool_recipe.py [--out runs/tool_recipe] [grpo overrides...]

1. data (`data.path=calculator`, `jaxllm.data.tool_task`): SFT demonstrations, a fifth of
   them the tool path (`<tool_call>`, the calculator's result, the answer), the rest the
   product written at once, which a 0.8M model can only guess; training prompts, and
   held-out prompts that no training row asks;
2. SFT from scratch (configs/tool_sft.yaml): greedy, the model mostly guesses (a digit is
   likelier as its first token than `<tool_call>`), sampled it calls the tool often enough
   that a group of 8 holds a correct reply;
3. three GRPO runs from it (configs/tool_recipe.yaml), rewarded for the correct answer
   alone: `tools` (3 turns, the calculator), `control` (the same at lr=0) and `no_tools`
   (1 turn: a call ends the episode unanswered);
4. a table of held-out greedy accuracy (± its standard error) and tool-call rate at each
   run's start and end, and `out/tool_rl.png` when matplotlib is installed.
Each run resumes if interrupted; a finished SFT run is kept as it is. The SFT and `tools`
runs are configs/tool_pipeline.yaml's two stages.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

from jaxllm.config import load_stage_config
from jaxllm.data import tool_task
from jaxllm.data.prompts import read_prompts
from jaxllm.eval import standard_error
from jaxllm.metrics import read_metrics
from jaxllm.stages.grpo import grpo
from jaxllm.stages.sft import sft

CONFIGS = Path(__file__).parent / "configs"
RUNS = {  # name: overrides of configs/tool_recipe.yaml
    "tools": [],
    "control": ["optimizer.lr=0", "optimizer.min_lr=0"],
    # one turn offers no tools; every greedy eval reply is kept in samples.jsonl (1000: at
    # least their count), where the tool-call rate is counted (the eval line has it for
    # episodes only)
    "no_tools": ["grpo.max_turns=1", "grpo.tools=[]", "train.samples=1000"],
}


def finished(run_dir: Path, steps: int) -> bool:
    """Whether the run in `run_dir` logged its last step (a finished SFT run is kept as it
    is, even when the library's files have changed since)."""
    metrics = run_dir / "metrics.jsonl"
    return metrics.is_file() and any(r["step"] == steps for r in read_metrics(metrics))


def reply_call_rates(run_dir: Path, eval_prompts: set[str]) -> dict[int, float]:
    """Per eval step, the share of greedy held-out replies in `run_dir/samples.jsonl`
    that hold a `<tool_call>` (for a one-turn run, whose eval line has no tool figures)."""
    replies: dict[int, list[bool]] = {}
    for line in (run_dir / "samples.jsonl").read_text().splitlines():
        sample = json.loads(line)
        if sample["prompt"] in eval_prompts:
            replies.setdefault(sample["step"], []).append("<tool_call>" in sample["completion"])
    return {step: sum(calls) / len(calls) for step, calls in replies.items()}


def plot(path: Path, evals: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key in zip(axes, ("accuracy", "tool_call_rate"), strict=True):
        for (name, lines), style in zip(evals.items(), ("o-", "s--", "^:"), strict=True):
            ax.plot([e["step"] for e in lines], [e[key] for e in lines], style, label=name)
        ax.set_xlabel("GRPO iteration")
        ax.set_title(f"held-out greedy {key}")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/tool_recipe")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides for grpo")
    args = parser.parse_args()
    out = Path(args.out)
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    sft_cfg, _ = load_stage_config("sft", CONFIGS / "tool_sft.yaml", [f"out_dir={out / 'sft'}"])
    if not finished(out / "sft", sft_cfg.train.steps):
        sft(sft_cfg)
    seconds["sft"] = time.perf_counter() - start

    evals: dict[str, list[dict]] = {}
    for name, extra in RUNS.items():
        overrides = [f"grpo.policy_from={out / 'sft'}", f"out_dir={out / name}", *args.overrides]
        cfg, _ = load_stage_config("grpo", CONFIGS / "tool_recipe.yaml", [*overrides, *extra])
        start = time.perf_counter()
        grpo(cfg)
        seconds[name] = time.perf_counter() - start
        lines = read_metrics(out / name / "metrics.jsonl")
        evals[name] = [r for r in lines if r["split"] == "eval"]
        if "tool_call_rate" not in evals[name][0]:
            held_out = read_prompts(tool_task.NAME, cfg.grpo.eval_prompts, cfg.train.seed)
            rates = reply_call_rates(out / name, {prompt.text for prompt in held_out})
            evals[name] = [{**e, "tool_call_rate": rates[e["step"]]} for e in evals[name]]

    k = next(key for key in evals["tools"][0] if key.startswith("pass_at_") and key.count("_") == 2)
    eval_prompts = cfg.grpo.eval_prompts
    print(f"\nheld-out greedy, {eval_prompts} prompts; accuracy ± its standard error")
    print(
        f"{'run':>9} | {'accuracy start':>14} | {'accuracy end':>14} | {'tool calls start':>16}"
        f" | {'end':>5} | {k + ' start':>13} | {'end':>5} | {'time':>5}"
    )
    for name, lines in evals.items():
        first, last = lines[0], lines[-1]
        accuracy = [
            f"{e['accuracy']:.3f} ± {standard_error(e['accuracy'], eval_prompts):.3f}"
            for e in (first, last)
        ]
        print(
            f"{name:>9} | {accuracy[0]:>14} | {accuracy[1]:>14} | "
            f"{first['tool_call_rate']:>16.3f} | {last['tool_call_rate']:>5.3f} | "
            f"{first[k]:>13.3f} | {last[k]:>5.3f} | {seconds[name]:>4.0f}s"
        )
    print(f"SFT {seconds['sft']:.0f} s (0 s when it was already done)")
    if importlib.util.find_spec("matplotlib"):
        plot(out / "tool_rl.png", evals)
        print(f"plot: {out / 'tool_rl.png'}")


if __name__ == "__main__":
    main()
