"""Hugging Face tokenizer folders, run by Hugging Face `tokenizers`, as a jaxllm `Tokenizer`.

`HFTokenizer` loads a model's `tokenizer.json` with the Rust library that wrote it, so every
model type (byte-level BPE, sentencepiece-style BPE with byte fallback, Unigram, WordPiece)
and its added tokens encode and decode exactly as in transformers. Beside it, the folder's
other files say what transformers' `AutoTokenizer` (its `TokenizersBackend`) would add:
- `tokenizer_config.json` (else `special_tokens_map.json`): the named special tokens
  (`bos_token`, `eos_token`, `pad_token`, ... as text or as an AddedToken object with a
  `content`); a named token the vocabulary lacks is added as a special token, as transformers
  does; `clean_up_tokenization_spaces` (applied in decode, BPE models excepted); the chat
  template. Beside a tokenizer.json, transformers 5 ignores `add_bos_token`/`add_eos_token`
  (the post-processor decides), and so do we;
- `chat_template.jinja` (transformers 5 writes the template there; older folders in
  `tokenizer_config.json`'s `chat_template`, a text or a list of named templates whose
  `default` is taken);
- `generation_config.json`: `eos_token_id` (an int or a list), the ids that end a reply.

What jaxllm asks of it (`jaxllm.tokenizer.Tokenizer`): a plain prompt is
`encode(text, add_special_tokens=True)` (Llama 3 gets `<|begin_of_text|>`, Gemma `<bos>`,
Qwen nothing); a pre-training document is the BOS the post-processor adds (if any), the text
and the eos; replies stop on `generation_config.json`'s eos ids, else on the eos token; the
pad id is the pad token's, else the eos token's, else 0. No jaxllm control token is ever put
in; `special_id("<think>")` is the model's own added token or an error.

`save_hf_tokenizer` writes jaxllm's own tiktoken tokenizers as `tokenizer.json` +
`tokenizer_config.json` for `transformers.AutoTokenizer` and `tokenizers.Tokenizer.from_file`:
ranks become ids, and each token gets the merge that rank-ordered merging of its bytes makes
it by. HF splits text with Oniguruma's regex dialect, tiktoken with Rust's fancy-regex; they
differ on `^`/`$` (line anchors in Oniguruma) and `X{1,3}+` (possessive in tiktoken), which
writing rewrites.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from jaxllm.chat_templates import (
    CHAT_TEMPLATES,
    IM_END,
    JINJA_SUFFIX,
    JINJA_TEMPLATES,
    MODEL_TEMPLATE,
    JinjaChatTemplate,
)
from jaxllm.errors import ConfigError, DataError
from jaxllm.hf.convert import read_json_object
from jaxllm.tokenizer import TiktokenTokenizer, Tokenizer, write_file_atomically

# transformers' named special tokens (`SPECIAL_TOKENS_ATTRIBUTES`), visible to templates.
NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# The files of a tokenizer folder that import copies and export writes back, those present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"


def hf_tokenizer_file(name_or_path: str) -> Path | None:
    """The Hugging Face `tokenizer.json` that a tokenizer name or path names: an existing
    `.json` file, or the one in the folder a path names; None for anything else (a tiktoken
    encoding's name, a `.tiktoken` file, a file that does not exist)."""
    path = Path(name_or_path)
    if os.path.sep in name_or_path and (path / "tokenizer.json").is_file():
        return path / "tokenizer.json"
    return path if path.suffix == ".json" and path.is_file() else None


def _json_object(path: Path) -> dict:
    """The JSON object in `path` ({} when there is no such file); DataError for a file that
    is not a JSON object."""
    return read_json_object(path, "") if path.is_file() else {}


def _token_text(value) -> str | None:
    """A special token's text, written as text or as an AddedToken object."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer(Tokenizer):
    """The tokenizer of a Hugging Face folder's `tokenizer.json` (or that file itself).

    `chat_template`: `model` (the folder's own Jinja template) or a path to a `.jinja` file;
    jaxllm's own names (`jaxllm`, `chatml`) write our control tokens, which an imported model
    never sees, so asking for its template then is a ConfigError. `enable_thinking` is passed
    to the template when not None. Raises DataError (one line naming the file) when the
    tokenizer does not load.
    """

    def __init__(
        self,
        path: str | Path,
        chat_template: str = MODEL_TEMPLATE,
        enable_thinking: bool | None = None,
    ):
        import tokenizers

        path = Path(path)
        self.file = path / "tokenizer.json" if path.is_dir() else path
        self.folder = self.file.parent
        self.name = self.folder.name or "hf"
        try:
            backend = tokenizers.Tokenizer.from_file(str(self.file))
        except Exception as error:  # the Rust side raises plain Exceptions
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise DataError(
                f"{self.file} does not load in Hugging Face tokenizers ({reason}); pass the "
                "model's tokenizer.json as save_pretrained writes it"
            ) from None
        config = _json_object(self.folder / "tokenizer_config.json")
        special_map = _json_object(self.folder / "special_tokens_map.json")
        self.special_tokens = {
            name: text
            for name in NAMED_SPECIAL_TOKENS
            if (text := _token_text(config.get(name, special_map.get(name)))) is not None
        }
        missing = [t for t in self.special_tokens.values() if backend.token_to_id(t) is None]
        if missing:  # transformers adds a named special token that the vocabulary lacks
            backend.add_special_tokens(
                [tokenizers.AddedToken(t, special=True, normalized=False) for t in missing]
            )
        self._backend = backend
        self._clean_up_spaces = bool(config.get("clean_up_tokenization_spaces")) and (
            json.loads(backend.model.__getstate__()).get("type") != "BPE"
        )
        self._added = {t.content for t in backend.get_added_tokens_decoder().values()}
        self._vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        self._stop_ids = self._read_stop_ids()
        plain, full = self.encode("a"), self.encode_prompt("a")
        starts = [i for i in range(len(full)) if full[i : i + len(plain)] == plain]
        self._document_start = tuple(full[: starts[0]] if starts else ())
        self._template_choice = chat_template
        self._template = self._read_template(config, chat_template, enable_thinking)

    def _read_stop_ids(self) -> tuple[int, ...]:
        """`generation_config.json`'s eos_token_id (int or list), else the eos token's id."""
        generation = _json_object(self.folder / GENERATION_CONFIG_FILE)
        eos = generation.get("eos_token_id")
        if isinstance(eos, int):
            return (eos,)
        if isinstance(eos, list) and eos and all(isinstance(i, int) for i in eos):
            return tuple(eos)
        eos_id = self.named_id("eos_token")
        return () if eos_id is None else (eos_id,)

    def named_id(self, name: str) -> int | None:
        text = self.special_tokens.get(name)
        return None if text is None else self._backend.token_to_id(text)

    def _read_template(
        self, config: dict, choice: str, enable_thinking: bool | None
    ) -> JinjaChatTemplate | None:
        """The Jinja template `choice` names (None where the folder has none)."""
        if choice.endswith(JINJA_SUFFIX):
            origin = Path(choice)
            if not origin.is_file():
                raise ConfigError(f"chat.template={choice}: no such file")
            source = origin.read_text(encoding="utf-8")
        elif choice == MODEL_TEMPLATE:
            origin = self.folder / TEMPLATE_FILE
            source = origin.read_text(encoding="utf-8") if origin.is_file() else None
            if source is None:
                origin = self.folder / "tokenizer_config.json"
                source = _configured_template(config.get("chat_template"), origin)
            if source is None:
                return None
        else:
            return None
        return JinjaChatTemplate(str(origin), source, dict(self.special_tokens), enable_thinking)

    @property
    def chat_template(self) -> JinjaChatTemplate:
        if self._template is not None:
            return self._template
        if self._template_choice in CHAT_TEMPLATES:
            raise ConfigError(
                f"chat.template={self._template_choice} writes jaxllm's control tokens, which "
                f"the model of {self.folder} was never trained on; set chat.template=model (its "
                "own template) or a path to a .jinja file"
            )
        raise ConfigError(
            f"{self.folder} has no chat template (no {TEMPLATE_FILE}, no chat_template in "
            "tokenizer_config.json); set chat.template to a .jinja file with the template the "
            "model was trained with"
        )

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        """HF's `encode(text, add_special_tokens=False)`: added tokens in `text` matched."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        """`encode` of many texts (in `tokenizers`' own thread pool)."""
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def encode_chat_text(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = self._backend.encode(text, add_special_tokens=False)
        return encoding.ids, [tuple(span) for span in encoding.offsets]

    def encode_prompt(self, text: str) -> list[int]:
        """HF's `encode(text, add_special_tokens=True)`: with the post-processor's BOS/EOS."""
        return self._backend.encode(text, add_special_tokens=True).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """transformers' `decode(ids, skip_special_tokens=...)`."""
        text = self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _cleaned_up(text) if self._clean_up_spaces else text

    @property
    def document_start_ids(self) -> list[int]:
        """The ids the post-processor puts before a text (Llama 3's BOS; none for Qwen)."""
        return list(self._document_start)

    @property
    def document_end_ids(self) -> list[int]:
        eos = self.named_id("eos_token")
        return [] if eos is None else [eos]

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return self._stop_ids

    @property
    def pad_id(self) -> int:
        for name in ("pad_token", "eos_token"):
            if (found := self.named_id(name)) is not None:
                return found
        return 0

    def special_id(self, token: str) -> int:
        """The model's own id of added token `token` (`<think>` in Qwen3)."""
        if token not in self._added:
            raise DataError(
                f"the tokenizer of {self.folder} has no {token} token (the reasoning format "
                "needs one); use a model whose vocabulary has it, or rewards without it"
            )
        return self._backend.token_to_id(token)

    def generation_stop_ids(self) -> list[int]:
        """transformers' `generate` stops on the eos ids alone, for plain prompts too."""
        return list(self.stop_ids)

    def save(self, out_dir: str | Path) -> None:
        """Write the folder's tokenizer files into `out_dir` as they came, with the chat
        template in use (as transformers 5 saves it: `chat_template.jinja`, and in
        `tokenizer_config.json`) and `generation_config.json`'s eos ids (the stop ids)."""
        out_dir = Path(out_dir)
        for name in TOKENIZER_FILES:
            if (self.folder / name).is_file():
                write_file_atomically(out_dir / name, (self.folder / name).read_bytes())
        if self._template is not None:
            source = self._template.source
            write_file_atomically(out_dir / TEMPLATE_FILE, source.encode("utf-8"))
            config = {
                **_json_object(self.folder / "tokenizer_config.json"),
                "chat_template": source,
            }
            _write_json(out_dir / "tokenizer_config.json", config)
        generation = _json_object(self.folder / GENERATION_CONFIG_FILE)
        ids = {key: value for key, value in hf_token_ids(self).items() if value is not None}
        _write_json(out_dir / GENERATION_CONFIG_FILE, {**generation, **ids})


def library_vocab_size(tokenizer: Tokenizer, model_rows: int) -> int:
    """The ids the model's own library reads logits over, samples from and exports: every
    one of an imported model's `model_rows` (transformers' logits include rows past its
    tokenizer's ids, as Qwen's do); the tokenizer's ids of a run of ours (the rest are
    padding rows added for speed, which export trims)."""
    return model_rows if isinstance(tokenizer, HFTokenizer) else tokenizer.vocab_size


def hf_token_ids(tokenizer: Tokenizer) -> dict[str, int | list[int] | None]:
    """`bos_token_id`, `eos_token_id` and `pad_token_id` for `config.json` and
    `generation_config.json`: the BOS a document starts with (None without), the ids that
    end a generation (an int when one), the pad id."""
    bos = tokenizer.document_start_ids
    eos = tokenizer.generation_stop_ids()
    return {
        "bos_token_id": bos[0] if len(bos) == 1 else None,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": tokenizer.pad_id,
    }


def save_tokenizer(tokenizer: Tokenizer, out_dir: str | Path) -> None:
    """The tokenizer files of `tokenizer` in `out_dir`: an imported model's own (see
    `HFTokenizer.save`), or jaxllm's own written as Hugging Face files (`save_hf_tokenizer`)."""
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.save(out_dir)
    else:
        save_hf_tokenizer(tokenizer, out_dir)


def generation_config_of_model(hf_config: Mapping) -> dict:
    """transformers' `GenerationConfig.from_model_config` ids: the bos/eos/pad ids of a
    model's `config.json`, for a folder that has no `generation_config.json`."""
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {key: hf_config[key] for key in keys if hf_config.get(key) is not None}


def _write_json(path: Path, content: dict) -> None:
    text = json.dumps(content, ensure_ascii=False, indent=2)
    write_file_atomically(path, text.encode("utf-8"))


def _configured_template(value, origin: Path) -> str | None:
    """`tokenizer_config.json`'s `chat_template`: a text, or a list of named templates whose
    `default` is taken."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise DataError(
        f"{origin}: chat_template is neither a text nor a list of named templates with a 'default'"
    )


def _cleaned_up(text: str) -> str:
    """transformers' `clean_up_tokenization`: spaces before punctuation and English
    contractions taken out (WordPiece tokenizers decode with them)."""
    for spaced, joined in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(spaced, joined)
    return text


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

# One lexical piece of a regex: an escape (`\p{L}`, `\s`), a character class (one level of
# nesting, as `[[:alpha:]]`), a counted repetition, or any other single character.
_REGEX_PIECE = re.compile(
    r"\\[pPx]\{[^}]*\}|\\.|\[\^?\]?(?:\\.|\[[^\]]*\]|[^\]\\])*\]|\{\d+(?:,\d*)?\}|.", re.DOTALL
)
_COUNTED_REPETITION = re.compile(r"\{\d+(?:,\d*)?\}")
# tiktoken's anchors of the whole text, written for Oniguruma (whose `^`/`$` are per line).
_TEXT_ANCHORS = {"^": r"\A", "$": r"\z"}


def save_hf_tokenizer(tokenizer: TiktokenTokenizer, out_dir: str | Path) -> None:
    """Write `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja` and
    `generation_config.json` for `tokenizer` into `out_dir`.

    `transformers.AutoTokenizer.from_pretrained(out_dir)` gives our ids: those of `encode`
    on ordinary text, and of `encode(text, allow_special=True)` on text holding special-token
    strings, which HF always matches; `encode(text)` (special tokens added) is our
    `encode_prompt`. Every special token, the base's and ours, is an added token
    (`special: true`); `<|start|>` begins a text, `<|im_end|>` and `<|end|>` end one, and
    `<|pad|>` pads. `HFTokenizer(out_dir)` reads the folder back with our template and stops.
    """
    out_dir = Path(out_dir)
    for name, content in (
        ("tokenizer.json", _tokenizer_json(tokenizer)),
        ("tokenizer_config.json", _tokenizer_config(tokenizer)),
        (GENERATION_CONFIG_FILE, hf_token_ids(tokenizer)),
    ):
        _write_json(out_dir / name, content)
    template = JINJA_TEMPLATES[tokenizer.chat_template]
    write_file_atomically(out_dir / TEMPLATE_FILE, template.encode("utf-8"))


def _tokenizer_json(tokenizer: TiktokenTokenizer) -> dict:
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
        "post_processor": _start_processor(tokenizer),
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


def _start_processor(tokenizer: TiktokenTokenizer) -> dict:
    """A post-processor that puts `<|start|>` before a text, as `encode_prompt` does."""
    from tokenizers import processors

    start = "<|start|>"
    processor = processors.TemplateProcessing(
        single=f"{start}:0 $A:0",
        pair=f"{start}:0 $A:0 $B:1",
        special_tokens=[(start, tokenizer.start_id)],
    )
    return json.loads(processor.__getstate__())


def _tokenizer_config(tokenizer: TiktokenTokenizer) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|start|>",
        "eos_token": IM_END,
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
