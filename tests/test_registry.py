"""The stage registry: the CLI, config loading, the pipeline and its report iterate over it,
so a stage registered from outside jaxllm runs as a command and as a pipeline stage, and no
module outside `jaxllm/stages/` lists the stages again."""

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from jaxllm.cli import build_parser
from jaxllm.cli import main as cli_main
from jaxllm.config import Config, load_stage_config
from jaxllm.metrics import read_metrics
from jaxllm.stages.registry import STAGES, StageSpec, register_stage, stage

PACKAGE = Path(__file__).resolve().parents[1] / "jaxllm"
TOY_SETTINGS = {
    "preset": "tiny",
    "data": {"path": "builtin"},
    "train": {"steps": 2, "eval_every": 1000, "samples": 0},
    "optimizer": {"lr": 0.003, "warmup_steps": 0},
    "checkpoint": {"every": 5},
}


@pytest.fixture
def toy_stage_registered():
    """The toy RL stage of tests/toy_rl_stage.py, registered as `toy_rl` for one test."""
    spec = register_stage(StageSpec("toy_rl", "a toy RL stage", module="toy_rl_stage"))
    yield spec
    del STAGES[spec.name]


def test_every_registered_stage_has_its_section_module_and_start_key():
    sections = {field.name for field in dataclasses.fields(Config)}
    for name, spec in STAGES.items():
        assert spec.section in (sections | {None}), f"Config has no section {spec.section}"
        assert (PACKAGE / "stages" / f"{name}.py").is_file()
        assert spec.start_key is None or spec.start_key.split(".")[0] == spec.section
        assert callable(getattr(spec._module(), name))
    assert STAGES["ppo"].required_keys() == ("ppo.policy_from", "ppo.reward_from", "data.path")
    assert STAGES["sft"].required_keys() == ("data.path",)  # init_from is optional
    with pytest.raises(ValueError, match="unknown stage 'rloo'; choose from pretrain, sft"):
        stage("rloo")
    with pytest.raises(ValueError, match="'grpo' is registered already"):
        register_stage(StageSpec("grpo", "again"))


def _string_constants(path: Path) -> set[str]:
    return {
        node.value
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


def test_a_stage_name_is_a_literal_in_at_most_two_modules_outside_the_stages():
    modules = [p for p in PACKAGE.rglob("*.py") if "stages" not in p.relative_to(PACKAGE).parts]
    constants = {path: _string_constants(path) for path in modules}
    for name in STAGES:
        holders = sorted(str(p.relative_to(PACKAGE)) for p, c in constants.items() if name in c)
        assert len(holders) <= 2, f"'{name}' is written out in {holders}"


def test_the_cli_offers_each_registered_stage(toy_stage_registered):
    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(STAGES) <= set(commands)
    assert commands["toy_rl"].format_usage().startswith("usage: jaxllm toy_rl")


def test_a_stage_registered_from_outside_runs_as_a_command_and_in_a_pipeline(
    toy_stage_registered, tmp_path, capsys
):
    overrides = [
        f"{key}.{name}={value}" if isinstance(values, dict) else f"{key}={values}"
        for key, values in TOY_SETTINGS.items()
        for name, value in (values.items() if isinstance(values, dict) else [(None, None)])
    ]
    assert cli_main(["toy_rl", f"out_dir={tmp_path / 'alone'}", *overrides]) == 0
    alone = [line for line in read_metrics(tmp_path / "alone" / "metrics.jsonl")]
    assert [line["step"] for line in alone] == [1, 2]
    assert json.loads((tmp_path / "alone" / "run.json").read_text()) == {"stage": "toy_rl"}

    config = tmp_path / "pipeline.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "out_dir": str(tmp_path / "life"),
                "stages": ["toy_rl"],
                "report_prompts": 0,
                "toy_rl": TOY_SETTINGS,
            }
        )
    )
    assert cli_main(["pipeline", "--config", str(config)]) == 0
    assert "toy_rl: no eval lines" in capsys.readouterr().out
    in_pipeline = read_metrics(tmp_path / "life" / "toy_rl" / "metrics.jsonl")
    drop = ("time_s", "tokens_per_sec", "mfu", "compile")
    for a, b in zip(alone, in_pipeline, strict=True):  # the same run, either way
        assert {k: v for k, v in a.items() if not any(d in k for d in drop)} == {
            k: v for k, v in b.items() if not any(d in k for d in drop)
        }


def test_the_start_key_comes_from_the_registry(tmp_path):
    run = tmp_path / "sft"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  embed_dim: 32\n  mlp_dim: 96\n  max_seq_len: 128\n")
    for name in ("dpo", "grpo"):
        cfg, _ = load_stage_config(name, None, [f"{STAGES[name].start_key}={run}"])
        assert cfg.model.embed_dim == 32
