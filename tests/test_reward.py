"""`jaxllm reward`: a reward model learns a preference it can see, and does not learn
shuffled labels (the control that shows the eval can fail)."""

import json
import random

import pytest

from jaxllm.cli import main as cli_main
from jaxllm.metrics import read_metrics


def write_preferences(path, count: int, shuffle_labels: bool, seed: int = 0) -> None:
    """Replies of 12 random letters; the preferred one holds more 'a's. Mixed formats: string
    pairs, message pairs, rankings of three by scores, a few soft labels."""
    rng = random.Random(seed)

    def reply(a_share: float) -> str:
        return "".join("a" if rng.random() < a_share else rng.choice("bcdefgh") for _ in range(12))

    lines = []
    for index in range(count):
        good, bad = reply(0.7), reply(0.1)
        if shuffle_labels and rng.random() < 0.5:
            good, bad = bad, good
        if index % 5 == 0:
            middle = reply(0.4)
            record = {"prompt": "rate", "responses": [bad, good, middle], "scores": [0, 2, 1]}
        elif index % 5 == 1:
            record = {
                "prompt": [{"role": "user", "content": "rate"}],
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": bad}],
            }
        else:
            record = {"prompt": "rate", "chosen": good, "rejected": bad}
            if index % 7 == 0:
                record["label_probability"] = 0.9
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")


def held_out(tmp_path, shuffle_labels: bool, capsys) -> dict:
    data = tmp_path / f"prefs_{shuffle_labels}.jsonl"
    write_preferences(data, 400, shuffle_labels)
    out_dir = tmp_path / f"rm_{shuffle_labels}"
    argv = [
        "reward",
        "preset=tiny",
        f"data.path={data}",
        f"out_dir={out_dir}",
        "model.max_seq_len=64",
        "train.seq_len=48",
        "train.batch_size=16",
        "train.steps=80",
        "train.eval_every=80",
        "data.val_fraction=0.25",
        "optimizer.lr=3e-3",
        "optimizer.warmup_steps=5",
        "reward.max_replies=3",
    ]
    assert cli_main(argv) == 0
    assert "400 comparisons (80 rankings of more than 2 replies" in capsys.readouterr().out
    (line,) = [r for r in read_metrics(out_dir / "metrics.jsonl") if r["split"] == "eval"]
    return line


def test_a_reward_model_learns_a_visible_preference_and_not_shuffled_labels(tmp_path, capsys):
    learned = held_out(tmp_path, shuffle_labels=False, capsys=capsys)
    control = held_out(tmp_path, shuffle_labels=True, capsys=capsys)
    print(f"held out, labels as given: {learned}\nheld out, labels shuffled: {control}")  # figures
    assert learned["accuracy"] > 0.9 and learned["margin"] > 1.0
    assert 0.35 < control["accuracy"] < 0.65, control
    assert control["loss"] > learned["loss"]


def test_plackett_luce_refuses_soft_labels(tmp_path, capsys):
    data = tmp_path / "prefs.jsonl"
    write_preferences(data, 40, shuffle_labels=False)
    argv = ["reward", "preset=tiny", f"data.path={data}", f"out_dir={tmp_path / 'rm'}"]
    assert cli_main([*argv, "reward.loss=plackett_luce"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "use reward.loss=pairs" in errors[0]
    assert not (tmp_path / "rm" / "config.yaml").exists()


@pytest.mark.parametrize("override", ["reward.loss=hinge", "reward.max_replies=1"])
def test_bad_reward_settings_are_one_config_error(tmp_path, capsys, override):
    assert cli_main(["reward", "preset=tiny", f"out_dir={tmp_path}", override]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and override.split("=")[0] in errors[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "data.path is not set"),
        (["reward.max_replies=2"], "3 replies but reward.max_replies=2"),
        (["train.seq_len=8"], "training comparisons fit train.seq_len=8"),
        (["data.eval_path=EMPTY"], "empty.jsonl holds no comparisons; add .jsonl lines"),
    ],
)
def test_bad_reward_data_is_one_error_and_writes_no_run(tmp_path, capsys, extra, message):
    data = tmp_path / "prefs.jsonl"
    write_preferences(data, 40, shuffle_labels=False)
    argv = ["reward", "preset=tiny", f"out_dir={tmp_path / 'rm'}"]
    if extra:
        argv.append(f"data.path={data}")
    (tmp_path / "empty.jsonl").write_text("\n")
    extra = [e.replace("EMPTY", str(tmp_path / "empty.jsonl")) for e in extra]
    assert cli_main([*argv, *extra]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], captured.err
    assert "Traceback" not in captured.err
    assert not (tmp_path / "rm" / "config.yaml").exists()
