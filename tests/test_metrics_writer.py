"""metrics.jsonl on a rerun: the lines of the steps it will write again are dropped, so the
file equals an uninterrupted run's."""

import json

from jaxllm.metrics import MetricsWriter, read_metrics


def lines_through(path, steps):
    path.write_text(
        "".join(
            json.dumps({"step": step, "split": split, "loss": 1.0}) + "\n"
            for step in steps
            for split in ("train", "eval")
            if step or split == "eval"  # step 0: the eval at start only
        )
    )


def test_a_resume_keeps_the_lines_through_its_checkpoint(tmp_path):
    lines_through(tmp_path / "metrics.jsonl", range(0, 8))
    MetricsWriter(tmp_path, resume_step=5).close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [
        0,
        *(s for s in range(1, 6) for _ in range(2)),
    ]


def test_a_run_killed_before_its_first_checkpoint_starts_its_log_over(tmp_path):
    """It evaluates at step 0 again: the earlier step-0 line must not stay beside it."""
    lines_through(tmp_path / "metrics.jsonl", range(0, 3))
    writer = MetricsWriter(tmp_path, resume_step=0)
    writer.write(0, "eval", {"loss": 2.0})
    writer.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 0, "split": "eval", "loss": 2.0}]


def test_tensorboard_gets_the_scalars_without_torch_being_imported(tmp_path):
    """tensorboardX imports torch where it is installed (1.5 s of every run's start); the
    writer keeps it out and still writes the event file."""
    import subprocess
    import sys

    script = (
        "import sys; from pathlib import Path; from jaxllm.metrics import MetricsWriter; "
        f"w = MetricsWriter(Path({str(tmp_path)!r}), 0); w.write(1, 'train', {{'loss': 1.5}}); "
        "w.close(); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    (events,) = (tmp_path / "tensorboard").iterdir()
    assert b"train/loss" in events.read_bytes()
