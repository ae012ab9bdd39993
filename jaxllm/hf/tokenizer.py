"""Hugging Face `tokenizer.json` (byte-level BPE) <-> jaxllm's tiktoken `Tokenizer`.

`tokenizer_from_hf` reads the byte-level BPE files that GPT-2, Llama 3, Qwen2/2.5 and
SmolLM ship: `model` a BPE whose vocabulary is written in GPT-2's byte-level alphabet,
`pre_tokenizer` a `ByteLevel` with GPT-2's pattern (after a `Digits` split or not) or a
`Split` by a regex then a `ByteLevel` that only maps bytes, `normalizer` none or a Unicode
normal form (Qwen2: NFC). Token ids become tiktoken ranks, so tiktoken's merging (lowest
rank first) must make the merges HF makes (lowest merge index first): the merges are
checked to come in id order. Every added token becomes a tiktoken special token, `special:
false` ones included, since each is one id that the merges never make. Anything else
(WordPiece, Unigram, sentencepiece-style BPE with `byte_fallback` or a `Metaspace`
pre-tokenizer, other normalizers) is refused with one line that names the field.
`hf_tokenizer_file` says which `data.tokenizer` values name such a file.

`save_hf_tokenizer` writes a `Tokenizer` back as `tokenizer.json` + `tokenizer_config.json`
for `transformers.AutoTokenizer` and `tokenizers.Tokenizer.from_file`: ranks become ids, and
each token gets the merge that rank-ordered merging of its bytes makes it by.

HF splits text with Oniguruma's regex dialect, tiktoken with Rust's fancy-regex. They agree
on the patterns of these tokenizers but differ in two places: `^`/`$` (line anchors in
Oniguruma, text anchors in tiktoken) and `X{1,3}+` (possessive in tiktoken, a repeated
repetition in Oniguruma; cl100k's digits). Reading refuses both; writing rewrites them.
HF also matches added tokens in any text it encodes; our plain `encode` never does, and
`encode(text, allow_special=True)` matches HF's ids.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import tiktoken

from jaxllm.chat_templates import JINJA_TEMPLATES
from jaxllm.errors import DataError
from jaxllm.hf.convert import read_json_object
from jaxllm.tokenizer import NORMAL_FORMS, Tokenizer, write_file_atomically


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's stand-in character for each byte: printable Latin-1 bytes are themselves, the
    other 68 bytes take the code points from U+0100 up in byte order (so no token shows a
    space or a control character)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [value for value in range(256) if value not in printable]
    return {
        **{value: chr(value) for value in printable},
        **{value: chr(0x100 + index) for index, value in enumerate(others)},
    }


BYTE_TO_CHAR = _byte_level_alphabet()
CHAR_TO_BYTE = {char: value for value, char in BYTE_TO_CHAR.items()}

# The pattern of HF's `ByteLevel(use_regex=true)`: GPT-2's.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def _digits_then_gpt2_pattern(individual_digits: bool) -> str:
    """One pattern for `Digits` then GPT-2's pattern on each stretch between digits (SmolLM,
    StarCoder): digits first, and a run of spaces ends before a digit as at a stretch's end."""
    digits = r"\p{N}" if individual_digits else r"\p{N}+"
    return digits + r"|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"


# One lexical piece of a regex: an escape (`\p{L}`, `\s`), a character class (one level of
# nesting, as `[[:alpha:]]`), a counted repetition, or any other single character.
_REGEX_PIECE = re.compile(
    r"\\[pPx]\{[^}]*\}|\\.|\[\^?\]?(?:\\.|\[[^\]]*\]|[^\]\\])*\]|\{\d+(?:,\d*)?\}|.", re.DOTALL
)
_COUNTED_REPETITION = re.compile(r"\{\d+(?:,\d*)?\}")
# tiktoken's anchors of the whole text, written for Oniguruma (whose `^`/`$` are per line).
_TEXT_ANCHORS = {"^": r"\A", "$": r"\z"}


def hf_tokenizer_file(name_or_path: str) -> Path | None:
    """The Hugging Face `tokenizer.json` that a tokenizer name or path names: an existing
    `.json` file, or the one in the folder a path names; None for anything else (a tiktoken
    encoding's name, a `.tiktoken` file, a file that does not exist)."""
    path = Path(name_or_path)
    if os.path.sep in name_or_path and (path / "tokenizer.json").is_file():
        return path / "tokenizer.json"
    return path if path.suffix == ".json" and path.is_file() else None


def tokenizer_from_hf(path: str | Path, chat_template: str = "jaxllm") -> Tokenizer:
    """The `Tokenizer` of a Hugging Face `tokenizer.json` holding a byte-level BPE, writing
    chat messages in `chat_template`.

    Its ids are HF's: `encode(text)` equals HF's `encode(text, add_special_tokens=False)`
    on text without added-token strings. Raises `DataError` (one line, naming the field)
    for anything that is not byte-level BPE, `FileNotFoundError` for a missing file.
    """
    path = Path(path)
    data = read_json_object(path, "pass the model's tokenizer.json (its fast tokenizer)")
    model = data.get("model")
    if not isinstance(model, dict):
        raise DataError(f"{path}: has no `model` object; is it a Hugging Face tokenizer.json?")
    _check_model(model, path)
    pattern = _split_pattern(data.get("pre_tokenizer"), path)
    normalization = _normalization(data.get("normalizer"), path)
    _check_decoder(data.get("decoder"), path)
    special_tokens = _added_tokens(data.get("added_tokens") or [], model["vocab"], path)
    vocab = _byte_level_vocab(model["vocab"], special_tokens, path)
    _check_merges(model, vocab, path)
    ranks = {bytes(CHAR_TO_BYTE[char] for char in text): id_ for text, id_ in vocab.items()}
    name = path.parent.name if path.name == "tokenizer.json" else path.stem
    return Tokenizer(
        name or "hf",
        ranks,
        pattern,
        special_tokens,
        normalization=normalization,
        chat_template=chat_template,
    )


def _check_model(model: dict, path: Path) -> None:
    """A BPE model without sentencepiece's or WordPiece's extras."""
    if model.get("type") != "BPE":
        raise DataError(
            f"{path}: model.type is '{model.get('type')}'; only byte-level BPE tokenizers "
            "(as GPT-2, Llama 3 and Qwen2 write them) are supported"
        )
    if model.get("byte_fallback"):
        raise DataError(
            f"{path}: model.byte_fallback is true (sentencepiece-style BPE); only byte-level "
            "BPE tokenizers are supported"
        )
    for field in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(field):
            raise DataError(
                f"{path}: model.{field} is {model[field]!r}; byte-level BPE as tiktoken runs "
                "it has none"
            )
    if not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
        raise DataError(f"{path}: model.vocab must be an object and model.merges a list")


def _steps(component: dict | None, key: str) -> list[dict]:
    """The steps of a normalizer, pre-tokenizer or decoder, `Sequence`s flattened."""
    if component is None:
        return []
    if component.get("type") == "Sequence":
        return [step for inner in component.get(key, []) for step in _steps(inner, key)]
    return [component]


def _split_pattern(pre_tokenizer: dict | None, path: Path) -> str:
    """tiktoken's split pattern for the pre-tokenizer: `ByteLevel(use_regex=true)` alone
    (GPT-2's pattern), after `Digits`, or a `Split` then a `ByteLevel(use_regex=false)`."""
    steps = _steps(pre_tokenizer, "pretokenizers")
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        _check_no_prefix_space(steps[0], path)
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and steps[1].get("use_regex", True):
        _check_no_prefix_space(steps[1], path)
        return _digits_then_gpt2_pattern(bool(steps[0].get("individual_digits")))
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        _check_no_prefix_space(steps[1], path)
        return _split_regex(steps[0], path)
    shape = " then ".join(
        f"{kind}(use_regex={str(step.get('use_regex', True)).lower()})"
        if kind == "ByteLevel"
        else str(kind)
        for kind, step in zip(kinds, steps, strict=True)
    )
    raise DataError(
        f"{path}: pre_tokenizer is {shape or 'null'}; only byte-level BPE's ByteLevel (after "
        "Digits or not), or Split then ByteLevel(use_regex=false), is supported"
    )


def _check_no_prefix_space(byte_level: dict, path: Path) -> None:
    if byte_level.get("add_prefix_space", True):
        raise DataError(
            f"{path}: pre_tokenizer ByteLevel.add_prefix_space is true (a space put before "
            "each text); tiktoken has no such step, so this tokenizer is not supported"
        )


def _split_regex(split: dict, path: Path) -> str:
    """The regex of an isolating `Split`, checked to mean the same to tiktoken."""
    pattern = (split.get("pattern") or {}).get("Regex")
    if not isinstance(pattern, str):
        raise DataError(f"{path}: pre_tokenizer Split.pattern is not a Regex; not supported")
    if split.get("behavior") != "Isolated" or split.get("invert"):
        raise DataError(
            f"{path}: pre_tokenizer Split has behavior '{split.get('behavior')}' and invert "
            f"{split.get('invert')}; only Isolated without invert is supported"
        )
    pieces = _REGEX_PIECE.findall(pattern)
    for index, piece in enumerate(pieces):
        if piece in _TEXT_ANCHORS or (
            _COUNTED_REPETITION.fullmatch(piece) and pieces[index + 1 : index + 2] == ["+"]
        ):
            raise DataError(
                f"{path}: pre_tokenizer Split.pattern uses '{piece}', which means one thing in "
                "HF's regex dialect (Oniguruma) and another in tiktoken's; not supported"
            )
    try:
        tiktoken.Encoding("check", pat_str=pattern, mergeable_ranks={b"a": 0}, special_tokens={})
    except ValueError as error:
        reason = str(error).splitlines()[0]
        raise DataError(
            f"{path}: pre_tokenizer Split.pattern does not compile in tiktoken ({reason})"
        ) from None
    return pattern


def _normalization(normalizer: dict | None, path: Path) -> str | None:
    """The Unicode normal form the normalizer applies, or None for no normalizer."""
    kinds = [step.get("type") for step in _steps(normalizer, "normalizers")]
    if not kinds:
        return None
    if len(kinds) == 1 and kinds[0] in NORMAL_FORMS:
        return kinds[0]
    raise DataError(
        f"{path}: normalizer is {' then '.join(map(str, kinds))}; only none or one of "
        f"{', '.join(NORMAL_FORMS)} is supported"
    )


def _check_decoder(decoder: dict | None, path: Path) -> None:
    kinds = [step.get("type") for step in _steps(decoder, "decoders")]
    if any(kind != "ByteLevel" for kind in kinds):
        raise DataError(
            f"{path}: decoder is {' then '.join(map(str, kinds))}; a byte-level BPE decodes "
            "with ByteLevel alone"
        )


def _added_tokens(added_tokens: list, vocab: dict, path: Path) -> dict[str, int]:
    """Text -> id of every added token, special or not: each is one id that no merge makes.

    HF does not read these ids: a token of `model.vocab` keeps its id there, and each other
    takes the id after the largest so far (at least the vocabulary's size), in file order.
    A file whose ids say otherwise gets other ids in HF than it states, so it is refused.
    """
    tokens: dict[str, int] = {}
    for index, entry in enumerate(added_tokens):
        entry = entry if isinstance(entry, dict) else {}
        content, id_ = entry.get("content"), entry.get("id")
        if not isinstance(content, str) or not content or not isinstance(id_, int):
            raise DataError(f"{path}: added_tokens[{index}] needs a text content and an int id")
        next_id = max(len(vocab), max(tokens.values(), default=-1) + 1)
        hf_id = vocab.get(content, tokens.get(content, next_id))
        if id_ != hf_id:
            raise DataError(
                f"{path}: added_tokens[{index}] {content!r} has id {id_}, but Hugging Face "
                f"gives it {hf_id} (tokens outside model.vocab take the ids after it, in order)"
            )
        tokens[content] = id_
    return tokens


def _byte_level_vocab(vocab: dict, special_tokens: dict[str, int], path: Path) -> dict[str, int]:
    """The vocabulary less its added tokens (some files list those in both), checked to be
    byte-level: every token in GPT-2's alphabet, all 256 bytes present, ids distinct."""
    special_ids = {id_: text for text, id_ in special_tokens.items()}
    kept = {}
    for text, id_ in vocab.items():
        if not isinstance(id_, int):
            raise DataError(f"{path}: model.vocab gives {text!r} the id {id_!r}, not an integer")
        if id_ in special_ids:
            if special_ids[id_] != text:
                raise DataError(
                    f"{path}: model.vocab gives id {id_} to {text!r} and added_tokens to "
                    f"{special_ids[id_]!r}"
                )
            continue
        foreign = next((char for char in text if char not in CHAR_TO_BYTE), None)
        if foreign is not None or not text:
            raise DataError(
                f"{path}: model.vocab token {text!r} is not written in GPT-2's byte-level "
                "alphabet; only byte-level BPE tokenizers are supported"
            )
        kept[text] = id_
    missing = [value for value in range(256) if BYTE_TO_CHAR[value] not in kept]
    if missing:  # tiktoken aborts (a Rust panic) on text holding a byte it has no rank for
        raise DataError(
            f"{path}: model.vocab lacks {len(missing)} of the 256 single bytes (first: byte "
            f"{missing[0]}); a byte-level BPE needs all of them"
        )
    if len(set(kept.values())) != len(kept):
        raise DataError(f"{path}: model.vocab gives one id to two tokens")
    return kept


def _check_merges(model: dict, vocab: dict[str, int], path: Path) -> None:
    """Refuse merges that tiktoken's merging by id would not reproduce.

    tiktoken merges the adjacent pair whose concatenation has the lowest id; HF merges the
    pair listed first in `merges`. They agree when the merges make ids in increasing order
    (several merges may make one id) from tokens of the vocabulary, and, unless
    `ignore_merges` lets HF take a whole piece found in the vocabulary as tiktoken does,
    when every token of two bytes or more is made by some merge.
    """
    made: set[str] = set()
    last_id = -1
    for index, merge in enumerate(model["merges"]):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not (
            isinstance(pair, list)
            and len(pair) == 2
            and all(isinstance(t, str) and t in vocab for t in pair)
        ):
            raise DataError(
                f"{path}: model.merges[{index}] {merge!r} is not a pair of vocabulary tokens"
            )
        result = pair[0] + pair[1]
        if result not in vocab:
            raise DataError(
                f"{path}: model.merges[{index}] {merge!r} makes {result!r}, which is not in "
                "model.vocab"
            )
        if vocab[result] < last_id:
            raise DataError(
                f"{path}: model.merges[{index}] {merge!r} makes id {vocab[result]} after a "
                f"merge made id {last_id}; merges out of id order do not match tiktoken's "
                "merging by id"
            )
        made.add(result)
        last_id = vocab[result]
    if model.get("ignore_merges"):
        return
    unmade = next((text for text in vocab if len(text) > 1 and text not in made), None)
    if unmade is not None:
        raise DataError(
            f"{path}: model.vocab token {unmade!r} (id {vocab[unmade]}) is made by no merge; "
            "HF never produces it but tiktoken would find it whole"
        )


def save_hf_tokenizer(tokenizer: Tokenizer, out_dir: str | Path) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` for `tokenizer` into `out_dir`.

    `transformers.AutoTokenizer.from_pretrained(out_dir)` gives our ids: those of `encode`
    on ordinary text, and of `encode(text, allow_special=True)` on text holding special-token
    strings, which HF always matches. Every special token, the base's and ours, is an added
    token (`special: true`); `<|im_end|>` ends a sequence and `<|pad|>` pads.
    """
    out_dir = Path(out_dir)
    for name, content in (
        ("tokenizer.json", _tokenizer_json(tokenizer)),
        ("tokenizer_config.json", _tokenizer_config(tokenizer)),
    ):
        text = json.dumps(content, ensure_ascii=False, indent=2)
        write_file_atomically(out_dir / name, text.encode("utf-8"))


def _tokenizer_json(tokenizer: Tokenizer) -> dict:
    """The byte-level BPE `tokenizer.json` of `tokenizer`.

    `ignore_merges` makes HF take a piece that is one token whole, as tiktoken does, which
    also covers tokens that no merge of lower ranks makes. The special tokens are in the
    vocabulary too: HF takes an added token's id from there, else it numbers it after the
    vocabulary, which would be wrong where ids have gaps (cl100k's 100256).
    """
    ranks = tokenizer.mergeable_ranks
    special_tokens = {**tokenizer.base_special_tokens, **tokenizer.special_ids}
    normalizer = {"type": tokenizer.normalization} if tokenizer.normalization else None
    split = {
        "type": "Split",
        "pattern": {"Regex": _oniguruma_pattern(tokenizer.pattern)},
        "behavior": "Isolated",
        "invert": False,
    }
    byte_level = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": False,
    }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": id_,
                "content": text,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for text, id_ in sorted(special_tokens.items(), key=lambda item: item[1])
        ],
        "normalizer": normalizer,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, byte_level]},
        "post_processor": None,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": {
                **{_text(token): rank for token, rank in _by_rank(ranks)},
                **special_tokens,
            },
            "merges": _merges(ranks),
        },
    }


def _tokenizer_config(tokenizer: Tokenizer) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|pad|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,  # transformers would edit spaces in decode
        "chat_template": JINJA_TEMPLATES[tokenizer.chat_template],
    }


def _text(token: bytes) -> str:
    return "".join(BYTE_TO_CHAR[value] for value in token)


def _by_rank(ranks: dict[bytes, int]) -> list[tuple[bytes, int]]:
    return sorted(ranks.items(), key=lambda item: item[1])


def _merges(ranks: dict[bytes, int]) -> list[list[str]]:
    """Per token of two bytes or more, in rank order, the merge that makes it."""
    merges = []
    for token, rank in _by_rank(ranks):
        pair = _last_merge(token, rank, ranks) if len(token) > 1 else None
        if pair is not None:
            merges.append([_text(pair[0]), _text(pair[1])])
    return merges


def _last_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """The two parts that merging `token`'s bytes by rank, with ranks below `rank` alone,
    ends in; None when it ends in three or more (no merge makes the token)."""
    parts = [token[index : index + 1] for index in range(len(token))]
    while len(parts) > 2:
        best_rank, best_index = rank, -1
        for index in range(len(parts) - 1):
            pair_rank = ranks.get(parts[index] + parts[index + 1], rank)
            if pair_rank < best_rank:
                best_rank, best_index = pair_rank, index
        if best_index < 0:
            return None
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    return parts[0], parts[1]


def _oniguruma_pattern(pattern: str) -> str:
    """`pattern`, in tiktoken's regex dialect, written to mean the same to Oniguruma: `^`
    and `$` as `\\A` and `\\z`, and a possessive counted repetition `X{1,3}+` as the atomic
    group `(?>X{1,3})`."""
    atoms: list[str] = []  # the rewritten pattern, one entry per atom (groups joined)
    group_starts: list[int] = []
    pieces = _REGEX_PIECE.findall(pattern)
    index = 0
    while index < len(pieces):
        piece = pieces[index]
        if piece == "(":
            group_starts.append(len(atoms))
            atoms.append(piece)
        elif piece == ")" and group_starts:
            start = group_starts.pop()
            atoms[start:] = ["".join(atoms[start:]) + piece]
        elif _COUNTED_REPETITION.fullmatch(piece) and pieces[index + 1 : index + 2] == ["+"]:
            atoms[-1] = f"(?>{atoms[-1]}{piece})"
            index += 1  # the `+` that made it possessive
        else:
            atoms.append(_TEXT_ANCHORS.get(piece, piece))
        index += 1
    return "".join(atoms)
