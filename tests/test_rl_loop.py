"""An RL stage on the shared loop: rollouts from the current params by (state, step), a
clipped update, and exact resume after kill -9 (the rollouts are regenerated, not stored)."""

import subprocess
import sys
from pathlib import Path

from helpers import cpu_environment, finished_checkpoints, kill_9_after_first_checkpoint

from jaxllm.metrics import read_metrics

TOY = Path(__file__).parent / "toy_rl_stage.py"
COMPARED = ("loss", "reward", "clip_fraction", "ratio", "grad_norm")


def toy_command(out_dir: Path, steps: int) -> list[str]:
    return [sys.executable, str(TOY), str(out_dir), str(steps)]


def train_lines(out_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(out_dir / "metrics.jsonl") if r["split"] == "train"}


def test_toy_rl_stage_resumes_after_kill_9_with_the_uninterrupted_rollouts(tmp_path):
    reference = tmp_path / "reference"
    subprocess.run(
        toy_command(reference, 10), env=cpu_environment(1), check=True, capture_output=True
    )
    expected = train_lines(reference)
    assert sorted(expected) == list(range(1, 11))
    # On-policy: the sampler's log-probs are the trainer's, so the first ratio is 1.
    assert abs(expected[1]["ratio"] - 1.0) < 1e-5
    assert expected[1]["clip_fraction"] == 0.0
    assert len({round(line["reward"], 6) for line in expected.values()}) > 1  # rollouts change

    out_dir = tmp_path / "killed"
    kill_9_after_first_checkpoint(toy_command(out_dir, 10), out_dir)
    assert finished_checkpoints(out_dir) == [5]
    subprocess.run(
        toy_command(out_dir, 10), env=cpu_environment(1), check=True, capture_output=True
    )
    resumed = train_lines(out_dir)
    assert sorted(resumed) == list(range(1, 11))
    for step in range(1, 11):
        assert {k: resumed[step][k] for k in COMPARED} == {k: expected[step][k] for k in COMPARED}
    assert finished_checkpoints(out_dir) == [5, 10]


def test_the_loop_compiles_one_update_per_batch_shape(tmp_path):
    """RL batches keep only the completion columns their longest reply needs, so the loop
    meets batches of a few shapes: each shape is compiled once (its first step logs the
    compile time) and every step runs, on the batch it was given."""
    from helpers import build, random_batches, tiny_config

    from jaxllm.trainer import Stage, by_step, run_training

    cfg = tiny_config(f"out_dir={tmp_path}", "train.steps=5", "train.samples=0")
    model, mesh, _, _, _ = build(cfg, (1, 1, 1))
    short, long = random_batches(5, seq_len=16), random_batches(5, seq_len=32)
    batches = [short[0], long[1], short[2], long[3], short[4]]
    stage = Stage("pretrain", model, by_step(lambda step: batches[step]), 8 * 16, rollouts=True)
    assert run_training(cfg, stage, mesh).final_step == 5
    lines = train_lines(tmp_path)
    assert ["compile_time_s" in lines[step] for step in range(1, 6)] == [
        True,
        True,
        False,
        False,
        False,
    ]
    assert [lines[step]["num_tokens"] for step in range(1, 6)] == [8 * 16, 8 * 32] * 2 + [8 * 16]
