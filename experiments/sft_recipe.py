"""Pre-train a small model, then fine-tune it on the built-in verifiable tasks (CPU).

    python experiments/sft_recipe.py [--out runs/sft_recipe]

1. pre-training: configs/pretrain_pydoc.yaml (Python's own docs, byte-level, 0.8M params);
2. SFT: configs/sft_builtin.yaml from step 1's params with a fresh optimizer; its eval at
   step 0 measures the pre-trained model, later evals the fine-tuned one.
Prints greedy accuracy per task family (answers compared by `jaxllm.answers`) and the
share of replies that end with <|im_end|>, before and after SFT. Both runs resume if interrupted.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from jaxllm.config import load_config, load_stage_config
from jaxllm.data.builtin_chat import FAMILIES
from jaxllm.metrics import read_metrics
from jaxllm.stages.pretrain import pretrain
from jaxllm.stages.sft import sft

CONFIGS = Path(__file__).parent / "configs"


def train_sft(out: Path, pretrain_steps: int | None = None, overrides=()) -> Path:
    """Pre-train, then SFT, under `out` (each run resumes, or does nothing if done);
    returns the SFT run's folder."""
    start = time.perf_counter()
    pretrain_overrides = [f"out_dir={out / 'pretrain'}"]
    if pretrain_steps is not None:
        pretrain_overrides.append(f"train.steps={pretrain_steps}")
    pretrain(load_config(CONFIGS / "pretrain_pydoc.yaml", pretrain_overrides))
    pretrain_s = time.perf_counter() - start
    sft_overrides = [f"out_dir={out / 'sft'}", f"sft.init_from={out / 'pretrain'}"]
    sft_cfg, inherited = load_stage_config(
        "sft", CONFIGS / "sft_builtin.yaml", [*sft_overrides, *overrides]
    )
    print("sft: inherited from the pre-training run:", *inherited, sep="\n  ")
    sft(sft_cfg)
    print(f"\npre-training {pretrain_s:.0f} s, total {time.perf_counter() - start:.0f} s")
    return out / "sft"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/sft_recipe")
    parser.add_argument(
        "--pretrain-steps", type=int, default=None, help="shorter pre-training (a quick look)"
    )
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides for SFT")
    args = parser.parse_args()
    out = Path(args.out)
    train_sft(out, args.pretrain_steps, args.overrides)

    evals = [r for r in read_metrics(out / "sft" / "metrics.jsonl") if r["split"] == "eval"]
    before, after = evals[0], evals[-1]
    print(f"{'':>18} | before SFT (step {before['step']}) | after SFT (step {after['step']})")
    for key in ["loss", "ends_with_im_end", "accuracy", *(f"accuracy_{f}" for f in FAMILIES)]:
        print(f"{key:>18} | {before[key]:>22.3f} | {after[key]:>20.3f}")


if __name__ == "__main__":
    main()
