"""Hugging Face interop: `jaxllm import-hf` / `export-hf` against real `transformers` models.

Every HF model is built here at random (initializer_range 0.2, so logits are O(1) and a
wrong mapping shows), saved with `save_pretrained` in float32, and compared position by
position with our forward pass of the imported run. Needs the `hf-test` extra."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
transformers = pytest.importorskip("transformers")

from helpers import cpu_environment  # noqa: E402
from hf_roundtrip import write_qwen_style_tokenizer  # noqa: E402  (experiments/)

from jaxllm.chat import render_for_generation  # noqa: E402
from jaxllm.cli import main as cli_main  # noqa: E402
from jaxllm.config import Config, load_config  # noqa: E402
from jaxllm.errors import ConfigError  # noqa: E402
from jaxllm.generate import Generator  # noqa: E402
from jaxllm.hf.checkpoints import write_run_folder  # noqa: E402
from jaxllm.hf.tokenizer import save_hf_tokenizer  # noqa: E402
from jaxllm.model import LanguageModel  # noqa: E402
from jaxllm.stages.common import load_run  # noqa: E402
from jaxllm.tokenizer import load_tokenizer  # noqa: E402

BYTES_VOCAB = 264  # the `bytes` tokenizer: 256 bytes + our 8 control tokens
SHAPE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    initializer_range=0.2,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # so both scaled bands hit head_dim 16
}


def hf_folder(path, architecture="llama", tokenizer_json=None, **config):
    """A random-init HF model saved with its tokenizer (ours, `bytes`, by default)."""
    torch.manual_seed(0)
    if architecture == "qwen2":
        hf_config = transformers.Qwen2Config(**{**SHAPE, "vocab_size": BYTES_VOCAB, **config})
        model = transformers.Qwen2ForCausalLM(hf_config)
        with torch.no_grad():  # HF starts biases at 0; make them count
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0.0, 0.5)
    else:
        family = {"llama": "Llama", "mistral": "Mistral"}[architecture]
        hf_config = getattr(transformers, f"{family}Config")(
            **{**SHAPE, "vocab_size": BYTES_VOCAB, **config}
        )
        model = getattr(transformers, f"{family}ForCausalLM")(hf_config)
    model.eval().save_pretrained(path)
    if tokenizer_json is None:
        save_hf_tokenizer(load_tokenizer("bytes"), path)
    else:
        (path / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    return model


def import_run(hf_dir, out_dir):
    assert cli_main(["import-hf", str(hf_dir), "--out", str(out_dir), "--mesh", "1,1,1"]) == 0
    return load_run(out_dir)


def our_logits(run, ids_bt):
    return np.asarray(run.model.logits(run.params, jnp.asarray(ids_bt)))


def hf_logits(model, ids_bt):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids_bt))).logits.numpy()


TOKENS_BT = np.random.default_rng(0).integers(0, 256, (2, 32))


@pytest.mark.parametrize(
    "name, architecture, config",
    [
        ("llama_kv1", "llama", {"num_key_value_heads": 1}),
        ("llama_kv2", "llama", {"num_key_value_heads": 2}),
        ("llama_kv4_tied", "llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
        ("llama3_rope", "llama", {"num_key_value_heads": 2, "rope_scaling": LLAMA3_ROPE}),
        ("qwen2_biases", "qwen2", {"num_key_value_heads": 2}),
        ("mistral_window", "mistral", {"num_key_value_heads": 2, "sliding_window": 64}),
    ],
)
def test_imported_logits_match_transformers_at_every_position(tmp_path, name, architecture, config):
    model = hf_folder(tmp_path / "hf", architecture, **config)
    run = import_run(tmp_path / "hf", tmp_path / "run")
    expected = hf_logits(model, TOKENS_BT)
    assert np.abs(expected).max() > 1.0  # logits large enough for a wrong mapping to show
    np.testing.assert_allclose(our_logits(run, TOKENS_BT), expected, rtol=0, atol=1e-4)
    assert run.model.cfg.qkv_bias == (architecture == "qwen2")
    assert run.model.cfg.rope_scaling == ("llama3" if "rope_scaling" in config else "none")
    assert run.model.cfg.tie_embeddings == config.get("tie_word_embeddings", False)
    assert run.model.cfg.family == architecture
    # Mistral's window is modelled on every layer; the context stays the model's.
    assert run.model.cfg.max_seq_len == SHAPE["max_position_embeddings"]
    assert run.model.cfg.sliding_window == config.get("sliding_window", 0)
    assert all(run.model.cfg.sliding_layers) == ("sliding_window" in config)


def test_llama3_scaling_and_interleaved_rotary_each_change_the_logits(tmp_path):
    """The checks above would catch a wrong rotary: scaling off, or HF's q/k rows read as
    interleaved pairs (Meta's original layout), both move the logits far past 1e-4."""
    model = hf_folder(tmp_path / "hf", num_key_value_heads=2, rope_scaling=LLAMA3_ROPE)
    run = import_run(tmp_path / "hf", tmp_path / "run")
    expected = hf_logits(model, TOKENS_BT)
    unscaled = LanguageModel(dataclasses.replace(run.model.cfg, rope_scaling="none"))
    assert np.abs(our_logits(run, TOKENS_BT) - expected).max() < 1e-4
    assert np.abs(np.asarray(unscaled.logits(run.params, TOKENS_BT)) - expected).max() > 1e-2

    def interleaved(w_dxh):  # rows (x0, x1, x2, ...) read as pairs (x0, x1), (x2, x3), ...
        h = w_dxh.shape[-1]
        order = np.concatenate([np.arange(0, h, 2), np.arange(1, h, 2)])
        return w_dxh[..., order]

    attention = dict(run.params["blocks"]["attention"])
    attention["wq_dnh"] = interleaved(attention["wq_dnh"])
    attention["wk_dkh"] = interleaved(attention["wk_dkh"])
    wrong = {**run.params, "blocks": {**run.params["blocks"], "attention": attention}}
    wrong_logits = np.asarray(run.model.logits(wrong, jnp.asarray(TOKENS_BT)))
    assert np.abs(wrong_logits - expected).max() > 1e-2


def test_greedy_generation_equals_transformers_generate(tmp_path):
    model = hf_folder(tmp_path / "hf", num_key_value_heads=2)
    run = import_run(tmp_path / "hf", tmp_path / "run")
    prompts = TOKENS_BT[:, :12]
    with torch.no_grad():
        expected = model.generate(
            torch.as_tensor(prompts),
            attention_mask=torch.ones(prompts.shape, dtype=torch.long),
            max_new_tokens=16,
            min_new_tokens=16,
            do_sample=False,
            pad_token_id=0,
        )[:, prompts.shape[1] :].numpy()
    generator = Generator(run.model, run.tokenizer.vocab_size, run.tokenizer.pad_id, 16)
    completion = generator(run.params, prompts.tolist(), jax.random.key(0), temperature=0.0)
    np.testing.assert_array_equal(completion.tokens, expected)


def test_export_then_import_is_bitwise_and_transformers_loads_the_export(tmp_path):
    model = hf_folder(tmp_path / "hf", "qwen2", num_key_value_heads=2)
    run = import_run(tmp_path / "hf", tmp_path / "run")
    assert cli_main(["export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    again = import_run(tmp_path / "out", tmp_path / "run2")
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(run.params), jax.tree.leaves(again.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(exported).__name__ == "Qwen2ForCausalLM"
    np.testing.assert_array_equal(hf_logits(exported, TOKENS_BT), hf_logits(model, TOKENS_BT))
    from safetensors.numpy import load_file

    original, written = (
        load_file(tmp_path / folder / "model.safetensors") for folder in ("hf", "out")
    )
    assert set(original) == set(written)
    for name, tensor in original.items():
        np.testing.assert_array_equal(written[name], tensor, err_msg=name)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700


def test_a_native_run_exports_with_padding_rows_trimmed(tmp_path):
    """A run of our own (vocab padded to 320 for the 264-id tokenizer) exports as a Llama
    whose logits over the real ids equal ours; transformers' tokenizer reads our ids."""
    cfg = Config(out_dir=str(tmp_path / "run"))
    cfg.model = load_config(None, ["preset=tiny", "model.init_std=0.2"]).model
    model = LanguageModel(cfg.model)
    (tmp_path / "run").mkdir()
    write_run_folder(tmp_path / "run", cfg, model.init(jax.random.key(1)), {})
    assert cli_main(["export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    run = load_run(tmp_path / "run")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert exported.config.vocab_size == BYTES_VOCAB
    # Imported back, the run writes chats in the template the export carries: jaxllm's own.
    again = import_run(tmp_path / "out", tmp_path / "again")
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    assert again.cfg.chat.template == "model"
    assert render_for_generation(again.tokenizer, messages) == render_for_generation(
        run.tokenizer, messages
    )
    assert again.tokenizer.encode_prompt("Hi") == run.tokenizer.encode_prompt("Hi")
    np.testing.assert_allclose(
        hf_logits(exported, TOKENS_BT),
        our_logits(run, TOKENS_BT)[..., :BYTES_VOCAB],
        rtol=0,
        atol=1e-4,
    )
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "To be, or not to be: 生きるべきか 🙂"
    assert hf_tokenizer.encode(text, add_special_tokens=False) == run.tokenizer.encode(text)


def qwen_style_folder(path, **config):
    """A Qwen2 model whose tokenizer has only Qwen3's five added tokens (vocab 261), with
    Qwen's eos and ChatML template."""
    config = {"num_key_value_heads": 2, "vocab_size": 261, **config}
    model = hf_folder(path, "qwen2", {}, **config)
    write_qwen_style_tokenizer(path)
    return model


def test_an_import_keeps_the_models_vocabulary_and_prompts_it_as_transformers(tmp_path):
    """No jaxllm control token and no embedding row is added; a plain prompt gets no BOS
    (Qwen adds none), a chat prompt is the model's ChatML, replies stop at <|im_end|>, and
    the export's tokenizer gives transformers the same ids."""
    qwen_style_folder(tmp_path / "hf", tie_word_embeddings=True)
    run = import_run(tmp_path / "hf", tmp_path / "run")
    assert run.model.cfg.vocab_size == run.tokenizer.vocab_size == 261
    assert run.tokenizer.think_ids() == (259, 260)
    assert run.tokenizer.encode_prompt("Hi") == list(b"Hi")
    assert run.tokenizer.stop_ids == (258,) and run.tokenizer.pad_id == 256
    assert run.cfg.chat.template == "model"
    ids = render_for_generation(run.tokenizer, [{"role": "user", "content": "Hi"}])
    assert run.tokenizer.decode(ids) == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert cli_main(["export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "chat_template.jinja").is_file()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    templated = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert list(templated["input_ids"]) == render_for_generation(run.tokenizer, messages)
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 258


def test_an_embedding_larger_than_the_tokenizer_generates_and_exports_as_transformers(
    tmp_path, capsys
):
    """Qwen's config.json has more rows than its tokenizer has ids: greedy generation picks
    among all of them as transformers does, and they all come back in the export."""
    from safetensors.numpy import load_file

    model = qwen_style_folder(tmp_path / "hf", vocab_size=320)
    run = import_run(tmp_path / "hf", tmp_path / "run")
    assert (run.model.cfg.vocab_size, run.tokenizer.vocab_size) == (320, 261)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    inputs = hf_tokenizer("The quick brown fox", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    out = out[0, inputs["input_ids"].shape[1] :]
    assert out.max() >= 261  # the check below would miss a vocabulary cut at the tokenizer's
    capsys.readouterr()
    argv = ["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "The quick brown fox"]
    assert cli_main([*argv, "--temperature", "0", "--max-new-tokens", "24"]) == 0
    assert capsys.readouterr().out == hf_tokenizer.decode(out, skip_special_tokens=True) + "\n"
    assert cli_main(["export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    original, written = (load_file(tmp_path / f / "model.safetensors") for f in ("hf", "out"))
    for name, tensor in original.items():
        np.testing.assert_array_equal(written[name], tensor, err_msg=name)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 320


def test_a_model_without_a_chat_template_says_how_to_give_one(tmp_path):
    qwen_style_folder(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(config))
    run = import_run(tmp_path / "hf", tmp_path / "run")
    assert run.tokenizer.encode_prompt("Hi") == list(b"Hi")  # plain prompts need none
    with pytest.raises(ConfigError, match="has no chat template .* chat.template to a .jinja"):
        render_for_generation(run.tokenizer, [{"role": "user", "content": "Hi"}])


def test_an_imported_model_goes_through_sft_and_grpo_and_exports_back(tmp_path):
    qwen_style_folder(tmp_path / "hf")
    assert cli_main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    common = ["train.samples=0", "checkpoint.every=2", "train.steps=2", "train.batch_size=8"]
    sft = [
        "sft",
        f"sft.init_from={tmp_path / 'run'}",
        "data.path=builtin",
        "sft.builtin_examples=64",
        "sft.eval_prompts=0",
        "train.seq_len=96",
        "train.eval_every=100",
        f"out_dir={tmp_path / 'sft'}",
        *common,
    ]
    grpo = [
        "grpo",
        f"grpo.policy_from={tmp_path / 'sft'}",
        "data.path=builtin",
        f"out_dir={tmp_path / 'grpo'}",
        "train.eval_every=2",
        "grpo.group_size=4",
        "grpo.max_prompt_tokens=64",
        "grpo.max_new_tokens=8",
        "grpo.builtin_prompts=16",
        "grpo.eval_prompts=4",
        "grpo.pass_k=2",
        *common,
    ]
    for argv in (sft, grpo):
        done = subprocess.run(
            [sys.executable, "-m", "jaxllm.cli", *argv],
            env=cpu_environment(1),
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr[-2000:]
    assert load_config(tmp_path / "grpo" / "config.yaml").chat.template == "model"
    assert cli_main(["export-hf", str(tmp_path / "grpo"), "--out", str(tmp_path / "out")]) == 0
    assert import_run(tmp_path / "out", tmp_path / "again").cfg.chat.template == "model"
    # The imported model's own config.json, followed back through sft.init_from, is kept;
    # <|im_end|> (258), where the fine-tuned replies stop, is generation_config's eos id.
    exported_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported_config["max_window_layers"] == 28 and exported_config["model_type"] == "qwen2"
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 258
    assert exported_config["max_position_embeddings"] == 128
    run = load_run(tmp_path / "grpo")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(
        hf_logits(exported, TOKENS_BT),
        our_logits(run, TOKENS_BT)[..., : run.tokenizer.vocab_size],
        rtol=0,
        atol=1e-4,
    )


def test_a_reward_run_exports_as_a_sequence_classifier_with_the_same_scores(tmp_path, capsys):
    """Scores at the last token equal ours less the head's bias (HF's score has none)."""
    cfg = Config(out_dir=str(tmp_path / "run"))
    cfg.model = load_config(
        None, ["preset=tiny", "model.init_std=0.2", "model.scalar_heads=[reward]"]
    ).model
    model = LanguageModel(cfg.model)
    params = model.init(jax.random.key(2))
    head = params["heads"]["reward"]  # a head starts at 0: give it a direction
    head["w_d"] = 0.2 * jax.random.normal(jax.random.key(3), head["w_d"].shape)
    head["bias"] = jnp.float32(0.7)
    (tmp_path / "run").mkdir()
    write_run_folder(tmp_path / "run", cfg, params, {})
    assert cli_main(["export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    assert "AutoModelForSequenceClassification.from_pretrained" in capsys.readouterr().out
    exported = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "out"
    ).eval()
    assert type(exported).__name__ == "LlamaForSequenceClassification"
    with torch.no_grad():
        theirs = exported(torch.as_tensor(TOKENS_BT)).logits.numpy()[:, 0]
    hidden = model.hidden(params, jnp.asarray(TOKENS_BT))
    ours = np.asarray(model.scalar_head(params, "reward", hidden))[:, -1]
    np.testing.assert_allclose(theirs, ours - 0.7, rtol=0, atol=1e-4)
    assert np.abs(ours).max() > 0.1


def write_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: (d / "config.json").unlink(), "config.json does not exist"),
        (lambda d: write_config(d, architectures=["GPT2LMHeadModel"]), "architectures="),
        (lambda d: write_config(d, hidden_act="gelu"), "hidden_act='gelu'"),
        (
            lambda d: write_config(d, rope_parameters={"rope_type": "yarn", "factor": 2.0}),
            "rope_type='yarn'",
        ),
        (lambda d: write_config(d, mlp_bias=True), "mlp_bias=True"),
        (lambda d: write_config(d, num_hidden_layers=3), "model.layers.2.input_layernorm"),
        (lambda d: write_config(d, intermediate_size=100), "mlp.gate_proj.weight has shape"),
        (lambda d: (d / "model.safetensors").unlink(), "has no model.safetensors"),
        (lambda d: (d / "config.json").write_text("[1]"), "not a JSON object"),
        (lambda d: write_config(d, hidden_size=None), "hidden_size=None: a positive number"),
        (lambda d: write_config(d, num_attention_heads=3), "cannot build"),
        (
            lambda d: (d / "model.safetensors").write_bytes(b"\x08" + bytes(20)),
            "does not read as safetensors",
        ),
        (
            lambda d: (d / "tokenizer.json").write_text("{"),
            "tokenizer.json does not load in Hugging Face tokenizers",
        ),
        (
            lambda d: (d / "tokenizer.json").write_text(json.dumps({"model": {"type": "Nope"}})),
            "tokenizer.json does not load in Hugging Face tokenizers",
        ),
    ],
)
def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, capsys, change, message):
    hf_folder(tmp_path / "hf", num_key_value_heads=2)
    change(tmp_path / "hf")
    capsys.readouterr()  # transformers' progress bars
    assert cli_main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_an_out_path_that_is_a_file_is_refused(tmp_path, capsys):
    hf_folder(tmp_path / "hf", num_key_value_heads=2)
    (tmp_path / "run").write_text("mine")
    assert cli_main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert (tmp_path / "run").read_text() == "mine"


def test_export_of_a_folder_that_is_not_a_run_is_one_line_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "not_a_run").mkdir()
    out = tmp_path / "out"
    assert cli_main(["export-hf", str(tmp_path / "not_a_run"), "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no config.yaml" in lines[0]
    assert not out.exists()


def test_a_busy_out_folder_is_refused(tmp_path, capsys):
    hf_folder(tmp_path / "hf", num_key_value_heads=2)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    assert cli_main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"
