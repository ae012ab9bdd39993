"""`jaxllm pipeline`: stages chained through their checkpoints, a kill -9 in the middle of PPO
resumed by rerunning the same command (finished stages skipped, PPO's metrics those of
an uninterrupted run), the report, and one clear line for each bad config."""

import io
import json
import re
import shutil
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml
from helpers import cpu_environment, kill_9_after_first_checkpoint

from jaxllm.cli import main as cli_main
from jaxllm.data import builtin_chat
from jaxllm.errors import ConfigError
from jaxllm.metrics import read_metrics
from jaxllm.pipeline import check_data_exists, check_plan, read_plan

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "experiments" / "configs"
QUIET = {"eval_at_start": True, "samples": 0, "eval_batches": 1}

# The tiny model through every stage, a few steps each (about a minute and a half on CPU).
TINY_PIPELINE = {
    "stages": ["pretrain", "sft", "label", "reward", "ppo", "grpo", "dpo"],
    "report_prompts": 2,
    "pretrain": {
        "preset": "tiny",
        "model": {"max_seq_len": 128, "scan_layers": False},
        "data": {"path": "pydoc", "tokenizer": "bytes"},
        "train": {"steps": 4, "batch_size": 4, "seq_len": 64, "eval_every": 4, **QUIET},
        "checkpoint": {"every": 4},
    },
    "sft": {
        "data": {"path": "builtin"},
        "train": {"steps": 4, "batch_size": 4, "seq_len": 128, "eval_every": 4, **QUIET},
        "sft": {"builtin_examples": 100, "eval_prompts": 7, "max_new_tokens": 16},
        "checkpoint": {"every": 4},
    },
    "label": {"prompts": 12, "eval_prompts": 6, "replies": 3, "max_new_tokens": 16},
    "reward": {
        "train": {"steps": 2, "batch_size": 4, "seq_len": 128, "eval_every": 2, **QUIET},
        "checkpoint": {"every": 2},
    },
    "ppo": {
        "data": {"path": "builtin"},
        "train": {"steps": 6, "batch_size": 4, "eval_every": 3, **QUIET},
        "ppo": {
            "max_new_tokens": 16,
            "epochs": 1,
            "minibatches": 2,
            "eval_prompts": 4,
            "builtin_prompts": 32,
            "gold_rule": "length",
            "kl_target": 0.1,
        },
        "checkpoint": {"every": 2},
    },
    "grpo": {
        "from": "sft",  # a branch: GRPO from SFT's model, not PPO's
        "data": {"path": "builtin"},
        "train": {"steps": 2, "batch_size": 2, "eval_every": 2, **QUIET},
        "grpo": {
            "group_size": 2,
            "max_new_tokens": 8,
            "eval_prompts": 7,
            "builtin_prompts": 16,
            "pass_k": 2,
        },
        "checkpoint": {"every": 2},
    },
    "dpo": {
        "train": {"steps": 2, "batch_size": 4, "seq_len": 128, "eval_every": 2, **QUIET},
        "checkpoint": {"every": 2},
    },
}
TIMINGS = ("time_s", "tokens_per_sec", "mfu", "compile")  # keys that vary from run to run


def write_pipeline(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def pipeline_argv(config: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "jaxllm.cli", "pipeline", "--config", str(config), *overrides]


def run_pipeline(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        pipeline_argv(config, *overrides),
        env=cpu_environment(1),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def ppo_train_lines(run_dir: Path) -> list[dict]:
    return [
        {k: v for k, v in line.items() if not any(t in k for t in TIMINGS)}
        for line in read_metrics(run_dir / "metrics.jsonl")
        if line["split"] == "train"
    ]


def test_a_pipeline_killed_in_ppo_continues_where_it_stopped(tmp_path):
    out = tmp_path / "life"
    config = write_pipeline(tmp_path / "life.yaml", {"out_dir": str(out), **TINY_PIPELINE})
    kill_9_after_first_checkpoint(pipeline_argv(config), out / "ppo")
    record = json.loads((out / "pipeline.json").read_text())
    assert sorted(record["stages"]) == ["label", "pretrain", "reward", "sft"]
    assert not (out / "report.md").exists()

    rerun = run_pipeline(config)
    for stage in ("pretrain", "sft", "label", "reward"):
        assert f"pipeline: {stage}: finished before, skipped" in rerun.stdout
    assert "finished with other settings" not in rerun.stdout, rerun.stdout  # the same command
    assert "pipeline: ran ppo, grpo, dpo" in rerun.stdout
    # A 4-step SFT model never ends a reply: GRPO says so (one line) and goes on.
    assert "none of the 4 replies of step 0 ends with <|im_end|>" in rerun.stderr
    ppo_steps = [line["step"] for line in ppo_train_lines(out / "ppo")]
    assert ppo_steps == list(range(1, 7))  # resumed from its checkpoint, each step once

    # The same pipeline without the kill: the finished stages copied, PPO run whole.
    whole = tmp_path / "whole"
    for stage in ("pretrain", "sft", "label", "reward"):
        shutil.copytree(out / stage, whole / stage)
    kept = {s: record["stages"][s] for s in ("pretrain", "sft", "label", "reward")}
    (whole / "pipeline.json").write_text(json.dumps({"stages": kept}))
    run_pipeline(config, f"out_dir={whole}", "stages=[pretrain,sft,label,reward,ppo]")
    assert ppo_train_lines(out / "ppo") == ppo_train_lines(whole / "ppo")

    # Stages start from each other: SFT from pre-training, PPO from SFT and the reward run,
    # GRPO from SFT (its `from`), the reward model and DPO on the label stage's comparisons.
    ppo_cfg = yaml.safe_load((out / "ppo" / "config.yaml").read_text())
    assert ppo_cfg["ppo"]["policy_from"] == str(out / "sft")
    assert ppo_cfg["ppo"]["reward_from"] == str(out / "reward")
    dpo_cfg = yaml.safe_load((out / "dpo" / "config.yaml").read_text())
    assert dpo_cfg["dpo"]["policy_from"] == str(out / "grpo")
    assert dpo_cfg["data"]["path"] == str(out / "label" / "labels_train.jsonl")
    sft_cfg = yaml.safe_load((out / "sft" / "config.yaml").read_text())
    assert sft_cfg["sft"]["init_from"] == str(out / "pretrain")
    assert sft_cfg["model"]["max_seq_len"] == 128  # inherited from the pre-training stage

    report = (out / "report.md").read_text()
    for stage in TINY_PIPELINE["stages"]:
        assert f"## {stage}" in report
    lineage = report[report.index("## Lineage") :].split("\n\n")[1]  # from the records
    assert "| sft | init_from: pretrain at step 4 |" in lineage
    assert "| ppo | policy_from: sft at step 4; reward_from: reward at step 2 |" in lineage
    assert "| grpo | policy_from: sft at step 4 |" in lineage
    assert f"| dpo | policy_from: grpo at step 2 | data.path: {out / 'label'}" in lineage
    assert "now holds another run" not in lineage
    for stage in ("sft", "reward", "ppo", "grpo", "dpo"):  # each change against its noise
        headlines = report[: report.index("## Lineage")].splitlines()
        (row,) = [line for line in headlines if line.startswith(f"| {stage} |")]
        assert re.search(r"± \d\.\d{3}: \d+\.\d SE, (beyond|within) noise|no change", row), row
    assert (out / "report" / "ppo.png").is_file()
    assert "![ppo](report/ppo.png)\n\n## grpo" in report  # a plot, a blank line, a heading
    record = json.loads((out / "pipeline.json").read_text())
    assert len(record["stages"]["dpo"]["answers"]) == 2
    assert "     ppo: proxy reward" in rerun.stdout
    assert f"report: {out / 'report.md'}" in rerun.stdout

    # Everything finished: nothing runs; the report keeps the prompts it chose first.
    again = run_pipeline(config, "report_prompts=1", "dpo.optimizer.lr=0.5")
    assert "pipeline: nothing to run" in again.stdout
    assert "note: dpo finished with other settings than these (optimizer.lr: " in again.stdout
    assert again.stdout.count("finished with other settings") == 1, again.stdout
    assert report == (out / "report.md").read_text()
    shutil.rmtree(out / "dpo")  # a deleted stage runs again
    assert "pipeline: ran dpo" in run_pipeline(config).stdout


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stages=[pretrain,rlhf]"], "stages: unknown stage(s) rlhf"),
        (["stages=[sft,sft]"], "must name at least one stage, each once"),
        (["ppo.ppo.kl_targt=0.1"], "ppo: unknown config key 'ppo.kl_targt'"),
        (["ppo.train.steps=many"], "ppo: "),
        (["ppo.out_dir=elsewhere"], "ppo.out_dir is set by the pipeline"),
        (["ppo=5"], "'ppo' is a stage's section"),
        (["label.rule=shortest"], "label.rule=shortest: choose one of"),
        (["sft.config=missing.yaml"], "sft.config=missing.yaml: no such file"),
        (["grpo.grpo.group_size=1"], "grpo: "),
        (["bogus=1"], "bogus"),
        (["stages=[pretrain,sft,reward]"], "error: reward.data.path is not set"),
        (["stages=[pretrain,sft,label,ppo,reward]"], "error: ppo.ppo.reward_from is not set"),
        (["ppo.ppo.max_new_tokens=100"], "ppo.max_new_tokens=100 = 164 exceed model.max_seq_len"),
        (["label.tau=-1"], "label.tau must be >= 0"),
        (["sft.config=5"], "sft.config=5 must be a file name"),
        (["grpo.data.eval_path=/nowhere.jsonl"], "grpo.data.eval_path '/nowhere.jsonl' does no"),
        (["grpo.from=reward"], "grpo.from=reward: name a policy stage that runs before grpo"),
        (["sft.from=ppo"], "sft.from=ppo: name a policy stage that runs before sft (pretrain)"),
        (["grpo.from=sft", "grpo.grpo.policy_from=/x"], "keep one (grpo.from=null drops"),
        (["pretrain.from=sft"], "pretrain.from=sft: pretrain starts from no earlier stage"),
    ],
)
def test_bad_pipeline_configs_are_refused_before_any_stage_runs(
    tmp_path, capsys, overrides, message
):
    out = tmp_path / "never"
    code = cli_main(
        ["pipeline", "--config", str(CONFIGS / "quickstart.yaml"), f"out_dir={out}", *overrides]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert all(line.startswith("error: ") for line in err.strip().splitlines()), err
    assert not out.exists()


def test_an_error_inside_a_stage_names_the_stage(tmp_path, capsys):
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("café".encode("latin-1"))  # found by the check, unreadable in the stage
    out = tmp_path / "life"
    argv = ["--config", str(CONFIGS / "quickstart.yaml"), f"out_dir={out}"]
    code = cli_main(["pipeline", *argv, "stages=[pretrain]", f"pretrain.data.path={corpus}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert err == [
        f"error: pipeline stage pretrain: {corpus}: byte 3 is not valid UTF-8; "
        "re-encode the file as UTF-8"
    ], err


def test_the_tool_pipeline_chains_sft_into_grpo_with_the_calculator_and_needs_no_file(tmp_path):
    plan = read_plan(CONFIGS / "tool_pipeline.yaml", [f"out_dir={tmp_path}"])
    resolved = check_plan(plan)
    check_data_exists(plan, resolved)  # data.path=calculator names no file
    sft, grpo = resolved["sft"], resolved["grpo"]
    assert (sft.data.path, sft.sft.tool_fraction, sft.sft.init_from) == ("calculator", 0.2, None)
    assert (grpo.data.path, grpo.grpo.policy_from) == ("calculator", str(tmp_path / "sft"))
    assert (grpo.grpo.tools, grpo.grpo.max_turns) == (["calculator"], 3)
    assert grpo.grpo.rewards == {"correct": 1.0, "format": 0.0}
    assert grpo.train.seed == sft.train.seed == 0


def test_the_quickstart_and_scale_up_configs_validate(tmp_path):
    resolved = check_plan(read_plan(CONFIGS / "quickstart.yaml", []))
    assert resolved["grpo"].grpo.rewards == {"correct": 1.0, "format": 0.1}  # the recipe's
    assert resolved["grpo"].data.builtin_families == ["add"]
    assert resolved["sft"].data.builtin_family_names() == builtin_chat.FAMILIES
    assert resolved["sft"].sft.builtin_system_fraction == 0.0
    # A dict given on the command line is merged over the file's.
    merged = check_plan(read_plan(CONFIGS / "quickstart.yaml", ["grpo.grpo.rewards={format: 0.5}"]))
    assert merged["grpo"].grpo.rewards == {"correct": 1.0, "format": 0.5}
    assert resolved["ppo"].model.max_seq_len == 128  # inherited through SFT
    assert list(check_plan(read_plan(CONFIGS / "quickstart.yaml", ["stages=[pretrain]"]))) == [
        "pretrain"
    ]
    # One seed for every stage and the labels; a stage's own override wins.
    plan = read_plan(CONFIGS / "quickstart.yaml", ["seed=3", "sft.train.seed=5"])
    seeded = check_plan(plan)
    assert {s: c.train.seed for s, c in seeded.items()} == {
        "pretrain": 3, "sft": 5, "reward": 3, "ppo": 3, "grpo": 3
    }  # fmt: skip
    assert plan.cfg.label.seed == 3 and resolved["sft"].train.seed == 0
    # GRPO branches from SFT (its `from`), PPO from the latest policy stage before it.
    out = Path(resolved["sft"].out_dir).parent
    assert resolved["grpo"].grpo.policy_from == str(out / "sft")
    assert resolved["ppo"].ppo.policy_from == str(out / "sft")
    moved = check_plan(read_plan(CONFIGS / "quickstart.yaml", ["grpo.from=ppo"]))
    assert moved["grpo"].grpo.policy_from == str(out / "ppo")
    # A run named on the command line wins over the file's `from`.
    own = read_plan(CONFIGS / "quickstart.yaml", ["grpo.grpo.policy_from=/elsewhere"])
    assert own.starts_from == {}  # the config's `seed: 0` first, then the command line's
    assert own.overrides["grpo"] == ["train.seed=0", "grpo.policy_from=/elsewhere"]
    with pytest.raises(ConfigError, match="seed=-1 must be >= 0"):
        read_plan(CONFIGS / "quickstart.yaml", ["seed=-1"])
    # The scale-up pipeline starts from an imported Hugging Face model: a run folder whose
    # config.yaml gives the model's shape (here Qwen2.5-0.5B's, as import-hf writes it).
    imported = tmp_path / "qwen"
    imported.mkdir()
    model = {
        "vocab_size": 151_936,
        "num_layers": 24,
        "num_heads": 14,
        "num_kv_heads": 2,
        "embed_dim": 896,
        "mlp_dim": 4864,
        "max_seq_len": 4096,
        "rope_theta": 1_000_000.0,
        "qkv_bias": True,
    }
    model.update({"dtype": "float32", "remat": "none", "max_seq_len": 32_768})
    values = {"model": model, "data": {"tokenizer": str(imported / "tokenizer.json")}}
    run_config = {**values, "chat": {"template": "chatml"}}
    (imported / "config.yaml").write_text(yaml.safe_dump(run_config))
    plan = read_plan(CONFIGS / "pipeline_scale_up.yaml", [f"sft.sft.init_from={imported}"])
    resolved = check_plan(plan)
    assert list(resolved) == ["sft", "reward", "ppo", "grpo"]
    for cfg in resolved.values():  # the shape from the import, the rest from the sections
        assert (cfg.model.embed_dim, cfg.model.qkv_bias, cfg.chat.template) == (896, True, "chatml")
        assert (cfg.model.dtype, cfg.model.remat, cfg.model.max_seq_len) == (
            "bfloat16",
            "dots",
            1024,
        )
    assert resolved["ppo"].ppo.policy_from == str(Path(plan.cfg.out_dir) / "sft")


def test_stage_paths_stay_whole_and_own_data_is_not_mixed_with_the_labels(tmp_path):
    odd = tmp_path / "runs #2: [x]"  # YAML would cut it at ' #' unless kept quoted
    plan = read_plan(
        CONFIGS / "quickstart.yaml",
        [f"out_dir={json.dumps(str(odd))}", f"reward.data.path={tmp_path / 'mine.jsonl'}"],
    )
    resolved = check_plan(plan)
    assert resolved["sft"].out_dir == str(odd / "sft")
    assert resolved["sft"].sft.init_from == str(odd / "pretrain")
    assert resolved["reward"].data.path == str(tmp_path / "mine.jsonl")
    assert resolved["reward"].data.eval_path is None  # not the label stage's held-out file


def test_a_stage_whose_inputs_changed_is_redone_and_so_are_the_stages_after_it(tmp_path):
    """Pre-training continued to more steps: SFT, made from its old checkpoint, is redone
    (its run set aside), and the labels sampled from the old SFT are relabelled whole; then
    new label settings redo the label stage alone."""
    out = tmp_path / "life"
    stages = {k: TINY_PIPELINE[k] for k in ("pretrain", "sft", "label")}
    for name in ("pretrain", "sft"):  # in-process: 8 devices
        stages[name] = {**stages[name], "train": {**stages[name]["train"], "batch_size": 8}}
    config = write_pipeline(
        tmp_path / "life.yaml",
        {"out_dir": str(out), "stages": list(stages), "report_prompts": 0, **stages},
    )
    assert cli_main(["pipeline", "--config", str(config)]) == 0
    first_sft = json.loads((out / "sft" / "inputs.json").read_text())["run_id"]

    argv = ["pipeline", "--config", str(config), "pretrain.train.steps=6"]
    with redirect_stdout(io.StringIO()) as printed:
        assert cli_main(argv) == 0
    lines = printed.getvalue().splitlines()
    sft_line = next(line for line in lines if line.startswith("pipeline: sft: redone"))
    assert "sft.init_from:" in sft_line and "is now at step 6 (this run read step 4)" in sft_line
    assert any(line.startswith("pipeline: label: redone") for line in lines)
    assert (out / "sft.stale" / "checkpoints").is_dir() and (out / "label.stale").is_dir()
    assert json.loads((out / "sft" / "inputs.json").read_text())["run_id"] != first_sft

    with redirect_stdout(io.StringIO()) as printed:
        assert cli_main([*argv, "label.prompts=8"]) == 0
    lines = printed.getvalue().splitlines()
    assert "pipeline: sft: finished before, skipped" in "\n".join(lines)
    label_line = next(line for line in lines if line.startswith("pipeline: label: redone"))
    assert "label.prompts: 12 -> 8" in label_line
    labels = (out / "label" / "labels_train.jsonl").read_text().splitlines()
    assert len(labels) == 8  # one comparison per prompt, none left from the 12 before


def test_a_stale_stage_is_set_aside_never_over_an_earlier_one(tmp_path):
    from jaxllm.pipeline import _set_aside

    for round_ in range(3):
        (tmp_path / "sft").mkdir()
        (tmp_path / "sft" / "round").write_text(str(round_))
        _set_aside(tmp_path / "sft")
    kept = {p.name: (p / "round").read_text() for p in tmp_path.iterdir()}
    assert kept == {"sft.stale": "0", "sft.stale-2": "1", "sft.stale-3": "2"}


def test_the_lineage_marks_a_start_run_that_is_no_longer_the_one_read(tmp_path):
    from jaxllm.pipeline_report import lineage_lines

    def run_folder(stage: str, run_id: str, step: int, inputs: dict) -> None:
        (tmp_path / stage / "checkpoints" / str(step)).mkdir(parents=True)
        record = {"run_id": run_id, "inputs": inputs}
        (tmp_path / stage / "inputs.json").write_text(json.dumps(record))

    pretrain = str(tmp_path.resolve() / "pretrain")
    run_folder("pretrain", "first", 5, {"data.path": {"value": "builtin"}})
    read = {"path": pretrain, "step": 5, "run_id": "first"}
    run_folder("sft", "s", 3, {"sft.init_from": [read], "data.path": {"value": "builtin"}})
    lines = lineage_lines(tmp_path, ["pretrain", "sft"])
    assert lines[-2:] == [
        "| pretrain | - | data.path: builtin |",
        "| sft | init_from: pretrain at step 5 | data.path: builtin |",
    ]
    (tmp_path / "pretrain" / "inputs.json").write_text(json.dumps({"run_id": "redone"}))
    assert "(**that folder now holds another run or step**)" in lineage_lines(tmp_path, ["sft"])[-1]
