"""Tokenize a corpus once into memory-mapped arrays on disk, and reuse them on later runs.

The corpus becomes one stream `<|start|> doc <|end|> <|start|> doc <|end|> ...` (an
imported model's tokenizer: its BOS if it adds one, the doc, its eos) with a parallel
stream of segment ids (document index + 1). The last `val_fraction` of the stream is the
validation split. Files live in `<cache_dir>/<fingerprint>/`: `tokens.bin`,
`segments.bin` and `meta.json`; the folder is written under a temporary name and renamed
when complete, so an interrupted preparation is never mistaken for a finished one. The
temporary folders of a preparation that was killed are removed by the next one, and a
cache whose files do not match its `meta.json` (a truncated `tokens.bin`) is rebuilt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxllm.config import DataConfig
from jaxllm.data.corpus import corpus_fingerprint, iter_documents
from jaxllm.errors import DataError
from jaxllm.staging import new_staging, staging_prefix
from jaxllm.tokenizer import Tokenizer

FORMAT_VERSION = 1
DOCUMENTS_PER_CHUNK = 256
PIECE_CHARS = 1 << 20  # split huge documents into ~1M-character pieces at line ends


@dataclass(frozen=True)
class TokenStream:
    """A token stream and its segment ids, both (N,), usually memory-mapped."""

    tokens: np.ndarray
    segment_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    def num_rows(self, seq_len: int) -> int:
        """Rows of seq_len + 1 tokens at stride seq_len (each row's last token starts the next)."""
        return max((len(self) - 1) // seq_len, 0)

    def rows(self, row_ids: Iterable[int], seq_len: int) -> tuple[np.ndarray, np.ndarray, None]:
        """(R, seq_len + 1) token ids and segment ids of the given rows; every token trains."""
        starts = np.asarray(list(row_ids), np.int64) * seq_len
        window = starts[:, None] + np.arange(seq_len + 1)
        tokens, segments = self.tokens[window], self.segment_ids[window]
        return tokens.astype(np.int32), segments.astype(np.int32), None


def _pieces(text: str) -> Iterator[str]:
    """A document cut at line ends into pieces of about PIECE_CHARS, for parallel encoding."""
    start = 0
    while len(text) - start > PIECE_CHARS:
        cut = text.rfind("\n", start, start + PIECE_CHARS) + 1 or start + PIECE_CHARS
        yield text[start:cut]
        start = cut
    yield text[start:]


def _chunks(documents: Iterable[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    for document in documents:
        chunk.append(document)
        if len(chunk) == DOCUMENTS_PER_CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _write_streams(
    documents: Iterable[str], tokenizer: Tokenizer, folder: Path, token_dtype: np.dtype
) -> tuple[int, int]:
    """Append every document's tokens and segment ids to the raw files; (tokens, docs)."""
    num_tokens = num_documents = 0
    threads = os.cpu_count() or 1
    with (
        open(folder / "tokens.bin", "wb") as tokens_file,
        open(folder / "segments.bin", "wb") as segments_file,
    ):
        for chunk in _chunks(documents):
            pieces, owners = [], []
            for index, document in enumerate(chunk):
                for piece in _pieces(document):
                    pieces.append(piece)
                    owners.append(index)
            encoded = tokenizer.encode_batch(pieces, num_threads=threads)
            per_document = [list(tokenizer.document_start_ids) for _ in chunk]
            for owner, ids in zip(owners, encoded, strict=True):
                per_document[owner].extend(ids)
            for ids in per_document:
                ids.extend(tokenizer.document_end_ids)
                num_documents += 1
                # write(), not tofile(): a full disk is then the OSError with its errno
                tokens_file.write(np.asarray(ids, token_dtype).tobytes())
                segments_file.write(np.full(len(ids), num_documents, np.int32).tobytes())
                num_tokens += len(ids)
    return num_tokens, num_documents


def _fingerprint(data_cfg: DataConfig, tokenizer: Tokenizer) -> str:
    description = {
        "format": FORMAT_VERSION,
        "corpus": corpus_fingerprint(data_cfg.path),
        "text_field": data_cfg.text_field,
        "hf": [data_cfg.hf_split, data_cfg.hf_max_documents],
        "tokenizer": [
            tokenizer.name,
            tokenizer.vocab_size,
            tokenizer.encode("The fingerprint of a tokenizer, 123!"),
            tokenizer.document_start_ids,
            tokenizer.document_end_ids,
        ],
        "val_fraction": data_cfg.val_fraction,
    }
    return hashlib.sha256(json.dumps(description).encode()).hexdigest()[:16]


def _mismatch(folder: Path) -> str | None:
    """How the files of a cache folder disagree with its meta.json, or None if they agree."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        sizes = {
            "tokens.bin": meta["num_tokens"] * np.dtype(meta["token_dtype"]).itemsize,
            "segments.bin": meta["num_tokens"] * np.dtype(np.int32).itemsize,
        }
    except (ValueError, KeyError, TypeError) as error:
        return f"meta.json does not read ({type(error).__name__})"
    for name, expected in sizes.items():
        actual = (folder / name).stat().st_size if (folder / name).is_file() else 0
        if actual != expected:
            return f"{name} has {actual:,} bytes, meta.json says {expected:,}"
    return None


def _open(folder: Path) -> tuple[TokenStream, TokenStream]:
    meta = json.loads((folder / "meta.json").read_text())
    dtype, count, split = np.dtype(meta["token_dtype"]), meta["num_tokens"], meta["split_at"]
    tokens = np.memmap(folder / "tokens.bin", dtype=dtype, mode="r", shape=(count,))
    segments = np.memmap(folder / "segments.bin", dtype=np.int32, mode="r", shape=(count,))
    return (
        TokenStream(tokens[:split], segments[:split]),
        TokenStream(tokens[split:], segments[split:]),
    )


def prepare_token_streams(
    data_cfg: DataConfig, tokenizer: Tokenizer, cache_dir: str | Path
) -> tuple[TokenStream, TokenStream]:
    """(train, val) token streams, tokenized once and memory-mapped after: `data.path`'s
    tokens split at 1 - `data.val_fraction`, or with `data.eval_path` set, all of
    `data.path` and all of `data.eval_path`.

    Raises:
        DataError: missing or malformed corpus, or one with no text.
    """
    if not data_cfg.path:
        raise DataError("data.path is not set; pass data.path=FILE_OR_FOLDER")
    if not data_cfg.eval_path:
        return _prepared(data_cfg, tokenizer, cache_dir)
    whole = dataclasses.replace(data_cfg, val_fraction=0.0)  # split_at: every token
    train, _ = _prepared(whole, tokenizer, cache_dir)
    val, _ = _prepared(dataclasses.replace(whole, path=data_cfg.eval_path), tokenizer, cache_dir)
    return train, val


def _prepared(
    data_cfg: DataConfig, tokenizer: Tokenizer, cache_dir: str | Path
) -> tuple[TokenStream, TokenStream]:
    """`data_cfg.path`'s (train, val) streams, split at 1 - `data_cfg.val_fraction`."""
    folder = Path(cache_dir) / _fingerprint(data_cfg, tokenizer)
    if folder.is_dir():
        mismatch = _mismatch(folder)
        if mismatch is None:
            return _open(folder)
        print(f"warning: token cache {folder} is damaged ({mismatch}); rebuilding", file=sys.stderr)
        damaged = folder.with_name(f"{staging_prefix(folder)}{os.getpid()}-damaged")
        with contextlib.suppress(FileNotFoundError):  # another process moved it first
            os.replace(folder, damaged)  # out of the way first: no reader sees a half cache
        shutil.rmtree(damaged, ignore_errors=True)

    staging = new_staging(folder)
    try:
        token_dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
        documents = iter_documents(
            data_cfg.path, data_cfg.text_field, data_cfg.hf_split, data_cfg.hf_max_documents
        )
        try:
            num_tokens, num_documents = _write_streams(documents, tokenizer, staging, token_dtype)
        except OSError as error:  # a full disk: the cache named, its staging removed below
            if error.errno is None:
                raise
            raise OSError(error.errno, error.strerror, str(folder)) from None
        markers = len(tokenizer.document_start_ids) + len(tokenizer.document_end_ids)
        if num_tokens == markers * num_documents:  # only the documents' start/end markers
            raise DataError(f"corpus '{data_cfg.path}' is empty: it holds no text to train on")
        meta = {
            "num_tokens": num_tokens,
            "num_documents": num_documents,
            "split_at": int(round(num_tokens * (1 - data_cfg.val_fraction))),
            "token_dtype": token_dtype.name,
            "tokenizer": tokenizer.name,
            "path": data_cfg.path,
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=1))
        # OSError: another process finished the same preparation first; use its files.
        with contextlib.suppress(OSError):
            os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _open(folder)
