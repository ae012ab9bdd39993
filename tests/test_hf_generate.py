"""What a user of a published model checks first, per family (Llama 3.x, Qwen2.5, Qwen3,
Gemma 3, Qwen3-MoE): `jaxllm generate` prints what transformers generates, on a plain prompt and on
a chat prompt, and `jaxllm export-hf` returns every original tensor unchanged.

The folders are `tests/hf_families.py`'s: random models with the real configs' ratios and
tokenizers, templates and eos ids in each family's style. Needs the `hf-test` extra."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_families import FAMILIES, family_folder  # noqa: E402

from jaxllm.cli import main as cli_main  # noqa: E402

PLAIN = "The quick fox: 12 + 30 = 42, 日本 🙂"
CHAT = "What is 7 * 6? Think step by step."
NEW_TOKENS = 10


@pytest.fixture(scope="module", params=FAMILIES)
def imported(request, tmp_path_factory):
    """(HF folder, the transformers model and tokenizer, the imported run folder)."""
    root = tmp_path_factory.mktemp(request.param)
    folder = family_folder(root / "hf", request.param)
    assert cli_main(["import-hf", str(folder), "--out", str(root / "run")]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return folder, model, tokenizer, root / "run"


def transformers_greedy(model, tokenizer, chat: bool) -> str:
    if chat:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": CHAT}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
    else:
        inputs = tokenizer(PLAIN, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_generate_prints_what_transformers_generates(imported, chat, capsys):
    _, model, tokenizer, run = imported
    expected = transformers_greedy(model, tokenizer, chat)
    assert len(set(expected)) >= 4, expected  # varied text, not a token repeated or none
    argv = ["generate", "--checkpoint", str(run), "--prompt", CHAT if chat else PLAIN]
    argv += ["--temperature", "0", "--max-new-tokens", str(NEW_TOKENS)]
    capsys.readouterr()
    assert cli_main([*argv, *(["--chat"] if chat else [])]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_export_returns_every_original_tensor_unchanged(imported, tmp_path):
    from safetensors.numpy import load_file

    folder, _, _, run = imported
    assert cli_main(["export-hf", str(run), "--out", str(tmp_path / "out")]) == 0
    original, written = (
        load_file(path / "model.safetensors") for path in (folder, tmp_path / "out")
    )
    assert sorted(written) == sorted(original)
    for name, tensor in original.items():
        np.testing.assert_array_equal(written[name], tensor, err_msg=name)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (
        config["architectures"] == json.loads((folder / "config.json").read_text())["architectures"]
    )
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == model_eos_ids(folder)


def model_eos_ids(folder):
    return json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
