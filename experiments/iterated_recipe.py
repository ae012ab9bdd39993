"""Iterated RLHF with AI feedback: do AI-labelled rounds add to one round of human labels?

    python experiments/iterated_recipe.py [--out runs/iterated_recipe] [--rounds 2]

Same budget of (simulated) human labels, the reward recipe's, in both arms:
(a) one round: the reward model on the human labels, then PPO for all the iterations
    (the PPO recipe's run, trained first when absent);
(b) human labels, then AI-labelled rounds: PPO for 1/rounds of the iterations against the
    human-label reward model; then each round the current policy samples replies to fresh
    prompts, the current reward model labels every pair of them (`jaxllm label --judge`:
    soft labels sigmoid(r_a - r_b)), the reward model continues training on the human
    and all AI labels so far, and PPO continues from the current policy against it.
Prints the agreement of each round's AI labels with the gold rule and with the simulated
people, and one table: proxy (the human-label reward model), gold reward and KL to the SFT
policy of held-out samples from the final policy of each arm, and which ends higher;
`out/iterated.png` draws each arm's gold reward against sqrt(KL).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import ppo_recipe
import reward_recipe

from jaxllm.config import load_config
from jaxllm.data.prompts import builtin_prompts
from jaxllm.label import sample_and_judge
from jaxllm.rl.judges import RewardModelJudge
from jaxllm.stages.common import load_run
from jaxllm.stages.ppo import ppo


def plot(path: Path, points: dict[str, tuple[float, float, float]]) -> None:
    """Gold reward (+- its standard error) of each arm's samples against sqrt(KL)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for name, (x, gold, se) in points.items():
        axes.errorbar([x], [gold], yerr=[2 * se], fmt="o", capsize=4, label=name)
    axes.set_xlabel("sqrt(KL(policy || SFT policy)), nats per reply")
    axes.set_ylabel("gold reward of held-out samples (+- 2 SE)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/iterated_recipe")
    parser.add_argument("--sft", default="runs/sft_recipe", help="the SFT recipe's --out")
    parser.add_argument("--reward", default="runs/reward_recipe", help="the reward recipe's --out")
    parser.add_argument("--ppo", default="runs/ppo_recipe", help="the PPO recipe's --out")
    parser.add_argument("--rounds", type=int, default=2, help="PPO rounds of arm (b)")
    parser.add_argument("--prompts", type=int, default=1000, help="fresh prompts per AI round")
    parser.add_argument("--replies", type=int, default=4, help="replies per prompt to label")
    parser.add_argument("--samples", type=int, default=16, help="held-out samples per prompt")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides for every PPO run")
    args = parser.parse_args()
    out, start = Path(args.out), time.perf_counter()
    sft_dir, labels = Path(args.sft) / "sft", Path(args.reward)
    human_rm = reward_recipe.ensure_reward_run(args.reward, args.sft)
    one_round = Path(args.ppo) / "ppo"
    if not (one_round / "checkpoints").is_dir():
        ppo(ppo_recipe.ppo_config(sft_dir, human_rm, one_round, args.overrides))
    steps = load_config(one_round / "config.yaml").train.steps
    round_steps = steps // args.rounds

    data = out / "labels"  # the reward model's growing set: human labels, then AI labels
    data.mkdir(parents=True, exist_ok=True)
    if not (data / "human.jsonl").exists():
        shutil.copy(labels / "labels_train.jsonl", data / "human.jsonl")
    policy, reward_dir, agreements = sft_dir, human_rm, []
    for index in range(args.rounds):
        if index > 0:
            ai_labels = data / f"ai_round{index}.jsonl"
            if not ai_labels.exists():
                sample_and_judge(
                    load_run(policy),
                    builtin_prompts(args.prompts, 100 + index),
                    ai_labels,
                    judge=RewardModelJudge(load_run(reward_dir)),
                    judge_name=str(reward_dir),
                    replies=args.replies,
                    rule="length",
                    tau=0.1,
                    temperature=1.0,
                    max_new_tokens=48,
                    seed=100 + index,
                )
            agreements.append((index, ai_labels))
            next_reward = out / f"reward_round{index}"
            if not (next_reward / "reward_scores.json").is_file():
                reward_recipe.train_reward_model(
                    sft_dir,
                    data,
                    labels / "labels_eval.jsonl",
                    next_reward,
                    [f"reward.init_from={reward_dir}"],
                )
            reward_dir = next_reward
        run_dir = out / f"ppo_round{index}"
        ppo(
            ppo_recipe.ppo_config(
                policy,
                reward_dir,
                run_dir,
                [*args.overrides, f"train.steps={round_steps}"],
            )
        )
        policy = run_dir
    train_s = time.perf_counter() - start

    sft, judge_run = load_run(sft_dir), load_run(human_rm)
    cfg = load_config(one_round / "config.yaml")
    print(f"\ntraining {train_s:.0f} s")
    for index, path in agreements:
        report = json.loads(Path(f"{path}.agreement.json").read_text())
        print(
            f"AI labels of round {index}: {report['pairs']} pairs; agree with the gold rule on "
            f"{report['gold_agreement']:.3f} of the {report['gold_decided_pairs']} it decides, "
            f"with the simulated people on {report['human_agreement']:.3f}; "
            f"{report['confident_share']:.2f} have p >= 0.9"
        )
    print(
        f"\n{cfg.ppo.eval_prompts} held-out prompts x {args.samples} samples; proxy = the "
        "human-label reward model, gold = the labelers' rule, KL to the SFT policy"
    )
    print(f"{'arm':>44} | {'proxy':>7} | {'gold':>15} | KL/reply")
    golds, points = {}, {}
    for name, run_dir in (
        ("SFT", sft_dir),
        (f"(a) human labels, PPO {steps} its", one_round),
        (f"(b) + {args.rounds - 1} AI round(s), {args.rounds} x {round_steps} its", policy),
    ):
        run = load_run(run_dir)
        scores = ppo_recipe.sample_scores(
            run.model, run.params, judge_run, cfg, args.samples, 0, sft
        )
        gold = scores["gold_reward"].ravel()
        golds[name] = gold.mean()
        se = gold.std() / math.sqrt(len(gold))
        points[name] = (math.sqrt(max(np.mean(scores["kl_sequence"]), 0.0)), gold.mean(), se)
        print(
            f"{name:>44} | {scores['reward'].mean():>7.3f} | {gold.mean():.3f} +- {se:.3f} | "
            f"{np.mean(scores['kl_sequence']):.2f}"
        )
    plot(out / "iterated.png", points)
    print(f"plot: {out / 'iterated.png'}")
    (a, b) = list(golds.values())[1:]
    print(f"\nhigher gold at the end: {'(b), with AI rounds' if b > a else '(a), one round'}")


if __name__ == "__main__":
    main()
