"""nanoGPT's CPU Shakespeare recipe, timed: ms per iteration, tokens/s, MFU, final val loss.

    python experiments/bench_shakespeare.py [--data ../shared/data/tinyshakespeare.txt]

Runs `experiments/configs/shakespeare_char.yaml` (2000 steps) into a fresh folder and
reads the figures back from its metrics.jsonl. nanoGPT's README reports val loss 1.88 for
this recipe; step times are medians over the logged steps.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from jaxllm.config import load_config
from jaxllm.metrics import read_metrics
from jaxllm.stages.pretrain import pretrain

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/tinyshakespeare.txt"))
    parser.add_argument("overrides", nargs="*", help="extra dotted.key=value overrides")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = load_config(
            ROOT / "experiments/configs/shakespeare_char.yaml",
            [f"data.path={args.data}", f"out_dir={out_dir}", "train.samples=0", *args.overrides],
        )
        pretrain(cfg)
        records = read_metrics(Path(out_dir) / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    timed = train[1:]  # the first logged step follows compilation
    print(f"steps {train[-1]['step']}, batch {cfg.train.batch_size} x {cfg.train.seq_len}")
    print(f"compile: {train[0]['compile_time_s']:.2f} s")
    print(
        f"time per iteration: {statistics.median(r['step_time_s'] for r in timed) * 1e3:.1f} "
        "ms (median)"
    )
    print(f"tokens/s: {statistics.median(r['tokens_per_sec'] for r in timed):,.0f}")
    print(
        f"MFU: {statistics.median(r['mfu'] for r in timed):.1%} of the measured CPU matmul "
        "peak (6N + 12LHQT FLOPs/token)"
    )
    print("val loss: " + ", ".join(f"{r['step']}: {r['loss']:.4f}" for r in evals))
    print(f"final val loss: {evals[-1]['loss']:.4f}")


if __name__ == "__main__":
    main()
