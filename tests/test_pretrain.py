"""Pre-training end to end through the CLI: resume after kill -9, SIGTERM, meshes, bad input."""

import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import (
    cpu_environment,
    finished_checkpoints,
    kill_9_after_first_checkpoint,
    losses,
    pretrain_command,
    tiny_config,
)

from jaxllm.cli import main as cli_main
from jaxllm.steps import causal_lm_loss
from jaxllm.trainer import Stage, TrainingDiverged, by_step, run_training

REPO = Path(__file__).resolve().parents[1]


command = pretrain_command


def test_kill_9_then_rerun_resumes_and_reproduces_the_uninterrupted_run(corpus, tmp_path):
    steps = ["train.steps=300"]
    reference = tmp_path / "reference"
    subprocess.run(
        command(corpus, reference, *steps), env=cpu_environment(1), check=True, capture_output=True
    )

    out_dir = tmp_path / "killed"
    kill_9_after_first_checkpoint(command(corpus, out_dir, *steps), out_dir)
    killed_at = max(losses(out_dir))
    resume_from = max(finished_checkpoints(out_dir))
    assert resume_from < 300 and killed_at < 300, "the run ended before it could be killed"

    subprocess.run(
        command(corpus, out_dir, *steps), env=cpu_environment(1), check=True, capture_output=True
    )
    resumed, expected = losses(out_dir), losses(reference)
    assert sorted(resumed) == sorted(expected) == list(range(1, 301))
    np.testing.assert_allclose(
        [resumed[s] for s in range(1, 301)], [expected[s] for s in range(1, 301)], rtol=1e-6
    )
    assert losses(out_dir, "eval") == pytest.approx(losses(reference, "eval"), rel=1e-6)
    assert (out_dir / "loss.png").stat().st_size > 1000
    assert list((out_dir / "tensorboard").iterdir())


def test_sigterm_saves_a_checkpoint_at_the_current_step(corpus, tmp_path):
    out_dir = tmp_path / "run"
    process = subprocess.Popen(
        command(corpus, out_dir, "train.steps=100000", "checkpoint.every=100000"),
        env=cpu_environment(1),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = out_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.stat().st_size) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    last_logged = max(losses(out_dir))
    assert finished_checkpoints(out_dir) == [last_logged]
    assert f"stopped by SIGTERM at step {last_logged}" in stderr


def test_eight_devices_data_2_fsdp_4_match_one_device_for_50_steps(corpus, tmp_path):
    runs = {}
    for devices, mesh in ((1, []), (8, ["mesh.data=2", "mesh.fsdp=4"])):
        out_dir = tmp_path / f"devices{devices}"
        subprocess.run(
            command(corpus, out_dir, "train.steps=50", *mesh),
            env=cpu_environment(devices),
            check=True,
            capture_output=True,
        )
        runs[devices] = losses(out_dir)
    assert sorted(runs[8]) == list(range(1, 51))
    np.testing.assert_allclose(
        [runs[8][s] for s in range(1, 51)], [runs[1][s] for s in range(1, 51)], rtol=1e-5
    )


def bad_input_cases(tmp_path: Path, corpus: Path):
    non_utf8 = tmp_path / "latin1.txt"
    non_utf8.write_bytes("caf\xe9 au lait".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("too short to fill one batch")
    malformed = tmp_path / "bad.jsonl"
    malformed.write_text('{"text": "fine"}\n{"text": "fine"}\n{oops}\n')
    return [
        ([f"data.path={tmp_path / 'nowhere.txt'}"], "does not exist"),
        ([f"data.path={empty}"], "is empty"),
        ([f"data.path={short}"], "rows of 33 tokens but one batch needs 8"),
        ([f"data.path={non_utf8}"], "latin1.txt: byte 3 is not valid UTF-8"),
        ([f"data.path={malformed}"], "bad.jsonl:3: not valid JSON"),
        (["train.stepz=3"], "unknown config key 'train.stepz'"),
        (["train.steps=many"], "config key 'train.steps' has the wrong type"),
        (["mesh.data=16", "mesh.fsdp=1"], "needs 16 devices but 8 exist"),
        (["train.seq_len=512"], "train.seq_len=512 is longer than model.max_seq_len=64"),
        (["train.batch_size=6"], "train.batch_size=6 does not divide over 8 data-parallel"),
    ]


def test_bad_input_exits_2_with_one_clear_line_and_writes_nothing(corpus, tmp_path, capsys):
    for index, (overrides, expected) in enumerate(bad_input_cases(tmp_path, corpus)):
        out_dir = tmp_path / f"out{index}"
        argv = command(corpus, out_dir, *overrides)[3:]  # in-process: 8 devices
        assert cli_main(argv) == 2, overrides
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
        written = (
            [p.relative_to(out_dir) for p in out_dir.rglob("*") if p.is_file()]
            if out_dir.exists()
            else []
        )
        # Only a complete tokenized corpus may stay (it is reused by the next run).
        leftovers = [
            p
            for p in written
            if p.parts[0] != "data" or not (out_dir / "data" / p.parts[1] / "meta.json").exists()
        ]
        assert leftovers == [], (overrides, leftovers)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    """A stage whose loss turns NaN at step 7: the run stops there, saving nothing after."""
    from helpers import build, random_batches

    cfg = tiny_config(
        f"out_dir={tmp_path}",
        "train.steps=20",
        "checkpoint.every=5",
        "train.eval_every=100",
        "train.samples=0",
    )
    model, mesh, _, _, _ = build(cfg, (1, 1, 1))
    batches = random_batches(20)

    def poisoned_loss(model, params, batch):
        loss_sum, aux = causal_lm_loss(model, params, batch)
        return loss_sum * batch["poison"][0, 0], aux

    def train_batches(step):
        poison = np.full((8, 32), np.nan if step >= 6 else 1.0, np.float32)
        return {**batches[step], "poison": poison}

    stage = Stage(
        "pretrain", model, by_step(train_batches), tokens_per_step=8 * 32, loss_fn=poisoned_loss
    )
    with pytest.raises(
        TrainingDiverged,
        match=r"loss=nan .* at step 7: .* last good "
        r"checkpoint \(step 5\) is intact",
    ):
        run_training(cfg, stage, mesh)
    assert finished_checkpoints(tmp_path) == [5]
    assert max(losses(tmp_path)) == 6
    assert jax.device_count() == 8
