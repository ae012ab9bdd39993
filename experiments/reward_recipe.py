"""A reward model from simulated human rankings of the SFT model's own samples (CPU).

    python experiments/reward_recipe.py [--out runs/reward_recipe] [--rule length --tau 0.1]

1. the SFT recipe's model (`sft_recipe.py`; trained first if `--sft` holds no run);
2. `jaxllm label`: K replies per built-in prompt sampled from it, ranked by a noisy
   labeler of a gold rule (training prompts, and held-out prompts with other seeds);
3. `jaxllm reward` on those labels (configs/reward_recipe.yaml), evaluated on the held-out
   labels; and the control: the same run on random labels (each comparison's replies in
   a random order).
Prints the held-out pairwise accuracy of both beside the Bayes ceiling of the labelers
(the accuracy of the gold rule itself on labels this noisy). Every step resumes, or is
skipped when its output exists.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from jaxllm.config import load_stage_config
from jaxllm.data.prompts import builtin_prompts
from jaxllm.label import label_agreement, sample_and_label
from jaxllm.metrics import read_metrics
from jaxllm.stages.common import load_run
from jaxllm.stages.reward import reward

CONFIGS = Path(__file__).parent / "configs"


def labels(run, path: Path, count: int, seed: int, args) -> Path:
    if not path.exists():
        report = sample_and_label(
            run,
            builtin_prompts(count, seed),
            path,
            replies=args.replies,
            rule=args.rule,
            tau=args.tau,
            temperature=1.0,
            max_new_tokens=48,
            seed=seed,
        )
        print(f"label: {path}: {report.summary()}")
    return path


def shuffled(path: Path, out: Path, seed: int) -> Path:
    """The same comparisons with random labels: each one's replies in a uniformly random
    order (strict, no ties), whatever the labelers said."""
    if not out.exists():
        rng = random.Random(seed)
        lines = []
        for line in path.read_text().splitlines():
            record = json.loads(line)
            order = list(range(len(record["responses"])))
            rng.shuffle(order)
            record.pop("scores", None)
            record["ranking"] = order
            lines.append(json.dumps(record))
        out.write_text("\n".join(lines) + "\n")
    return out


def train_reward_model(sft_dir: Path, train: Path, held_out: Path, out_dir: Path, overrides):
    cfg, _ = load_stage_config(
        "reward",
        CONFIGS / "reward_recipe.yaml",
        [
            f"reward.init_from={sft_dir}",
            f"data.path={train}",
            f"data.eval_path={held_out}",
            f"out_dir={out_dir}",
            *overrides,
        ],
    )
    reward(cfg)
    return [r for r in read_metrics(out_dir / "metrics.jsonl") if r["split"] == "eval"]


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/reward_recipe")
    parser.add_argument("--sft", default="runs/sft_recipe", help="the SFT recipe's --out")
    parser.add_argument("--prompts", type=int, default=2000, help="training prompts")
    parser.add_argument("--eval-prompts", type=int, default=500)
    parser.add_argument("--replies", type=int, default=4, help="K replies per prompt")
    parser.add_argument("--rule", default="length")
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides for reward")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, control: bool = True) -> Path:
    """Steps 1-3 (the control when asked); prints the figures; returns the reward run."""
    out, start = Path(args.out), time.perf_counter()
    sft_dir = Path(args.sft) / "sft"
    if not (sft_dir / "checkpoints").is_dir():
        from sft_recipe import train_sft

        train_sft(Path(args.sft))
    run = load_run(sft_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = labels(run, out / "labels_train.jsonl", args.prompts, 1, args)
    held_out = labels(run, out / "labels_eval.jsonl", args.eval_prompts, 2, args)
    label_s = time.perf_counter() - start
    evals = train_reward_model(sft_dir, train, held_out, out / "reward", args.overrides)
    agreement = label_agreement(held_out, args.tau)
    statistics = json.loads((out / "reward" / "reward_scores.json").read_text())
    print(f"\nlabels {label_s:.0f} s, total {time.perf_counter() - start:.0f} s")
    print(f"gold rule '{args.rule}', labeler noise tau={args.tau}, K={args.replies}")
    print(
        f"Bayes ceiling of the held-out labels: {agreement['ceiling']:.3f} over all pairs "
        f"(ties 0.5), {agreement['decided_ceiling']:.3f} over the pairs they decide"
    )
    print(
        f"the gold rule's own accuracy on them: {agreement['rule']:.3f}, "
        f"{agreement['decided_rule']:.3f}"
    )
    print(
        f"scores on the training replies (for PPO's normalisation): mean "
        f"{statistics['mean']:.3f}, std {statistics['std']:.3f}"
    )
    columns = {"start": evals[0], "trained": evals[-1]}
    if control:
        control_labels = shuffled(train, out / "labels_train_shuffled.jsonl", 3)
        control_out = out / "reward_shuffled"
        columns["shuffled-label control"] = train_reward_model(
            sft_dir, control_labels, held_out, control_out, args.overrides
        )[-1]
    print(f"{'held-out':>10} | " + " | ".join(f"{name:>8}" for name in columns))
    for key in ("accuracy", "decided_accuracy", "margin", "loss"):
        values = [f"{line[key]:>{max(len(name), 8)}.3f}" for name, line in columns.items()]
        print(f"{key:>10} | " + " | ".join(values))
    return out / "reward"


def ensure_reward_run(out: str | Path, sft: str | Path) -> Path:
    """The reward recipe's reward model in `out/reward`, made first (without the control)
    when `out` holds no finished one; the SFT recipe's run in `sft`."""
    reward_dir = Path(out) / "reward"
    if not (reward_dir / "reward_scores.json").is_file():
        run(parse(["--out", str(out), "--sft", str(sft)]), control=False)
    return reward_dir


def main() -> None:
    run(parse())


if __name__ == "__main__":
    main()
