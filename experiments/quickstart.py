"""Quick start: pre-train a small model on Python's own documentation, end to end.

    python experiments/quickstart.py [dotted.key=value ...]

The corpus is `pydoc_data.topics` (the help() pages that ship with Python, ~465 KB),
written as one JSONL document per topic, so nothing is downloaded. Prints the losses and
a sample, and leaves the run in runs/quickstart (metrics.jsonl, loss.png, TensorBoard
events, checkpoints). Run it again to resume; delete the folder to start over.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jaxllm.config import load_config
from jaxllm.errors import UserError
from jaxllm.metrics import final_metrics
from jaxllm.stages.pretrain import pretrain

CONFIG = Path(__file__).parent / "configs" / "quickstart.yaml"


def write_pydoc_corpus(path: Path) -> None:
    from pydoc_data.topics import topics

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as file:
        for name in sorted(topics):
            file.write(json.dumps({"text": topics[name]}) + "\n")


def main(overrides: list[str]) -> int:
    cfg = load_config(CONFIG, overrides)
    corpus = Path(cfg.out_dir) / "pydoc_topics.jsonl"
    if not corpus.exists():
        write_pydoc_corpus(corpus)
    cfg = load_config(CONFIG, [f"data.path={corpus}", *overrides])
    pretrain(cfg)
    out_dir = Path(cfg.out_dir)
    summary = final_metrics(out_dir)
    print(
        f"\nstep {summary['final_step']}: train loss {summary['train_loss']:.3f}, "
        f"val loss {summary['eval_loss']:.3f} nats/token, "
        f"{summary['median_step_time_s'] * 1000:.1f} ms/step (median)"
    )
    step, _, sample = (out_dir / "samples.txt").read_text().split("--- step ")[-1].partition("\n")
    print(f"sample at step {step}:\n{sample.strip()}")
    print(f"loss curve: {out_dir / 'loss.png'}; TensorBoard: tensorboard --logdir {out_dir}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
