"""`jaxllm label` and `jaxllm watch` from the command line: a labelled file the reward stage
reads, and one clear line for each bad input with nothing written."""

import json

import pytest
from helpers import tiny_sft_run

from jaxllm.cli import main as cli_main
from jaxllm.data.preferences import read_comparisons


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("label")
    tiny_sft_run(root / "sft")
    return root / "sft"


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
