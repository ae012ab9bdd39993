"""An RL stage on the shared loop: rollouts from the current params by (state, step), a
clipped update, and exact resume after kill -9 (the rollouts are regenerated, not stored)."""

import subprocess
import sys
from pathlib import Path

import jax
import pytest
from helpers import cpu_environment, finished_checkpoints, kill_9_after_first_checkpoint

from jaxllm.metrics import peak_flops, read_metrics

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


@pytest.mark.parametrize("rollouts", [True, False])
def test_the_loop_compiles_one_update_per_batch_shape(tmp_path, rollouts):
    """RL batches keep only the completion columns their longest reply needs, so the loop
    meets batches of a few shapes: each shape is compiled once (its first step logs the
    compile time) and every step runs, on the batch it was given; tokens/s and MFU count
    the tokens of that batch (`Stage.row_length`). A step's time never takes in the
    compile of the next step's shape, also where steps are logged one late (no rollouts)."""
    from helpers import build, random_batches, tiny_config

    from jaxllm.trainer import Stage, by_step, run_training

    cfg = tiny_config(f"out_dir={tmp_path}", "train.steps=5", "train.samples=0")
    model, mesh, _, _, _ = build(cfg, (1, 1, 1))
    short, long = random_batches(5, seq_len=16), random_batches(5, seq_len=32)
    batches = [short[0], long[1], short[2], long[3], short[4]]
    seen = []  # what the stage's watch is shown: every step, in order
    stage = Stage(
        "pretrain",
        model,
        by_step(lambda step: batches[step]),
        tokens_per_step=8 * cfg.train.seq_len,
        rollouts=rollouts,
        row_length=lambda batch: batch["tokens"].shape[1],
        watch_step=lambda step, values: seen.append((step, values["loss"])),
    )
    assert run_training(cfg, stage, mesh).final_step == 5
    lines = [train_lines(tmp_path)[step] for step in range(1, 6)]
    assert seen == [(step, line["loss"]) for step, line in enumerate(lines, 1)]
    assert ["compile_time_s" in line for line in lines] == [True, True, False, False, False]
    # The first step is logged before the second shape compiles (not after it).
    assert lines[0]["step_time_s"] < lines[1]["compile_time_s"]
    widths = [16, 32, 16, 32, 16]
    assert [line["num_tokens"] for line in lines] == [8 * t for t in widths]
    for line, t in zip(lines, widths, strict=True):
        assert line["tokens_per_sec"] * line["step_time_s"] == pytest.approx(8 * t)
        flops = model.flops_per_token(t) * line["tokens_per_sec"]
        assert line["mfu"] == pytest.approx(flops / peak_flops(jax.devices()[:1]))


def test_with_a_device_memory_limit_the_widest_batch_is_checked_before_the_first_step(
    tmp_path, monkeypatch
):
    """Where a device reports its memory, a stage with batches of several widths has its
    widest compiled before the first step: a step that cannot fit is refused up front, and
    the first wide batch needs no compilation of its own."""
    from helpers import build, random_batches, tiny_config

    from jaxllm import trainer
    from jaxllm.errors import UserError

    short, long = random_batches(3, seq_len=16), random_batches(3, seq_len=32)
    batches = [short[0], short[1], long[2]]

    def run(out_dir):
        cfg = tiny_config(f"out_dir={out_dir}", "train.steps=3", "train.samples=0")
        model, mesh, _, _, _ = build(cfg, (1, 1, 1))
        stage = trainer.Stage(
            "pretrain",
            model,
            trainer.by_step(lambda step: batches[step]),
            8 * 16,
            rollouts=True,
            widest_batch=lambda batch: jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), long[0]
            ),
        )
        return trainer.run_training(cfg, stage, mesh)

    monkeypatch.setattr(trainer, "device_memory_limit", lambda: 1000)
    with pytest.raises(UserError, match="the train step needs about"):
        run(tmp_path / "refused")
    refused = tmp_path / "refused"  # no step ran
    assert not (refused / "metrics.jsonl").exists() or not train_lines(refused)

    monkeypatch.setattr(trainer, "device_memory_limit", lambda: 2**40)
    assert run(tmp_path / "fits").final_step == 3
    lines = train_lines(tmp_path / "fits")
    assert ["compile_time_s" in lines[step] for step in (1, 2, 3)] == [True, False, False]
