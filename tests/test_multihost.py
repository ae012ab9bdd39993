"""Real multi-process JAX: 2 processes x 2 CPU devices (gloo, loopback coordinator) train as
one 4-device process does; the checkpoint they write resumes in one 4-device process."""

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import (
    cpu_environment,
    finished_checkpoints,
    free_port,
    losses,
    outputs_of_success,
    pretrain_command,
    two_processes,
)

from jaxllm.cli import main as cli_main
from jaxllm.metrics import read_metrics


def command(corpus_path, out_dir, *overrides):
    # decay_steps fixed so that a run of 20 steps and one of 30 share the schedule.
    return pretrain_command(
        corpus_path,
        out_dir,
        "train.eval_every=10",
        "optimizer.warmup_steps=5",
        "optimizer.decay_steps=30",
        "checkpoint.every=10",
        "mesh.data=2",
        "mesh.fsdp=2",
        *overrides,
    )


def test_two_processes_match_one_process_and_resume_on_another_topology(corpus, tmp_path):
    reference = tmp_path / "one_process"
    subprocess.run(
        command(corpus, reference, "train.steps=30"),
        env=cpu_environment(4),
        check=True,
        capture_output=True,
        timeout=600,
    )

    shared = tmp_path / "two_processes"
    processes = two_processes(
        command(corpus, shared, "train.steps=20"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    outputs = outputs_of_success(processes)
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 1}" in outputs[0]
    assert "pretrain:" not in outputs[1].split("\n")[0]  # only process 0 reports

    expected, multi = losses(reference), losses(shared)
    assert sorted(multi) == list(range(1, 21))
    np.testing.assert_allclose(
        [multi[s] for s in range(1, 21)], [expected[s] for s in range(1, 21)], rtol=1e-5
    )
    assert sorted(int(p.name) for p in (shared / "checkpoints").iterdir() if p.name.isdigit()) == [
        10,
        20,
    ]

    # One process with 4 devices picks up the two-process checkpoint and goes on to 30.
    subprocess.run(
        command(corpus, shared, "train.steps=30"),
        env=cpu_environment(4),
        check=True,
        capture_output=True,
        timeout=600,
    )
    resumed = losses(shared)
    np.testing.assert_allclose(
        [resumed[s] for s in range(21, 31)], [expected[s] for s in range(21, 31)], rtol=1e-5
    )


def test_sigterm_to_one_process_stops_both_at_the_same_step_and_they_save_together(
    corpus, tmp_path
):
    shared = tmp_path / "run"
    long_run = ["train.steps=100000", "checkpoint.every=100000", "train.eval_every=100000"]
    processes = two_processes(
        command(corpus, shared, *long_run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    metrics = shared / "metrics.jsonl"
    deadline = time.time() + 300
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and (
        time.time() < deadline
    ):
        time.sleep(0.05)
    processes[1].send_signal(signal.SIGTERM)  # only the second process is told
    errors = [p.communicate(timeout=300)[1] for p in processes]
    assert [p.returncode for p in processes] == [143, 143], errors
    steps = finished_checkpoints(shared)
    assert len(steps) == 1 and steps[0] == max(losses(shared))
    assert all(f"stopped by SIGTERM at step {steps[0]}" in e for e in errors)


def test_two_process_sft_with_the_accuracy_eval_reads_the_generator_outputs(tmp_path):
    """The accuracy eval samples on the mesh of both processes; its outputs must be readable
    (replicated) on each, and the eval lines match a one-process run on 4 devices."""
    overrides = [
        "preset=tiny",
        "data.path=builtin",
        "model.max_seq_len=128",
        "train.steps=4",
        "train.batch_size=8",
        "train.seq_len=128",
        "train.eval_every=4",
        "train.eval_batches=1",
        "sft.builtin_examples=200",
        "sft.eval_prompts=14",
        "sft.max_new_tokens=8",
        "mesh.data=2",
        "mesh.fsdp=2",
    ]

    def sft(out_dir, *extra):
        return [sys.executable, "-m", "jaxllm.cli", "sft", f"out_dir={out_dir}", *overrides, *extra]

    reference = tmp_path / "one_process"
    subprocess.run(sft(reference), env=cpu_environment(4), check=True, capture_output=True)
    shared = tmp_path / "two_processes"
    outputs_of_success(two_processes(sft(shared), stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    evals = [
        [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "eval"]
        for run in (reference, shared)
    ]
    assert [r["step"] for r in evals[1]] == [4]
    for key in ("loss", "accuracy", "ends_with_im_end"):
        assert evals[1][0][key] == pytest.approx(evals[0][0][key], rel=1e-5, abs=1e-6), key


def test_unreachable_coordinator_fails_clearly_within_the_timeout(corpus, tmp_path):
    result = subprocess.run(
        command(
            corpus,
            tmp_path / "out",
            f"distributed.coordinator_address=127.0.0.1:{free_port()}",
            "distributed.num_processes=2",
            "distributed.process_id=1",
            "distributed.timeout_s=5",
        ),
        env=cpu_environment(2),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "could not join the job at 127.0.0.1:" in errors[0]
    assert "within 5 s" in errors[0]


def test_a_process_that_never_starts_is_one_line_from_process_0(corpus, tmp_path):
    """Process 0 of 3 alone, then with process 2 but never 1: one line naming the missing
    process (not XLA's abort), and process 2 told so too."""
    port = free_port()

    def start(process_id: int) -> subprocess.Popen:
        argv = command(
            corpus,
            tmp_path / f"out{process_id}",
            f"distributed.coordinator_address=127.0.0.1:{port}",
            "distributed.num_processes=3",
            f"distributed.process_id={process_id}",
            "distributed.timeout_s=4",
        )
        return subprocess.Popen(argv, env=cpu_environment(1), stderr=subprocess.PIPE, text=True)

    processes = [start(0), start(2)]
    errors = []
    for process in processes:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 2, err[-2000:]
        errors.append([line for line in err.splitlines() if line.startswith("error: ")])
    assert len(errors[0]) == 1 and "process 0 waited 4 s on port" in errors[0][0]
    assert "for process(es) 1 of 3, which never started" in errors[0][0]
    assert len(errors[1]) == 1 and "process 2 reached process 0 at 127.0.0.1:" in errors[1][0]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["distributed.num_processes=2"], "needs distributed.coordinator_address=HOST:PORT"),
        (["distributed.coordinator_address=127.0.0.1:1"], "also set distributed.num_processes"),
        (
            ["distributed.num_processes=2", "distributed.process_id=2"],
            "distributed.process_id=2 must lie in [0, distributed.num_processes=2)",
        ),
    ],
)
def test_incomplete_distributed_settings(corpus, tmp_path, capsys, overrides, expected):
    argv = command(corpus, tmp_path / "out", *overrides)[3:]
    assert cli_main(argv) == 2
    assert expected in capsys.readouterr().err


def test_two_processes_train_a_mixture_of_experts_as_one_process_does(corpus, tmp_path):
    """Experts sharded over the tensor axis, which spans the two processes' devices: the
    losses and the router's load-balancing loss match one 4-device process."""
    moe = [
        "train.steps=6",
        "train.eval_every=100",
        "checkpoint.every=100",
        "mesh.data=1",
        "mesh.fsdp=2",
        "mesh.tensor=2",
        "model.num_experts=4",
        "model.experts_per_token=2",
        "model.expert_mlp_dim=32",
        "model.router_aux_loss_coef=0.01",
    ]
    reference = tmp_path / "one_process"
    subprocess.run(
        pretrain_command(corpus, reference, *moe),
        env=cpu_environment(4),
        check=True,
        capture_output=True,
        timeout=600,
    )
    shared = tmp_path / "two_processes"
    outputs_of_success(
        two_processes(
            pretrain_command(corpus, shared, *moe), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
    )
    runs = [
        [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]
        for run in (reference, shared)
    ]
    assert [r["step"] for r in runs[1]] == list(range(1, 7))
    for one, two in zip(*runs, strict=True):
        for key in ("loss", "router_aux_loss"):
            assert two[key] == pytest.approx(one[key], rel=1e-5), (one["step"], key)
    # transformers' loss: k (2) when routing and router probabilities are even.
    assert 1.0 < runs[0][0]["router_aux_loss"] < 4.0
