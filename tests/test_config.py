"""Config loading: presets, YAML, overrides, and one clear error line per mistake."""

from pathlib import Path

import pytest
import yaml

from jaxllm.config import MODEL_PRESETS, load_config, to_yaml
from jaxllm.errors import ConfigError
from jaxllm.model import LanguageModel


def test_yaml_then_overrides_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: shakespeare\ntrain:\n  steps: 7\n  batch_size: 4\nout_dir: a\n")
    cfg = load_config(path, ["train.steps=9", "mesh.fsdp=2", "model.remat=dots"])
    assert (cfg.train.steps, cfg.train.batch_size, cfg.out_dir) == (9, 4, "a")
    assert (cfg.mesh.fsdp, cfg.model.remat) == (2, "dots")
    assert (cfg.model.num_layers, cfg.model.embed_dim, cfg.model.max_seq_len) == (4, 128, 64)


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["preset=tiny", "model.scalar_heads=[value]", "train.seed=3"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("preset", "millions"),
    [
        ("tiny", 0.119),
        ("shakespeare", 0.83),
        ("gpt2_124m", 123.6),
        ("gpt2_350m", 359.8),
        ("llama_1b", 1178.7),
    ],
)
def test_presets_have_their_sizes(preset, millions):
    cfg = load_config(None, [f"preset={preset}"])
    assert cfg.model == MODEL_PRESETS[preset]
    assert LanguageModel(cfg.model).param_count() / 1e6 == pytest.approx(millions, abs=0.05)


@pytest.mark.parametrize(
    ("overrides", "expected_line"),
    [
        (["model.foo=1"], "unknown config key 'model.foo': section 'model' has no 'foo'"),
        (["bogus=1"], "unknown config key 'bogus': the top level has no 'bogus'"),
        (
            ["model.num_layers=abc"],
            "config key 'model.num_layers' has the wrong type: got 'abc', expected int",
        ),
        (
            ["optimizer.lr=fast"],
            "config key 'optimizer.lr' has the wrong type: got 'fast', expected float",
        ),
        (
            ["model.num_heads=3", "model.num_kv_heads=1"],
            "model.num_heads=3 does not divide model.embed_dim=64; pick a head count that divides",
        ),
        (["model.num_kv_heads=3"], "model.num_kv_heads=3 does not divide model.num_heads=4"),
        (
            ["train.seq_len=128"],
            "train.seq_len=128 is longer than model.max_seq_len=64; shorten train.seq_len",
        ),
        (["mesh.data=-1", "mesh.fsdp=-1"], "at most one of mesh.data, mesh.fsdp, mesh.tensor"),
        (["mesh.tensor=0"], "mesh.tensor=0 must be >= 1, or -1 for the rest"),
        (["model.dtype=float8"], "model.dtype='float8' is unknown"),
        (["model.attention=flash"], "model.attention='flash' is unknown"),
        (["model.remat=some"], "model.remat='some' is unknown"),
        (
            ["train.batch_size=6", "train.grad_accum=4"],
            "train.batch_size=6 does not divide into train.grad_accum=4 micro-batches",
        ),
        (
            ["sft.builtin_system_fraction=1.5"],
            "sft.builtin_system_fraction=1.5 must lie in [0, 1] (0: no system prompt)",
        ),
        (["sft.tool_fraction=-0.1"], "sft.tool_fraction=-0.1 must lie in [0, 1]"),
        (
            ["data.builtin_families=[add,sum]"],
            "data.builtin_families='sum' is unknown; use repeat, uppercase, reverse, count, sort,",
        ),
        (["preset=huge"], "unknown preset 'huge'; choose one of tiny, shakespeare"),
        (["train.steps"], "override 'train.steps' is not of the form dotted.key=value"),
    ],
)
def test_bad_config_fails_at_load_naming_key_and_fix(overrides, expected_line):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["preset=tiny", *overrides])
    assert any(line.startswith(expected_line) for line in str(error.value).splitlines()), str(
        error.value
    )


def test_every_mistake_gets_its_own_line():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["model.num_kv_heads=3", "train.seq_len=999", "model.remat=x"])
    assert len(str(error.value).splitlines()) == 3


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listing)


def stage_configs() -> list[Path]:
    """The experiment configs of one stage (pipeline configs, with `stages`, are
    test_pipeline's)."""
    paths = sorted((Path(__file__).resolve().parents[1] / "experiments/configs").glob("*.yaml"))
    return [p for p in paths if "stages" not in (yaml.safe_load(p.read_text()) or {})]


@pytest.mark.parametrize("path", stage_configs())
def test_every_experiment_config_loads_and_builds(path):
    cfg = load_config(path)
    model = LanguageModel(cfg.model)
    assert cfg.train.seq_len <= cfg.model.max_seq_len
    assert model.param_count() > 0


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.seed=99999999999999999999", "train.seed=99999999999999999999 is out of range"),
        ("model.num_layers=4294967296", "model.num_layers=4294967296 is out of range"),
        ("train.seed=-1", "train.seed must be >= 0, got -1"),
    ],
)
def test_integers_beyond_int32_and_negative_seeds_are_config_errors(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


def test_a_relative_tokenizer_file_is_kept_as_an_absolute_path(tmp_path, monkeypatch):
    """config.yaml names the file so that the run works from any directory."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.tokenizer=mine.tiktoken"])
    assert cfg.data.tokenizer == str(tmp_path / "mine.tiktoken")
    assert load_config(None, ["data.tokenizer=gpt2"]).data.tokenizer == "gpt2"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("=5", "override '=5' is not of the form dotted.key=value"),
        ("train.seq_len=0", "train.seq_len must be >= 1, got 0"),
        ("ppo.pack_rollouts=0", "ppo.pack_rollouts must be >= 1, got 0"),
        ("grpo.pack_groups=0", "grpo.pack_groups must be >= 1, got 0"),
    ],
)
def test_an_override_without_a_key_and_a_zero_length_say_so(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


def test_a_folder_given_as_config_file_says_so(tmp_path):
    with pytest.raises(ConfigError, match="is a folder; pass --config with a YAML file"):
        load_config(tmp_path)


def test_dual_clip_is_null_or_above_one():
    assert load_config(None, ["ppo.dual_clip=3", "grpo.dual_clip=1.5"]).ppo.dual_clip == 3.0
    assert load_config(None, ["ppo.dual_clip=null"]).ppo.dual_clip is None
    for section in ("ppo", "grpo"):
        with pytest.raises(ConfigError, match=rf"{section}.dual_clip=1.0 must be > 1"):
            load_config(None, [f"{section}.dual_clip=1.0"])


def test_dpo_losses_and_the_rpo_coefficient_are_checked():
    assert load_config(None, ["dpo.loss=hinge", "dpo.nll_coef=1.0"]).dpo.loss == "hinge"
    assert load_config(None, ["dpo.loss=simpo", "dpo.nll_coef=1.0"]).dpo.nll_coef == 1.0
    for overrides, message in (
        (["dpo.loss=kto"], "use sigmoid, ipo, hinge, simpo or orpo"),
        (["dpo.nll_coef=-1"], "dpo.nll_coef must be >= 0, got -1.0"),
        (["dpo.simpo_gamma=-0.1"], "dpo.simpo_gamma must be >= 0, got -0.1"),
        (["dpo.loss=orpo", "dpo.nll_coef=0.5"], "orpo already adds the best reply's NLL"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)


def test_each_section_checks_itself_and_a_stage_adds_its_rules_between_sections():
    from jaxllm.config import PPOConfig, validate

    assert PPOConfig(clip_eps=0).problems() == ["ppo clip values must be > 0"]
    assert PPOConfig().problems() == []
    cfg = load_config(
        None, ["train.batch_size=6", "ppo.minibatches=4", "model.max_seq_len=128"], check=False
    )
    assert validate(cfg) == []  # PPO's batch split is PPO's rule, not every stage's
    assert validate(cfg, "ppo") == [
        "train.batch_size=6 rollouts do not split into ppo.minibatches=4 equal minibatches"
    ]
    assert validate(cfg, "grpo") == []  # 6 x 8 replies split into 1 minibatch
    wrong = load_config(None, ["model.dtype=f8", "train.steps=0", "grpo.eps_low=0"], check=False)
    assert validate(wrong) == [
        "model.dtype='f8' is unknown; use float32, bfloat16 or float16",
        "train.steps must be >= 1, got 0",
        "grpo.eps_low and grpo.eps_high must be > 0",
    ]


def test_a_run_config_written_before_a_key_was_replaced_still_loads(tmp_path):
    from jaxllm.config import load_run_config

    saved = tmp_path / "config.yaml"
    for old, new in (("none", "dr_grpo"), ("group", "grpo")):
        saved.write_text(
            to_yaml(load_config(None, [])).replace(
                "advantage_estimator: grpo", f"scale_rewards: {old}"
            )
        )
        assert "scale_rewards" in saved.read_text()
        assert load_run_config(saved).grpo.advantage_estimator == new
    with pytest.raises(ConfigError, match="grpo.scale_rewards was replaced"):
        load_config(saved)  # a user's own file says what replaced the key


def test_a_model_saved_before_families_reads_as_qwen2_with_biases_else_llama(tmp_path):
    from jaxllm.config import load_run_config

    saved = tmp_path / "config.yaml"
    for bias, family in ((True, "qwen2"), (False, "llama")):
        text = to_yaml(load_config(None, [f"model.qkv_bias={bias}"]))
        saved.write_text("\n".join(line for line in text.splitlines() if "family:" not in line))
        assert "family" not in saved.read_text()
        assert load_run_config(saved).model.family == family
