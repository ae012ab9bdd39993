"""tpu_setup scripts: shellcheck-clean, and their dry runs print the commands they would run."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "tpu_setup").glob("*.sh"))


def dry_run(script: str, *args: str) -> list[str]:
    """The commands a script prints in dry-run mode, with the shell's quoting removed."""
    result = subprocess.run(
        ["bash", str(REPO / "tpu_setup" / script), "--dry-run", *args],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "ZONE": "us-west4-a", "HOME": "/tmp"},
        capture_output=True,
        text=True,
        check=True,
    )
    return [line.replace("\\", "") for line in result.stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_scripts_pass_shellcheck():
    scripts = [
        *SCRIPTS,
        *REPO.glob("scripts/*.sh"),
        REPO / "experiments/bench_gpu.sh",
        REPO / ".ci/run",
    ]
    result = subprocess.run(
        ["shellcheck", "-x", *map(str, scripts)],
        cwd=REPO / "tpu_setup",
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout


def test_create_on_demand_spot_and_queued():
    assert dry_run("create.sh", "my-tpu", "v5litepod-16") == [
        "+ gcloud compute tpus tpu-vm create my-tpu --zone=us-west4-a "
        "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite"
    ]
    assert dry_run("create.sh", "my-tpu", "v5p-8", "--spot")[0].endswith(
        "--runtime-version=v2-alpha-tpuv5 --spot"
    )
    queued = dry_run("create.sh", "q", "v6e-8", "--queued")
    assert queued[0].startswith("+ gcloud compute tpus queued-resources create q --node-id=q")
    assert "--spot" in queued[0] and "--runtime-version=v2-alpha-tpuv6e" in queued[0]


def test_install_copies_head_to_every_worker_and_installs_the_tpu_extra():
    commands = dry_run("install.sh", "my-tpu")
    assert commands[0].startswith("+ git -C ") and " archive " in commands[0]
    assert "scp" in commands[1] and "--worker=all" in commands[1]
    assert "--worker=all" in commands[2] and "pip install --quiet -e" in commands[2]
    assert "[tpu,hf]" in commands[2]


def test_run_sends_the_same_command_to_all_workers():
    commands = dry_run(
        "run.sh", "my-tpu", "--", "jaxllm", "pretrain", "--config", "a b.yaml", "train.steps=10"
    )
    assert commands[0].startswith("+ gcloud compute tpus tpu-vm ssh my-tpu --worker=all")
    assert "cd ~/jaxllm && (jaxllm pretrain --config a b.yaml train.steps=10)" in commands[0]
    assert commands[0].endswith("tee -a ~/run.log; exit ${PIPESTATUS[0]}")  # keep its status
    assert commands[1] == "+ (dry run: logs would be gathered into logs/my-tpu/worker-<i>.log)"


def test_bad_usage_exits_2_with_a_message():
    result = subprocess.run(
        ["bash", str(REPO / "tpu_setup/create.sh"), "only-name"], capture_output=True, text=True
    )
    assert result.returncode == 2 and result.stderr.startswith("error: usage: create.sh")
