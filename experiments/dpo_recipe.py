"""DPO on the reward recipe's rankings, beside the SFT model, PPO and best-of-n (CPU).

    python experiments/dpo_recipe.py [--out runs/dpo_recipe] [--samples 16]

1. the SFT recipe's model, the reward recipe's labels and reward model, and the PPO
   recipe's run (each made first if its folder holds none; `--sft`, `--reward`, `--ppo`);
2. `jaxllm dpo` (configs/dpo_recipe.yaml) from the SFT model on the same training labels
   the reward model learnt from, evaluated on the same held-out labels; and the control,
   the same run on shuffled labels (each ranking in a random order);
3. `--samples` replies per held-out PPO prompt from each policy, scored by the reward
   model (proxy) and the labelers' gold rule, with their KL to the SFT policy.
Prints one table (`out/table.json` keeps it): held-out implicit-reward accuracy of DPO and
of its control, and the proxy and gold reward of each policy's samples; best-of-n picks
the reward model's favourite of the SFT model's first n samples of each prompt.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import ppo_recipe
import reward_recipe

from jaxllm.config import load_config, load_stage_config
from jaxllm.metrics import read_metrics
from jaxllm.stages.common import load_run
from jaxllm.stages.dpo import dpo
from jaxllm.stages.ppo import ppo

CONFIGS = Path(__file__).parent / "configs"


def train_dpo(sft_dir: Path, train: Path, held_out: Path, out_dir: Path, overrides) -> list[dict]:
    cfg, _ = load_stage_config(
        "dpo",
        CONFIGS / "dpo_recipe.yaml",
        [
            f"dpo.policy_from={sft_dir}",
            f"data.path={train}",
            f"data.eval_path={held_out}",
            f"out_dir={out_dir}",
            *overrides,
        ],
    )
    dpo(cfg)
    return [r for r in read_metrics(out_dir / "metrics.jsonl") if r["split"] == "eval"]


def nll_and_step_time(run_dir: Path) -> str:
    """The best reply's NLL per token at the first and last eval, and the median step time
    (train lines after the first, which compiles)."""
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if r["split"] == "eval"]
    steps = [r["step_time_s"] for r in records if r["split"] == "train"][1:]
    return (
        f"best reply NLL per token {evals[0]['nll_best']:.2f} -> {evals[-1]['nll_best']:.2f}; "
        f"median step {float(np.median(steps)):.3f} s"
    )


def ppo_run(sft_dir: Path, reward_dir: Path, ppo_out: Path):
    """The PPO recipe's run in `ppo_out/ppo`, trained first when absent; its own config."""
    ppo_dir = ppo_out / "ppo"
    if not (ppo_dir / "checkpoints").is_dir():
        ppo(ppo_recipe.ppo_config(sft_dir, reward_dir, ppo_dir))
    return ppo_dir, load_config(ppo_dir / "config.yaml")


def summary(name: str, scores: dict[str, np.ndarray], pick=None, kl=None) -> dict:
    """Means over prompts of one reply each: `pick` (prompts,) indices, else every sample."""
    rows = np.arange(len(scores["reward"]))

    def values(key):
        return scores[key][rows, pick] if pick is not None else scores[key].ravel()

    gold = values("gold_reward")
    return {
        "policy": name,
        "reward": float(values("reward").mean()),
        "gold_reward": float(gold.mean()),
        "gold_reward_se": float(gold.std() / math.sqrt(len(gold))),
        "kl_sequence": float(values("kl_sequence").mean()) if kl is None else kl,
        "response_length": float(values("response_length").mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/dpo_recipe")
    parser.add_argument("--sft", default="runs/sft_recipe", help="the SFT recipe's --out")
    parser.add_argument("--reward", default="runs/reward_recipe", help="the reward recipe's --out")
    parser.add_argument("--ppo", default="runs/ppo_recipe", help="the PPO recipe's --out")
    parser.add_argument("--samples", type=int, default=16, help="replies per held-out prompt")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides for dpo")
    args = parser.parse_args()
    out, start = Path(args.out), time.perf_counter()
    sft_dir, labels = Path(args.sft) / "sft", Path(args.reward)
    reward_dir = reward_recipe.ensure_reward_run(args.reward, args.sft)
    train, held_out = labels / "labels_train.jsonl", labels / "labels_eval.jsonl"
    ppo_dir, ppo_cfg = ppo_run(sft_dir, reward_dir, Path(args.ppo))

    evals = train_dpo(sft_dir, train, held_out, out / "dpo", args.overrides)
    control_labels = reward_recipe.shuffled(train, out / "labels_train_shuffled.jsonl", 3)
    control = train_dpo(sft_dir, control_labels, held_out, out / "control", args.overrides)
    train_s = time.perf_counter() - start

    sft, reward_run = load_run(sft_dir), load_run(reward_dir)

    def scores_of(run_dir: Path) -> dict[str, np.ndarray]:
        policy = load_run(run_dir)
        return ppo_recipe.sample_scores(
            policy.model, policy.params, reward_run, ppo_cfg, args.samples, 0, sft
        )

    sft_scores = scores_of(sft_dir)
    table = [summary("SFT", sft_scores)]
    for n in sorted({min(4, args.samples), args.samples}):
        best = np.argmax(sft_scores["reward"][:, :n], axis=1)
        kl = math.log(n) - (n - 1) / n
        table.append(summary(f"best-of-{n} (SFT)", sft_scores, pick=best, kl=kl))
    loss = load_config(out / "dpo" / "config.yaml").dpo.loss
    dpo_name = "DPO" if loss == "sigmoid" else f"DPO ({loss})"
    for name, run_dir in (
        ("PPO", ppo_dir),
        (dpo_name, out / "dpo"),
        (f"{dpo_name}, shuffled labels", out / "control"),
    ):
        table.append(summary(name, scores_of(run_dir)))
    first, last = evals[0], evals[-1]
    result = {
        "dpo_held_out": {"start": first, "trained": last, "shuffled_labels": control[-1]},
        "policies": table,
        "prompts": int(sft_scores["reward"].shape[0]),
        "samples_per_prompt": args.samples,
    }
    (out / "table.json").write_text(json.dumps(result, indent=1) + "\n")

    print(f"\ntraining {train_s:.0f} s, total {time.perf_counter() - start:.0f} s")
    score = {"simpo": "mean log-prob", "orpo": "log odds of the mean"}.get(loss, "log-ratio")
    print(f"{dpo_name} on held-out labels (implicit reward beta * {score}; decided pairs):")
    print(f"{'':>16} | accuracy | margin | reward chosen | reward rejected | loss")
    for name, line in (("start", first), (dpo_name, last), ("shuffled labels", control[-1])):
        print(
            f"{name:>16} | {line['accuracy']:>8.3f} | {line['margin']:>6.3f} | "
            f"{line['reward_chosen']:>13.3f} | {line['reward_rejected']:>15.3f} | "
            f"{line['loss']:.3f}"
        )
    print(
        f"log-probs of chosen and rejected replies (start -> {dpo_name}): "
        f"{first['logp_chosen']:.2f} -> {last['logp_chosen']:.2f}, "
        f"{first['logp_rejected']:.2f} -> {last['logp_rejected']:.2f}"
    )
    print(f"{dpo_name}: {nll_and_step_time(out / 'dpo')}")
    print(
        f"\n{result['prompts']} held-out prompts x {args.samples} sampled replies "
        "(proxy = reward model, gold = the labelers' rule, KL to the SFT policy):"
    )
    print(f"{'policy':>22} | {'proxy':>7} | {'gold':>15} | {'KL/reply':>8} | length")
    for row in table:
        gold = f"{row['gold_reward']:.3f} +- {row['gold_reward_se']:.3f}"
        print(
            f"{row['policy']:>22} | {row['reward']:>7.3f} | {gold:>15} | "
            f"{row['kl_sequence']:>8.3f} | {row['response_length']:.1f}"
        )


if __name__ == "__main__":
    main()
