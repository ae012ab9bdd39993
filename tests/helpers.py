"""Builders the tests share: a tiny model, its optimizer and state on a given mesh."""

from __future__ import annotations

import math
import socket
import subprocess

import jax
import numpy as np

from jaxllm.config import Config, MeshConfig, load_config
from jaxllm.losses import lm_batch_from_rows
from jaxllm.model import LanguageModel
from jaxllm.sharding import make_mesh
from jaxllm.state import create_train_state, learning_rate_schedule, make_optimizer
from jaxllm.steps import jit_train_step


def tiny_config(*overrides: str) -> Config:
    return load_config(
        None, ["preset=tiny", "optimizer.warmup_steps=2", "train.steps=5", *overrides]
    )


def random_batches(num: int, batch_size: int = 8, seq_len: int = 32, vocab: int = 264):
    return [
        lm_batch_from_rows(np.random.default_rng(i).integers(0, vocab, (batch_size, seq_len + 1)))
        for i in range(num)
    ]


def build(cfg: Config, mesh_shape: tuple[int, int, int], model: LanguageModel | None = None):
    """(model, mesh, state, shardings, step) for `cfg` on the first prod(mesh_shape) devices."""
    model = model or LanguageModel(cfg.model)
    devices = jax.devices()[: math.prod(mesh_shape)]
    mesh = make_mesh(MeshConfig(*mesh_shape), devices)
    tx = make_optimizer(cfg.optimizer, model, cfg.train.steps)
    state, shardings = create_train_state(model, tx, mesh, cfg.train.seed)
    schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
    step = jit_train_step(model, tx, schedule, mesh, shardings, grad_accum=cfg.train.grad_accum)
    return model, mesh, state, shardings, step


def run_steps(step, state, batches):
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


def assert_params_close(actual, expected, rtol: float = 1e-5):
    """Each param array within `rtol` in relative Frobenius norm, ||a - e|| <= rtol ||e||.

    Elementwise comparison is too strict after Adam steps: on the few near-zero gradients
    m/sqrt(v) amplifies the last-bit differences that a sharded sum's order leaves.
    """

    def check(path, a, e):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        error = np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30)
        assert error <= rtol, f"{jax.tree_util.keystr(path)}: relative error {error:.2e}"

    jax.tree_util.tree_map_with_path(check, jax.device_get(actual), jax.device_get(expected))


def losses(out_dir, split: str = "train") -> dict[int, float]:
    """step -> loss of a run's metrics.jsonl lines of one split."""
    from jaxllm.metrics import read_metrics

    return {
        r["step"]: r["loss"] for r in read_metrics(out_dir / "metrics.jsonl") if r["split"] == split
    }


def cpu_environment(devices: int, compilation_cache: bool = True) -> dict:
    """Environment for a subprocess that should see `devices` CPU devices; without the
    tests' shared compilation cache (conftest.py) for a process that may die mid-write
    (SIGKILL, a file-size limit): JAX writes an entry in place, so a half-written one would
    break the cache for every run after it."""
    import os

    from conftest import xla_flags

    environment = {
        **os.environ,
        "XLA_FLAGS": xla_flags(devices),
        "JAX_PLATFORMS": "cpu",
    }
    if not compilation_cache:
        environment.pop("JAX_COMPILATION_CACHE_DIR", None)
    return environment


def pretrain_command(corpus, out_dir, *overrides: str) -> list[str]:
    """`jaxllm pretrain` of the tiny model on `corpus`, small and quick; later overrides win."""
    import sys

    return [
        sys.executable,
        "-m",
        "jaxllm.cli",
        "pretrain",
        "preset=tiny",
        f"data.path={corpus}",
        f"out_dir={out_dir}",
        "train.batch_size=8",
        "train.seq_len=32",
        "train.eval_every=20",
        "train.eval_batches=2",
        "train.samples=0",
        "optimizer.warmup_steps=10",
        "checkpoint.every=20",
        *overrides,
    ]


def finished_checkpoints(out_dir) -> list[int]:
    """Steps of the complete checkpoints of a run (Orbax renames a step's folder when done)."""
    folder = out_dir / "checkpoints"
    return (
        sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []
    )


def kill_9_after_first_checkpoint(argv: list[str], out_dir) -> None:
    """Run `argv` (1 CPU device) and SIGKILL it once its first checkpoint is complete."""
    import subprocess
    import time

    process = subprocess.Popen(
        argv,
        env=cpu_environment(1, compilation_cache=False),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not finished_checkpoints(out_dir) and time.time() < deadline:
        time.sleep(0.01)
    process.kill()  # SIGKILL: no handler runs
    process.wait()


TWO_STEPS = ["train.samples=0", "train.eval_every=100", "checkpoint.every=2", "train.steps=2"]


def tiny_sft_run(out_dir, *overrides: str) -> None:
    """A 2-step SFT run of the tiny model on the built-in tasks (context 96), in-process:
    something for RL stages to start from."""
    from jaxllm.cli import main as cli_main

    argv = [
        "sft",
        "preset=tiny",
        "model.max_seq_len=96",
        "data.path=builtin",
        "sft.builtin_examples=64",
        "sft.eval_prompts=0",
        "train.batch_size=8",
        "train.seq_len=64",
        f"out_dir={out_dir}",
        *TWO_STEPS,
        *overrides,
    ]
    assert cli_main(argv) == 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_processes(argv: list[str], **popen) -> list[subprocess.Popen]:
    """`argv` started as processes 0 and 1 of one job (2 CPU devices each, loopback
    coordinator)."""
    port = free_port()
    return [
        subprocess.Popen(
            [
                *argv,
                f"distributed.coordinator_address=127.0.0.1:{port}",
                "distributed.num_processes=2",
                f"distributed.process_id={rank}",
            ],
            env=cpu_environment(2),
            text=True,
            **popen,
        )
        for rank in (0, 1)
    ]


def outputs_of_success(processes: list[subprocess.Popen]) -> list[str]:
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    return outputs
