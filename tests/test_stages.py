"""The stage layout: stages never import each other, a stage started from another run takes
its model and tokenizer, and a rerun that would not fit the run in out_dir changes nothing."""

import argparse
import ast
from pathlib import Path

import pytest
from helpers import pretrain_command

from jaxllm.cli import build_parser
from jaxllm.cli import main as cli_main
from jaxllm.config import load_stage_config

STAGES = Path(__file__).resolve().parents[1] / "jaxllm" / "stages"


def test_no_stage_imports_another_stage():
    for module in STAGES.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxllm.stages"):
                shared = {"common", "paired", "registry", "reports", "rollout"}
                names = (
                    {alias.name for alias in node.names}
                    if node.module == "jaxllm.stages"
                    else {node.module.removeprefix("jaxllm.stages.")}
                )
                assert names <= shared, f"{module.name} imports {node.module}: {names}"


def test_a_stage_started_from_a_run_takes_its_model_and_tokenizer(tmp_path):
    run = tmp_path / "pretrained"
    run.mkdir()
    (run / "config.yaml").write_text(
        "model:\n  embed_dim: 32\n  num_layers: 1\n  mlp_dim: 96\ndata:\n  tokenizer: gpt2\n"
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  embed_dim: 64\n  max_seq_len: 128\n")
    cfg, lines = load_stage_config(
        "sft", recipe, [f"sft.init_from={run}", "model.num_layers=3", "out_dir=x"]
    )
    assert (cfg.model.embed_dim, cfg.model.mlp_dim, cfg.data.tokenizer) == (32, 96, "gpt2")
    assert cfg.model.num_layers == 3  # the command line wins over the run
    assert cfg.model.max_seq_len == 128  # the run does not set it: the recipe's stays
    assert any(line.startswith("model.embed_dim=32 (from") and "said 64" in line for line in lines)
    assert not any(line.startswith("model.num_layers") for line in lines)
    assert load_stage_config("pretrain", recipe, [f"sft.init_from={run}"])[0].model.embed_dim == 64


def test_values_are_checked_after_the_model_is_inherited(tmp_path):
    run = tmp_path / "sft"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  max_seq_len: 128\n")
    # train.seq_len=100 exceeds the defaults' 64 but not the run's 128.
    cfg, _ = load_stage_config("reward", None, [f"reward.init_from={run}", "train.seq_len=100"])
    assert (cfg.model.max_seq_len, cfg.train.seq_len) == (128, 100)
    with pytest.raises(ValueError, match="train.seq_len=200 is longer than model.max_seq_len=128"):
        load_stage_config("reward", None, [f"reward.init_from={run}", "train.seq_len=200"])


def test_a_resumed_run_whose_start_run_is_gone_reads_its_own_config(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.yaml").write_text("model:\n  embed_dim: 32\n")
    cfg, _ = load_stage_config(
        "sft", None, [f"sft.init_from={tmp_path / 'gone'}", f"out_dir={tmp_path / 'out'}"]
    )
    assert cfg.model.embed_dim == 32


def test_a_start_run_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"sft.init_from=.* has no config.yaml"):
        load_stage_config("sft", None, [f"sft.init_from={tmp_path}"])


def test_rerun_with_another_model_is_refused_and_the_run_is_untouched(corpus, tmp_path, capsys):
    out_dir = tmp_path / "run"
    argv = pretrain_command(corpus, out_dir, "train.steps=4", "checkpoint.every=2")[3:]
    assert cli_main(argv) == 0
    config, metrics = (out_dir / "config.yaml").read_text(), (out_dir / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert cli_main([*argv, "model.embed_dim=32", "optimizer.grad_clip=0"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "model.embed_dim: 64 -> 32" in errors[0] and "optimizer.grad_clip: 1.0 -> 0" in errors[0]
    assert (out_dir / "config.yaml").read_text() == config
    assert (out_dir / "metrics.jsonl").read_text() == metrics


def test_help_shows_the_command_line_of_every_command(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in commands.choices:
        assert f"    jaxllm {name} " in shown, name


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["generate", "--prompt", "hi"], "error: jaxllm generate: the following arguments are"),
        (["bogus"], "error: jaxllm: argument command: invalid choice: 'bogus'"),
        (["pretrain", "--steps", "3"], "error: jaxllm: unrecognized arguments: --steps (a stage"),
    ],
)
def test_a_bad_command_line_is_one_error_line(capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(expected), err
