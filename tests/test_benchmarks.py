"""The benchmark scripts run at a smoke size and print their tables."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cpu_environment

REPO = Path(__file__).resolve().parents[1]
ONE_DEVICE = cpu_environment(1)


def run_script(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=ONE_DEVICE,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result.stdout


def test_throughput_benchmark_prints_a_row_per_combination():
    out = run_script(
        "experiments/bench_throughput.py",
        "--preset",
        "tiny",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--remat",
        "none",
        "full",
        "--steps",
        "2",
    )
    assert "MFU = (6N + 12*L*H*Q*T)" in out
    rows = [line for line in out.splitlines() if line.startswith("tiny |")]
    assert [row.split(" | ")[4] for row in rows] == ["none", "full"]
    for row in rows:
        mfu = float(row.split(" | ")[11].rstrip("%"))
        assert 0 < mfu < 100


def test_compile_benchmark_prints_times_per_depth():
    out = run_script("experiments/bench_compile.py", "--layers", "2", "4", "--width", "64")
    times = re.findall(r"^\s+(\d+) \|\s+([\d.]+) \|\s+([\d.]+)$", out, re.M)
    assert [int(layers) for layers, _, _ in times] == [2, 4]
    assert all(float(scan) > 0 and float(unrolled) > 0 for _, scan, unrolled in times)


@pytest.mark.parametrize("loop", ["device", "host"])
def test_decode_benchmark_prints_rate_and_bound(loop):
    out = run_script(
        "experiments/bench_decode.py",
        "--preset",
        "tiny",
        "--batch-size",
        "2",
        "--context",
        "8",
        "--new-tokens",
        "4",
        "--loop",
        loop,
    )
    assert f"{loop} loop" in out, out
    row = [line for line in out.splitlines() if line.startswith("2 | 8 |")]
    assert len(row) == 1
    tokens_per_s, bound = (float(v.replace(",", "")) for v in row[0].split(" | ")[5:7])
    assert tokens_per_s > 0 and bound > 0


def test_ppo_step_benchmark_splits_the_update_into_scoring_and_minibatch_steps():
    out = run_script(
        "experiments/bench_ppo_step.py",
        "--preset",
        "tiny",
        "--batch-size",
        "4",
        "--prompt-len",
        "8",
        "--new-tokens",
        "8",
        "--repeats",
        "1",
    )
    lines = out.splitlines()
    rollout, scoring, update, minibatch, share = lines[-3].split(" | ")
    assert float(update) == pytest.approx(float(scoring) + float(minibatch), abs=2e-4)
    assert 0 < float(share.rstrip("%")) < 100 and float(rollout) > 0
    rate, bound, of_bound, mfu = lines[-1].split(" | ")
    rate, bound = float(rate.replace(",", "")), float(bound.replace(",", ""))
    assert float(of_bound.rstrip("%")) == pytest.approx(100 * rate / bound, abs=0.5)
    seconds = float(rollout)  # printed to 0.1 ms
    assert 4 * 8 / (seconds + 5e-5) <= rate <= 4 * 8 / max(seconds - 5e-5, 1e-9)
    assert 0 < float(mfu.rstrip("%")) < 100


@pytest.mark.parametrize("cpu_devices", ["1", "2"])
def test_rollout_benchmark_prints_both_sides_per_batch(cpu_devices):
    out = run_script(
        "experiments/bench_rollouts.py",
        "--preset",
        "tiny",
        "--batch-size",
        "1",
        "4",
        "--prompt-len",
        "5",
        "--new-tokens",
        "6",
        "--repeats",
        "1",
        "--cpu-devices",
        cpu_devices,
    )
    rows = re.findall(r"^(\d+) \| ([\d,]+) \| ([\d,]+) \| ([\d.]+)x$", out, re.M)
    assert [row[0] for row in rows] == ["1", "4"], out
    assert ("rows split over 2 CPU devices" in out) == (cpu_devices == "2")


def test_decode_profile_prints_groups_that_add_up():
    out = run_script(
        "experiments/profile_decode.py",
        "--preset",
        "tiny",
        "--batch-size",
        "4",
        "--prompt-len",
        "5",
        "--new-tokens",
        "6",
    )
    shares = re.findall(r"^([^|\n]+) \| ([\d.]+) \| (\d+)%$", out, re.M)
    groups = [group for group, _, _ in shares]
    assert {"step: attention", "step: mlp", "once per call (prefill, growth, results)"} <= set(
        groups
    ), out
    # The decode loop's `while` spans the ops it runs: counting it would count them twice.
    assert not re.search(r"^while[.\d]* \|", out, re.M), out
    total = float(re.search(r"device-op time of one call ([\d.]+) ms", out).group(1))
    assert sum(float(ms) for _, ms, _ in shares) == pytest.approx(total, abs=0.1 * len(shares))


@pytest.mark.parametrize("flags", [[], ["--autodiff-glu", "--default-malloc"]])
def test_reward_step_profile_prints_times_and_groups_that_add_up(flags):
    out = run_script(
        "experiments/profile_reward_step.py",
        "--preset",
        "tiny",
        "--rows",
        "2",
        "--prompt-len",
        "5",
        "--reply-len",
        "3",
        *flags,
    )
    calls = re.findall(r"^(.+) \| ([\d.]+) \| (\d+)$", out, re.M)
    assert [c[0] for c in calls] == [
        "backbone forward",
        "loss forward",
        "loss forward + backward",
        "the same, the last layer at every column",
    ]
    shares = re.findall(r"^((?:forward|backward): \w+|unnamed) \| ([\d.]+) \| (\d+)%$", out, re.M)
    assert {"forward: mlp", "backward: mlp", "forward: attention"} <= {s[0] for s in shares}, out
    malloc = "glibc's defaults" if flags else "freed memory kept"
    assert re.search(rf"per gradient call \({malloc}\): [\d,]+ minor page faults", out), out
    total = float(re.search(r"op time of one gradient call ([\d.]+) ms", out).group(1))
    assert sum(float(ms) for _, ms, _ in shares) == pytest.approx(total, abs=0.1 * len(shares))


def test_gpu_rollout_script_runs_every_section_at_a_smoke_size(tmp_path):
    """The script a lent GPU runs (its minutes are scarce) works end to end, on the CPU."""
    env = {
        **ONE_DEVICE,
        "PYTHON": sys.executable,
        "PRESET": "tiny",
        "CONTEXT": "8",
        "NEW_TOKENS": "8",
        "BATCHES": "1 2",
        "PROBE_BATCH": "2",
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"),
    }
    result = subprocess.run(
        ["bash", "experiments/bench_rollouts_gpu.sh"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert out.count("PASS prompt") == 3 and "FAIL" not in out, out
    rows = re.findall(r"^(\d+) \| 8 \| \d+ \|", out, re.M)
    assert rows == ["1", "2", "2", "2"], out  # the table, the host loop, graphs off
    assert "host loop" in out and "op runs per step" in out, out
