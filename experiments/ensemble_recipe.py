"""PPO against a conservative ensemble of reward models, beside PPO against one (CPU).

    python experiments/ensemble_recipe.py [--out runs/ensemble_recipe] [--members 3]

1. the reward recipe's reward model and `--members - 1` more trained the same way on the
   same labels with other seeds (data order: every reward head starts at 0, so the
   members differ by the order they saw the comparisons in);
2. `jaxllm ppo` (configs/ppo_recipe.yaml) against their ensemble, optimising the mean minus
   the std of the members' normalised scores (`ppo.reward_aggregation=mean_minus_std`, the
   conservative ensemble of Coste et al. 2023); the PPO recipe's run, against one reward
   model, is the baseline (trained first when absent);
3. `out/ensemble.png`: gold reward of held-out samples of both runs against sqrt(KL) and
   against iteration.
Prints where each run's gold reward peaks and at what KL, and where it ends: a
conservative ensemble should let the policy go further before the gold turns down.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import ppo_recipe
import reward_recipe

from jaxllm.metrics import read_metrics
from jaxllm.rl.watch import watch_report
from jaxllm.stages.ppo import ppo


def plot(path: Path, runs: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_kl, by_step) = plt.subplots(1, 2, figsize=(12, 4))
    for name, evals in runs.items():
        x = [np.sqrt(max(e["kl_sequence"], 0.0)) for e in evals]
        gold = [e["gold_reward"] for e in evals]
        (line,) = by_kl.plot(x, gold, "o", label=name)
        peak = int(np.argmax(gold))
        by_kl.plot([x[peak]], [gold[peak]], "*", markersize=14, color=line.get_color())
        by_step.plot([e["step"] for e in evals], gold, "o-", color=line.get_color(), label=name)
    by_kl.set_xlabel("sqrt(KL(policy || SFT policy)), nats per reply (star: gold's peak)")
    by_step.set_xlabel("PPO iteration")
    for axes in (by_kl, by_step):
        axes.set_ylabel("gold reward of sampled held-out replies")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/ensemble_recipe")
    parser.add_argument("--sft", default="runs/sft_recipe", help="the SFT recipe's --out")
    parser.add_argument("--reward", default="runs/reward_recipe", help="the reward recipe's --out")
    parser.add_argument("--ppo", default="runs/ppo_recipe", help="the PPO recipe's --out")
    parser.add_argument("--members", type=int, default=3, help="reward models in the ensemble")
    parser.add_argument(
        "--aggregation", default="mean_minus_std", help="ppo.reward_aggregation of the ensemble"
    )
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides for both PPO runs")
    args = parser.parse_args()
    out, start = Path(args.out), time.perf_counter()
    sft_dir, labels = Path(args.sft) / "sft", Path(args.reward)
    reward_dir = reward_recipe.ensure_reward_run(args.reward, args.sft)
    train, held_out = labels / "labels_train.jsonl", labels / "labels_eval.jsonl"
    members = [reward_dir]
    for seed in range(1, args.members):
        member = out / f"reward_seed{seed}"
        if not (member / "reward_scores.json").is_file():
            reward_recipe.train_reward_model(
                sft_dir, train, held_out, member, [f"train.seed={seed}"]
            )
        members.append(member)
    baseline = Path(args.ppo) / "ppo"
    if not (baseline / "checkpoints").is_dir():
        ppo(ppo_recipe.ppo_config(sft_dir, reward_dir, baseline, args.overrides))
    ensemble = out / "ppo"
    ppo(
        ppo_recipe.ppo_config(
            sft_dir,
            reward_dir,
            ensemble,
            [
                *args.overrides,
                "ppo.reward_from=" + ",".join(str(m) for m in members),
                f"ppo.reward_aggregation={args.aggregation}",
            ],
        )
    )
    total_s = time.perf_counter() - start
    runs = {
        "PPO, one reward model": baseline,
        f"PPO, {args.aggregation} of {args.members}": ensemble,
    }
    evals = {
        name: [r for r in read_metrics(d / "metrics.jsonl") if r["split"] == "eval"]
        for name, d in runs.items()
    }
    plot(out / "ensemble.png", evals)
    print(f"\ntotal {total_s:.0f} s; plot: {out / 'ensemble.png'}")
    for name, run_dir in runs.items():
        report = watch_report(run_dir)
        last = evals[name][-1]
        disagreement = last.get("reward_disagreement")
        print(f"{name}:")
        print("  " + "\n  ".join(report.summary))
        print(
            f"  last eval: gold {last['gold_reward']:.3f} at KL {last['kl_sequence']:.2f} nats "
            "per reply"
            + (f", members' disagreement {disagreement:.3f}" if disagreement is not None else "")
        )
        if report.warning:
            print("  " + report.warning)


if __name__ == "__main__":
    main()
