"""Every shell command the README shows runs, in order, as a newcomer would run them after
the quick start: the same arguments, with only the number of training steps shortened."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHAKESPEARE
from helpers import cpu_environment

REPO = Path(__file__).resolve().parents[1]
# scripts/quickstart.sh, after set-up
QUICKSTART_RUNS = "jaxllm pipeline --config experiments/configs/quickstart.yaml"
# Appended to training commands so the whole sequence takes a few minutes.
SHORTER = {
    "pipeline": [
        "pretrain.train.steps=40",
        "pretrain.train.eval_every=20",
        "sft.train.steps=20",
        "sft.train.eval_every=10",
        "sft.sft.builtin_examples=500",
        "sft.sft.eval_prompts=14",
        "label.prompts=40",  # DPO needs 16 training comparisons; samples may tie
        "label.eval_prompts=12",
        "reward.train.steps=4",
        "reward.train.eval_every=2",
        "ppo.train.steps=4",
        "ppo.train.eval_every=2",
        "ppo.train.batch_size=8",
        "ppo.ppo.eval_prompts=16",
        "ppo.ppo.builtin_prompts=64",
        "grpo.train.steps=2",
        "grpo.train.eval_every=2",
        "grpo.train.batch_size=2",
        "grpo.grpo.group_size=4",
        "grpo.grpo.pass_k=4",
        "grpo.grpo.eval_prompts=14",
        "grpo.grpo.builtin_prompts=64",
        "report_prompts=0",  # the answers table: tests/test_pipeline.py
    ],
    "pretrain": ["train.steps=20", "train.eval_every=10"],
    "sft": ["train.steps=20", "train.eval_every=10"],
    "dpo": ["train.steps=4", "train.eval_every=2"],
    "eval": ["--limit", "4", "--samples", "2"],
    "grpo": [
        "train.steps=1",
        "train.eval_every=1",
        "train.batch_size=2",
        "grpo.group_size=2",
        "grpo.eval_prompts=2",
        "grpo.pass_k=2",
    ],
}


def readme_commands() -> list[str]:
    """The README's `jaxllm ...` and `python ...` lines of bash blocks, continuations joined;
    the quick start as what its script runs after the set-up (this test's environment), and
    not the test command (this suite)."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    lines = [line.split("  #")[0].strip() for line in text.splitlines()]
    lines = [QUICKSTART_RUNS if line == "bash scripts/quickstart.sh" else line for line in lines]
    return [line for line in lines if line.startswith(("jaxllm ", "python "))]


def argv_of(command: str) -> list[str]:
    words = shlex.split(command)
    if words[0] == "jaxllm":
        words = [sys.executable, "-m", "jaxllm.cli", *words[1:]]
        shorter = SHORTER.get(words[3], [])
    else:
        words = [sys.executable, *words[1:]]
        shorter = SHORTER.get(words[1], [])
    return words + shorter


def test_the_readme_commands_run_in_order(tmp_path):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent (the shared corpus lives beside the checkout)")
    commands = readme_commands()
    assert len(commands) == 16, commands  # update SHORTER when the README gains a command
    work = tmp_path / "repo"  # a checkout's layout: experiments/ here, shared/ beside it
    work.mkdir()
    (work / "experiments").symlink_to(REPO / "experiments")
    (tmp_path / "shared").symlink_to(SHAKESPEARE.parents[1])
    (work / "corpus.txt").write_text(SHAKESPEARE.read_text()[:200_000])
    for command in commands:
        argv = argv_of(command)
        result = subprocess.run(
            argv,
            cwd=work,
            env={**cpu_environment(1), "PYTHONPATH": str(REPO / "experiments")},
            input="hello\n/exit\n",
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
        assert "error:" not in result.stderr, command
    life = json.loads((work / "runs" / "quickstart" / "pipeline.json").read_text())
    assert list(life["stages"]) == ["pretrain", "sft", "label", "reward", "ppo", "grpo"]
    assert (work / "runs" / "quickstart" / "report.md").is_file()
    assert (work / "runs" / "dpo" / "checkpoints").is_dir()
    assert (work / "runs" / "dpo_lora_adapter" / "adapter_config.json").is_file()
    assert (work / "my.tiktoken").stat().st_size > 0
    assert (work / "runs" / "tool_pipeline" / "grpo" / "checkpoints").is_dir()
