"""Reasoning RL with GRPO on the built-in tasks (CPU): held-out accuracy per family.

    python experiments/grpo_recipe.py [--out runs/grpo_recipe] [--sft runs/sft_recipe]
        [--estimators grpo,rloo,reinforce_pp,dr_grpo]

1. the SFT recipe's model (trained first if `--sft` holds no run);
2. `jaxllm grpo` (configs/grpo_recipe.yaml): 8 replies per prompt, reward = correct +
   0.1 x format (`<think>`...`</think>` then an answer), and the control run with the
   learning rate at 0;
3. `out/grpo.png`: held-out greedy accuracy, format rate and think length against step.
Prints greedy accuracy per family before and after, beside the control, and pass@8 at the
start: a family with pass@8 = 0 gives GRPO no group with a non-zero advantage to learn from.
4. the held-out figures through `jaxllm eval` (`out/held_out.jsonl`, the run's held-out
   prompts with their answers): greedy accuracy ± its standard error and pass@k of the SFT
   model, the GRPO run and the control, each also in `out/eval_<name>.json`.
With `--estimators A,B,...` the same run is made once per advantage estimator
(`grpo.advantage_estimator`), or with `--lrs A,B,...` once per learning rate (constant:
`optimizer.lr` = `optimizer.min_lr`), and a last table puts them side by side: held-out
greedy accuracy at the end and at its best, and the rollouts' mean reward early and late.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from jaxllm.config import Config, load_stage_config
from jaxllm.data.builtin_chat import FAMILIES
from jaxllm.data.prompts import builtin_split
from jaxllm.eval import run_prompts, standard_error
from jaxllm.metrics import read_metrics
from jaxllm.stages.grpo import grpo

CONFIGS = Path(__file__).parent / "configs"


def plot(path: Path, evals: list[dict], control: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key in zip(axes, ("accuracy", "format_rate", "think_length"), strict=True):
        ax.plot([e["step"] for e in evals], [e[key] for e in evals], "o-", label="GRPO")
        ax.plot([e["step"] for e in control], [e[key] for e in control], "s--", label="lr=0")
        if key == "accuracy":
            for family in ("add", "count"):
                ax.plot(
                    [e["step"] for e in evals],
                    [e[f"accuracy_{family}"] for e in evals],
                    ":",
                    label=f"GRPO {family}",
                )
        ax.set_xlabel("GRPO iteration")
        ax.set_title(f"held-out greedy {key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def window(iterations: int) -> int:
    """Iterations averaged at each end of a run: 25, or a third of a shorter run."""
    return max(1, min(25, iterations // 3))


def rollout_windows(metrics_path: Path) -> str:
    """Mean rollout reward, correct reward and entropy of the train lines over the first
    `window` iterations, from a third of the way, and the last: does the sampling learn?"""
    train = [r for r in read_metrics(metrics_path) if r["split"] == "train"]
    last = train[-1]["step"]
    width = window(last)
    parts = []
    for first in (1, last // 3 + 1, last - width + 1):
        lines = [r for r in train if first <= r["step"] < first + width]
        keys = ("reward", "reward_correct", "entropy")
        means = [sum(r[key] for r in lines) / len(lines) for key in keys]
        parts.append(
            f"{first}-{first + width - 1}: reward {means[0]:.3f}, correct {means[1]:.3f}, "
            f"entropy {means[2]:.3f}"
        )
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/grpo_recipe")
    parser.add_argument("--sft", default="runs/sft_recipe", help="the SFT recipe's --out")
    runs = parser.add_mutually_exclusive_group()
    runs.add_argument(
        "--estimators",
        default="grpo",
        help="advantage estimators to run, comma-separated (the first gets the full table)",
    )
    runs.add_argument(
        "--lrs",
        default=None,
        help="constant learning rates to run instead, comma-separated (the first gets the "
        "full table)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides for grpo")
    args = parser.parse_args()
    out = Path(args.out)
    sft_dir = Path(args.sft) / "sft"
    if not (sft_dir / "checkpoints").is_dir():
        from sft_recipe import train_sft

        train_sft(Path(args.sft))

    def config(name: str, *extra: str) -> Config:
        overrides = [f"grpo.policy_from={sft_dir}", f"out_dir={out / name}", *args.overrides]
        return load_stage_config("grpo", CONFIGS / "grpo_recipe.yaml", [*overrides, *extra])[0]

    def run(name: str, *extra: str) -> tuple[list[dict], float]:
        cfg = config(name, *extra)
        start = time.perf_counter()
        grpo(cfg)
        elapsed = time.perf_counter() - start
        lines = read_metrics(out / name / "metrics.jsonl")
        return [r for r in lines if r["split"] == "eval"], elapsed

    if args.lrs:
        variants = [
            (f"lr={lr}", [f"optimizer.lr={lr}", f"optimizer.min_lr={lr}"])
            for lr in args.lrs.split(",")
        ]
    else:
        variants = [(e, [f"grpo.advantage_estimator={e}"]) for e in args.estimators.split(",")]
    first_name, first_overrides = variants[0]
    evals, seconds = run(first_name, *first_overrides)
    control, _ = run("control", "optimizer.lr=0", "optimizer.min_lr=0")
    plot(out / "grpo.png", evals, control)
    first, last, still = evals[0], evals[-1], control[-1]
    k = next(key for key in first if key.startswith("pass_at_") and key.count("_") == 2)
    print(f"\nGRPO {seconds:.0f} s; plot: {out / 'grpo.png'}")
    print(
        f"{'held-out greedy':>22} | {'SFT (step 0)':>12} | {'GRPO step ' + str(last['step']):>14}"
        f" | {'lr=0 control':>12} | {k + ' at start':>16}"
    )
    for family in ("", *(f"_{f}" for f in FAMILIES)):
        key = f"accuracy{family}"
        if key in first:
            print(
                f"{key:>22} | {first[key]:>12.3f} | {last[key]:>14.3f} | {still[key]:>12.3f} | "
                f"{first[k + family]:>16.3f}"
            )
    for key in ("format_rate", "think_length", "response_length"):
        print(f"{key:>22} | {first[key]:>12.3f} | {last[key]:>14.3f} | {still[key]:>12.3f} |")
    for name in (first_name, "control"):
        print(f"rollouts, {name}: {rollout_windows(out / name / 'metrics.jsonl')}")
    runs = {"SFT": sft_dir, "GRPO": out / first_name, "lr=0 control": out / "control"}
    held_out_through_eval(config(first_name), out, runs)
    if len(variants) > 1:
        compare(
            out,
            [(first_name, evals, seconds)]
            + [(name, *run(name, *extra)) for name, extra in variants[1:]],
            control,
        )


def held_out_through_eval(cfg: Config, out: Path, runs: dict[str, Path]) -> None:
    """`jaxllm eval --data out/held_out.jsonl` (the run's own held-out prompts) of each run:
    greedy accuracy ± its standard error, and pass@k from `grpo.group_size` samples."""
    g = cfg.grpo
    _, held_out = builtin_split(
        g.builtin_prompts, g.eval_prompts, cfg.train.seed, cfg.data.builtin_family_names()
    )
    data = out / "held_out.jsonl"
    lines = [{"prompt": p.text, **p.fields} for p in held_out]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    figures = {}
    for name, run_dir in runs.items():
        slug = name.split()[0].replace("=", "")
        print(f"\njaxllm eval --checkpoint {run_dir} --data {data} --samples {g.group_size}")
        figures[name] = run_prompts(
            str(run_dir),
            str(data),
            samples=g.group_size,
            max_new_tokens=g.max_new_tokens,
            temperature=g.temperature,
            output=str(out / f"eval_{slug}.json"),
        )
    k = g.group_size
    print(f"\n{'held-out, jaxllm eval':>22} | {'greedy accuracy':>15} | {'pass@' + str(k):>7}")
    for name, values in figures.items():
        accuracy, n = values["accuracy"], len(held_out)
        print(
            f"{name:>22} | {accuracy:>7.3f} ± {standard_error(accuracy, n):.3f} | "
            f"{values[f'pass_at_{k}']:>7.3f}"
        )


def compare(out: Path, runs: list[tuple[str, list[dict], float]], control: list[dict]) -> None:
    """One line per run (estimator or learning rate): held-out greedy accuracy at the
    start, the end and its best, the rollouts' mean reward over the first and last
    `window` iterations, and wall time."""
    print(
        f"\n{'run':>14} | {'accuracy start':>14} | {'end':>6} | {'best (step)':>12} | "
        f"{'rollout reward first':>20} | {'last':>7} | {'time':>6}"
    )
    for name, evals, seconds in [*runs, ("lr=0 control", control, math.nan)]:
        folder = out / ("control" if name == "lr=0 control" else name)
        train = [r for r in read_metrics(folder / "metrics.jsonl") if r["split"] == "train"]
        n = window(len(train))
        early = sum(r["reward"] for r in train[:n]) / n
        late = sum(r["reward"] for r in train[-n:]) / n
        best = max(evals, key=lambda e: e["accuracy"])
        print(
            f"{name:>14} | {evals[0]['accuracy']:>14.3f} | {evals[-1]['accuracy']:>6.3f} | "
            f"{best['accuracy']:>5.3f} ({best['step']:>3}) | {early:>20.3f} | {late:>7.3f} | "
            f"{seconds:>5.0f}s"
        )


if __name__ == "__main__":
    main()
