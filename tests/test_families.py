"""Model families (`jaxllm.models`) against `transformers`: each family's random model,
small but with its published config's ratios, imported and compared position by position.

Shapes follow the real config.json of each family (fewer layers, width 64): Llama 3.2's
GQA 4:1 with tied embeddings and llama3 rope scaling; Mistral's window, shorter than the
test sequence; Qwen2.5's q/k/v biases; Qwen3's head_dim (32) independent of width / heads
(16); Gemma 3's local/global pattern with a window shorter than the sequence, its own local
rope base, linear scaling on global layers (4B+), query_pre_attn_scalar != head_dim and
final logit soft-capping. Every parameter, norms and biases too, is random (std 0.2), so a
wrong mapping or a missed "1 +" shows in the logits.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import skip_if_not_enough_devices

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxllm.cli import main as cli_main  # noqa: E402
from jaxllm.config import MeshConfig  # noqa: E402
from jaxllm.hf.tokenizer import save_hf_tokenizer  # noqa: E402
from jaxllm.model import LanguageModel  # noqa: E402
from jaxllm.models import FAMILIES  # noqa: E402
from jaxllm.sharding import make_mesh, tree_shardings  # noqa: E402
from jaxllm.stages.common import load_run  # noqa: E402
from jaxllm.tokenizer import load_tokenizer  # noqa: E402

BYTES_VOCAB = 264  # the `bytes` tokenizer: 256 bytes + our 8 control tokens
WINDOW = 8  # sliding windows, shorter than the 32 test tokens
SHAPE = dict(hidden_size=64, max_position_embeddings=128, vocab_size=BYTES_VOCAB)
FAMILY_CONFIGS = {
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            intermediate_size=256,
            tie_word_embeddings=True,
            rope_theta=500_000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            intermediate_size=224,
            sliding_window=WINDOW,
        ),
    ),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=320,
            tie_word_embeddings=True,
            rope_theta=1_000_000.0,
        ),
    ),
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            intermediate_size=192,
            tie_word_embeddings=True,
            rope_theta=1_000_000.0,
        ),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=32,
            intermediate_size=384,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=24,
            final_logit_softcapping=5.0,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
        ),
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=WINDOW,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            intermediate_size=192,
            moe_intermediate_size=48,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            rope_theta=1_000_000.0,
        ),
    ),
}
TOKENS_BT = np.random.default_rng(0).integers(0, 256, (2, 32))


def hf_model(name: str, **changes):
    """A random model of family `name` in float32, every parameter perturbed."""
    config_class, model_class, config = FAMILY_CONFIGS[name]
    torch.manual_seed(0)
    hf_config = getattr(transformers, config_class)(**{**SHAPE, **config, **changes})
    model = getattr(transformers, model_class)(hf_config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    return model


def hf_folder(path, name: str, **changes):
    model = hf_model(name, **changes)
    model.save_pretrained(path)
    save_hf_tokenizer(load_tokenizer("bytes"), path)
    return model


def import_run(hf_dir, out_dir, mesh="1,1,1"):
    assert cli_main(["import-hf", str(hf_dir), "--out", str(out_dir), "--mesh", mesh]) == 0
    return load_run(out_dir)


def hf_logits(model, ids_bt):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids_bt))).logits.numpy()


def assert_logits_match(ours, theirs):
    """Within 1e-5 of the logits' scale (float32 sums in another order)."""
    scale = float(np.abs(theirs).max())
    assert scale > 1.0  # large enough for a wrong mapping to show
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * scale)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """name -> (transformers model, imported run), made once per family."""
    made = {}

    def get(name):
        if name not in made:
            folder = tmp_path_factory.mktemp(name)
            model = hf_folder(folder / "hf", name)
            made[name] = (model, import_run(folder / "hf", folder / "run"))
        return made[name]

    return get


@pytest.mark.parametrize("name", list(FAMILY_CONFIGS))
def test_logits_match_transformers_at_every_position(imported, name):
    model, run = imported(name)
    assert run.model.cfg.family == name
    ours = np.asarray(run.model.logits(run.params, jnp.asarray(TOKENS_BT)))
    assert_logits_match(ours, hf_logits(model, TOKENS_BT))


def test_gemma3_block_choices_each_move_the_logits(imported):
    """Each Gemma 3 choice the parity above covers matters at this size: undone one at a
    time, the logits move far past the tolerance."""
    import dataclasses

    model, run = imported("gemma3")
    expected = hf_logits(model, TOKENS_BT)
    cfg = run.model.cfg
    assert cfg.sliding_layers == (True, False, True) and cfg.sliding_window == WINDOW
    for change in (
        dict(layer_types=[]),  # no window
        dict(rope_local_theta=None),  # local layers on the global rope
        dict(rope_scaling="none"),
        dict(query_pre_attn_scalar=None),
        dict(final_logit_softcap=None),
        dict(embed_scale=False),
    ):
        wrong = LanguageModel(dataclasses.replace(cfg, **change))
        logits = np.asarray(wrong.logits(run.params, jnp.asarray(TOKENS_BT)))
        assert np.abs(logits - expected).max() > 1e-2, change


@pytest.mark.parametrize("name", ["mistral", "gemma3", "qwen3", "qwen3_moe"])
@pytest.mark.parametrize("chunk_slots", [0, 8])
def test_cache_prefill_and_decode_equal_the_full_forward(imported, name, chunk_slots):
    """12 prompt tokens, then one at a time well past the window; row 1 left-padded by 3
    as the sampler pads, so its positions and slots are 3 apart."""
    _, run = imported(name)
    model, params = run.model, run.params
    tokens_bt = jnp.asarray(TOKENS_BT[:, :28])
    pad = 3
    expected = np.asarray(model.logits(params, tokens_bt))
    shifted = np.asarray(model.logits(params, tokens_bt[1:, : 28 - pad]))
    prompt_bt = tokens_bt[:, :12]
    segments_bt = jnp.asarray([[1] * 12, [0] * pad + [1] * (12 - pad)])
    positions_bt = jnp.asarray([list(range(12)), [0] * pad + list(range(12 - pad))])
    prompt_bt = prompt_bt.at[1].set(
        jnp.concatenate([jnp.zeros(pad, jnp.int32), prompt_bt[1, : 12 - pad]])
    )
    cache = model.init_cache(2, 32, chunk_slots)
    with_cache = jax.jit(model.logits_with_cache)
    logits_btv, cache = with_cache(params, prompt_bt, positions_bt, segments_bt, cache)
    steps = [np.asarray(logits_btv[:, -1])]
    for t in range(12, 28):
        token_b = jnp.asarray([tokens_bt[0, t], tokens_bt[1, t - pad]])
        position_b = jnp.asarray([t, t - pad])
        logits_b1v, cache = with_cache(
            params, token_b[:, None], position_b[:, None], jnp.ones((2, 1), jnp.int32), cache
        )
        steps.append(np.asarray(logits_b1v[:, 0]))
    decoded = np.stack(steps, axis=1)  # logits after tokens 11 .. 27 (row 1: 3 fewer)
    np.testing.assert_allclose(decoded[0], expected[0, 11:28], rtol=0, atol=1e-4)
    np.testing.assert_allclose(decoded[1], shifted[0, 8:], rtol=0, atol=1e-4)


@skip_if_not_enough_devices(4)
@pytest.mark.parametrize(
    "name, mesh_shape", [("gemma3", (2, 2, 1)), ("qwen3", (1, 2, 2)), ("qwen3_moe", (1, 2, 2))]
)
def test_sharded_logits_equal_one_device(imported, name, mesh_shape):
    """On a data x fsdp x tensor mesh (Gemma 3's one kv head does not split over tensor;
    Qwen3-MoE's experts split over it) the forward gives the single-device logits."""
    _, run = imported(name)
    mesh = make_mesh(MeshConfig(*mesh_shape), jax.devices()[:4])
    model = run.model
    shardings = tree_shardings(mesh, model.abstract_params, model.logical_axes, model.rules)
    params = jax.device_put(run.params, shardings)
    with jax.set_mesh(mesh):
        sharded = np.asarray(jax.jit(model.logits)(params, jnp.asarray(TOKENS_BT)))
    single = np.asarray(model.logits(run.params, jnp.asarray(TOKENS_BT)))
    np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-5 * np.abs(single).max())


def safetensors_of(folder):
    from safetensors.numpy import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize("name", ["gemma3", "qwen3", "mistral", "mixtral"])
def test_export_then_import_is_bitwise_and_transformers_loads_it(imported, tmp_path, name):
    model, run = imported(name)
    out = tmp_path / "out"
    assert (
        cli_main(["export-hf", str(run.cfg.out_dir), "--out", str(out), "--max-shard-size", "40KB"])
        == 0
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards)
    written = safetensors_of(out)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in written.values())
    again = import_run(out, tmp_path / "again")
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(run.params), jax.tree.leaves(again.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(exported).__name__ == FAMILY_CONFIGS[name][1]
    np.testing.assert_array_equal(hf_logits(exported, TOKENS_BT), hf_logits(model, TOKENS_BT))


def test_bfloat16_export_holds_the_rounded_weights(imported, tmp_path):
    model, run = imported("gemma3")
    out = tmp_path / "out"
    assert (
        cli_main(["export-hf", str(run.cfg.out_dir), "--out", str(out), "--dtype", "bfloat16"]) == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    from safetensors.torch import load_file

    written = load_file(out / "model.safetensors")
    state = model.state_dict()
    for name, tensor in written.items():
        assert tensor.dtype == torch.bfloat16, name
        torch.testing.assert_close(tensor, state[name].to(torch.bfloat16), rtol=0, atol=0)
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    rounded = hf_logits(exported, TOKENS_BT)
    assert np.abs(rounded - hf_logits(model, TOKENS_BT)).max() < 0.1 * np.abs(rounded).max()


def write_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "name, changes, message",
    [
        ("gemma3", dict(attn_logit_softcapping=50.0), "attn_logit_softcapping=50.0"),
        ("gemma3", dict(hidden_activation="relu"), "hidden_activation='relu'"),
        ("gemma3", dict(use_bidirectional_attention=True), "use_bidirectional_attention=True"),
        (
            "gemma3",
            dict(architectures=["Gemma3ForConditionalGeneration"]),
            "import the text model",
        ),
        ("qwen3", dict(use_sliding_window=True, sliding_window=16), "use_sliding_window=True"),
        ("qwen3", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_type='yarn'"),
        (
            "qwen3",
            dict(architectures=["GPT2LMHeadModel"]),
            "import one of Gemma3ForCausalLM",
        ),
        ("mistral", dict(hidden_act="gelu"), "hidden_act='gelu'"),
    ],
)
def test_unsupported_fields_are_one_error_line_and_no_folder(
    tmp_path, capsys, name, changes, message
):
    hf_folder(tmp_path / "hf", name)
    write_config(tmp_path / "hf", **changes)
    capsys.readouterr()
    assert cli_main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_every_family_is_registered_with_its_architecture():
    for name, (_, model_class, _) in FAMILY_CONFIGS.items():
        assert FAMILIES[name].architectures[0] == model_class
