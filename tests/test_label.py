"""`jaxllm label` and `jaxllm watch` from the command line: a labelled file the reward stage
reads, AI labels (a judge's soft labels) that the reward and DPO stages read, the agreement
report, and one clear line for each bad input with nothing written."""

import json
import math

import pytest
from helpers import TWO_STEPS, tiny_sft_run
from test_reward import write_preferences

from jaxllm.cli import main as cli_main
from jaxllm.data.preferences import read_comparisons


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("label")
    tiny_sft_run(root / "sft")
    return root / "sft"


@pytest.fixture(scope="module")
def reward_run(sft_run):
    data = sft_run.parent / "prefs.jsonl"
    write_preferences(data, 40, False)
    out_dir = sft_run.parent / "rm"
    argv = [
        "reward",
        f"reward.init_from={sft_run}",
        f"data.path={data}",
        f"out_dir={out_dir}",
        "train.seq_len=48",
        "reward.max_replies=3",
        "train.batch_size=8",
        *TWO_STEPS,
    ]
    assert cli_main(argv) == 0
    return out_dir


def label_argv(run, output, *options) -> list[str]:
    return [
        "label",
        "--checkpoint",
        str(run),
        "--prompts",
        "builtin",
        "--num-prompts",
        "6",
        "--max-new-tokens",
        "8",
        "--output",
        str(output),
        *options,
    ]


def test_labels_are_rankings_with_gold_the_reward_stage_reads(sft_run, tmp_path, capsys):
    output = tmp_path / "labels.jsonl"
    assert cli_main(label_argv(sft_run, output, "--replies", "3", "--tau", "0")) == 0
    assert "6 prompts labelled" in capsys.readouterr().out  # 8 random tokens: all distinct
    records = [json.loads(line) for line in output.read_text().splitlines()]
    comparisons = [c for _, c in read_comparisons(output)]
    assert len(records) == len(comparisons) == 6
    for record, comparison in zip(records, comparisons, strict=True):
        assert len(record["gold"]) == len(record["responses"]) == 3
        gold = record["gold"]
        for i, j, p in comparison.pairs():  # tau 0: the labels follow the gold exactly
            assert p == (0.5 if gold[i] == gold[j] else float(gold[i] > gold[j]))
    assert not list(tmp_path.glob("*.partial"))


def test_bad_input_is_one_clear_line_and_writes_nothing(sft_run, tmp_path, capsys):
    existing = tmp_path / "existing.jsonl"
    existing.write_text("keep me\n")
    cases = [
        (label_argv(sft_run, tmp_path / "a.jsonl", "--rule", "kindness"), "unknown gold rule"),
        (label_argv(sft_run, tmp_path / "a.jsonl", "--replies", "1"), "at least 2 replies"),
        (label_argv(sft_run, tmp_path / "a.jsonl", "--tau", "-1"), "--tau -1.0 must be >= 0"),
        (label_argv(sft_run, existing, "--tau", "0"), "exists; remove it"),
        (label_argv(tmp_path / "nowhere", tmp_path / "a.jsonl"), "no config.yaml there"),
        (label_argv(sft_run, tmp_path / "a.jsonl", "--judge", "gold:kindness"), "unknown gold"),
        (label_argv(sft_run, tmp_path / "a.jsonl", "--judge", str(sft_run)), "judge's context"),
        (label_argv(sft_run, tmp_path / "a.jsonl", "--num-prompts", "0"), "at least 1 prompt"),
        (
            label_argv(sft_run, tmp_path / "a.jsonl")[:5] + ["--output", str(tmp_path / "a.jsonl")],
            "--prompts builtin needs --num-prompts N",
        ),
        (
            label_argv(sft_run, tmp_path / "a.jsonl", "--prompts", "calculator"),
            "--prompts calculator: the tool task's prompts are for GRPO and eval",
        ),
        (["watch", str(tmp_path)], "has no metrics.jsonl"),
        (["watch", str(sft_run)], "has no eval line with gold_reward"),
    ]
    for argv, expected in cases:
        assert cli_main(argv) == 2, argv
        errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(errors) == 1 and errors[0].startswith("error:"), errors
        assert expected in errors[0], errors
    assert not (tmp_path / "a.jsonl").exists()
    assert existing.read_text() == "keep me\n"


def test_watch_reports_the_gold_peak_of_a_synthetic_run_and_plots_it(tmp_path, capsys):
    # Gold rises to its peak at step 30 (KL 4 nats per reply) and falls while the proxy rises.
    kls = [0.0, 1.0, 2.25, 4.0, 6.25, 9.0, 12.25]
    golds = [-0.8, -0.75, -0.7, -0.6, -0.7, -0.8, -0.9]
    lines = [{"step": 0, "split": "train", "loss": 1.0}]
    for index, (kl, gold) in enumerate(zip(kls, golds, strict=True)):
        lines.append(
            {
                "step": 10 * index,
                "split": "eval",
                "reward": 0.1 * index,
                "gold_reward": gold,
                "gold_reward_se": 0.01,
                "kl": kl / 8,
                "kl_sequence": kl,
            }
        )
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    plot = tmp_path / "picture.png"
    assert cli_main(["watch", str(tmp_path), "--window", "2", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert (
        "gold peaked at step 30: -0.600 (proxy 0.300) at KL 4.000 nats per reply (sqrt 2.000)"
        in out
    )
    assert "proxy +0.600, gold -0.100; the gold ended 0.300 below its peak" in out
    assert "warning: reward hacking at step 50?" in out  # proxy up, gold down beyond noise
    assert plot.read_bytes().startswith(b"\x89PNG")

    # A run writing its next line as watch reads: the partial last line is left out.
    with (tmp_path / "metrics.jsonl").open("a") as file:
        file.write('{"step": 70, "split": "eval", "reward": 0.7')
    assert cli_main(["watch", str(tmp_path), "--window", "2", "--plot", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "warning: reward hacking at step 50?" in out
    assert f"plot: {tmp_path / 'p.png'}" in out and (tmp_path / "p.png").is_file()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n[1]\n')
    for argv, expected in (
        (["--window", "0"], "--window 0: compare at least 1 eval each side"),
        ([], f"{tmp_path / 'metrics.jsonl'}:2: a metrics line must be a JSON object"),
    ):
        assert cli_main(["watch", str(tmp_path), *argv]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert errors == [f"error: {expected}"]


def stage_argv(stage: str, start_key: str, start, data, out_dir) -> list[str]:
    return [
        stage,
        f"{start_key}={start}",
        f"data.path={data}",
        f"out_dir={out_dir}",
        "train.seq_len=96",
        "train.batch_size=8",
        "data.val_fraction=0.25",
        *TWO_STEPS,
    ]


def test_ai_labels_from_a_reward_judge_train_the_reward_and_dpo_stages(
    sft_run, reward_run, tmp_path, capsys
):
    output = tmp_path / "ai.jsonl"
    argv = label_argv(sft_run, output, "--replies", "3", "--judge", str(reward_run))
    assert cli_main(argv) == 0
    assert "judge" in capsys.readouterr().out
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == 6 * 3  # every pair of 3 distinct replies, 6 prompts
    assert all(
        0.5 <= r["label_probability"] <= 1 and r["judge"] == str(reward_run) for r in records
    )
    assert len({round(r["label_probability"], 6) for r in records}) > 1
    comparisons = [c for _, c in read_comparisons(output)]
    assert [c.label_probability for c in comparisons] == [r["label_probability"] for r in records]
    for stage, key in (("reward", "reward.init_from"), ("dpo", "dpo.policy_from")):
        assert cli_main(stage_argv(stage, key, sft_run, output, tmp_path / stage)) == 0, stage
        assert "18 soft labels" in capsys.readouterr().out, stage
    report = json.loads((tmp_path / "ai.jsonl.agreement.json").read_text())
    assert report["pairs"] == 18 and 0 <= report["gold_agreement"] <= 1
    assert (tmp_path / "ai.jsonl.agreement.png").read_bytes().startswith(b"\x89PNG")


def test_the_gold_judge_labels_with_the_labelers_probability_and_agrees_with_the_gold(
    sft_run, tmp_path
):
    output = tmp_path / "gold.jsonl"
    argv = label_argv(sft_run, output, "--replies", "3", "--judge", "gold:length", "--tau", "0.1")
    assert cli_main(argv) == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    ceiling = []
    for record in records:
        gap = record["gold"][0] - record["gold"][1]
        assert gap >= 0  # the gold-better reply is the chosen one
        expected = 0.5 if gap == 0 else 1 / (1 + math.exp(-gap / 0.1))
        assert record["label_probability"] == pytest.approx(expected, rel=1e-12)
        ceiling.append(expected)
    report = json.loads((tmp_path / "gold.jsonl.agreement.json").read_text())
    if report["gold_decided_pairs"]:
        assert report["gold_agreement"] == 1.0
    # Matching the simulated labelers as often as the best possible judge: their ceiling.
    assert report["human_agreement"] == pytest.approx(sum(ceiling) / len(ceiling))
    # Calibrated by construction against the labelers: predicted = human frequency per bin.
    for row in report["calibration"]:
        assert row["predicted"] == pytest.approx(row["human"], abs=1e-9)
