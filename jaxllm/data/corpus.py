"""Text corpora: a file, a folder of `.txt`/`.jsonl` files, or a Hugging Face dataset.

Each `.txt` file is one document; each line of a `.jsonl` file is one document whose text
is in `text_field`. `hf:NAME/CONFIG` (and the other forms `hf_dataset` reads) streams a
Hugging Face dataset (the optional `datasets` package); `hf_records` is the one place its
rows are read, for prompts too. `pydoc` is a built-in corpus that needs no file: the
help() pages that ship with Python (`pydoc_data.topics`, ~465 KB, one document per topic).
Every problem is a `DataError` naming the file (and line).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

from jaxllm.data.jsonl import json_lines, read_utf8
from jaxllm.errors import DataError

TEXT_SUFFIXES = (".txt", ".jsonl")
PYDOC = "pydoc"  # data.path of the built-in corpus


def _pydoc_documents() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]


def corpus_files(path: str | Path, suffixes: tuple[str, ...] = TEXT_SUFFIXES) -> list[Path]:
    """The files a local data path stands for, in a fixed (sorted) order: the file, or the
    files with one of `suffixes` under the folder."""
    path = Path(path)
    kinds = " or ".join(suffixes)
    if not path.exists():
        raise DataError(f"'{path}' does not exist; point it at a {kinds} file or a folder of them")
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(
            f"'{path}' is neither a file nor a folder (a device or a pipe?); point it at a "
            f"{kinds} file or a folder of them"
        )
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
    if not files:
        raise DataError(f"folder '{path}' holds no {kinds} files")
    return files


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    for where, record in json_lines(path, read_utf8(path)):
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{where}: no string field '{text_field}'")
        yield text


def hf_dataset(spec: str, default_split: str) -> tuple[str, str | None, str]:
    """(dataset name or local folder, config or None, split) of `spec`: `hf:NAME`,
    `hf:NAME/CONFIG`, `hf:OWNER/NAME/CONFIG` or `hf:FOLDER`, each with an optional
    `:SPLIT` (else `default_split`)."""
    rest = spec.removeprefix("hf:")
    name, colon, split = rest.rpartition(":")
    if not colon or "/" in split or not split:
        name, split = rest, default_split
    if Path(name).is_dir():
        return name, None, split
    parts = name.split("/")
    if len(parts) > 3 or not all(parts):
        raise DataError(
            f"'{spec}' is not a Hugging Face dataset; use hf:NAME, hf:NAME/CONFIG or "
            "hf:OWNER/NAME/CONFIG, each optionally followed by :SPLIT"
        )
    if len(parts) == 1:
        return name, None, split
    return "/".join(parts[:-1]), parts[-1], split


def hf_records(spec: str, default_split: str, limit: int | None = None) -> Iterator[dict]:
    """The rows of the Hugging Face dataset `spec` (see `hf_dataset`), streamed in order,
    at most `limit` of them."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"data.path '{spec}' needs the Hugging Face `datasets` package: "
            "pip install 'jaxllm[hf]'"
        ) from None
    name, config, split = hf_dataset(spec, default_split)
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
        for count, record in enumerate(stream):
            if limit is not None and count >= limit:
                return
            yield record
    except (OSError, ValueError) as error:
        raise DataError(f"'{spec}' (split {split}): {str(error).splitlines()[0]}") from None


def _hf_documents(spec: str, split: str, text_field: str, limit: int | None) -> Iterator[str]:
    for record in hf_records(spec, split, limit):
        yield record[text_field]


def iter_documents(
    path: str,
    text_field: str = "text",
    hf_split: str = "train",
    hf_max_documents: int | None = None,
) -> Iterator[str]:
    """Yield the documents of a corpus in a fixed order."""
    if path == PYDOC:
        yield from _pydoc_documents()
        return
    if path.startswith("hf:"):
        yield from _hf_documents(path, hf_split, text_field, hf_max_documents)
        return
    for file in corpus_files(path):
        if file.suffix == ".jsonl":
            yield from _jsonl_documents(file, text_field)
        else:
            yield read_utf8(file)


def corpus_fingerprint(path: str) -> list:
    """What identifies a corpus's content cheaply: each file's path, size and mtime."""
    if path.startswith("hf:"):
        return [path]
    if path == PYDOC:
        return [path, sys.version]
    return [
        (str(file.resolve()), file.stat().st_size, file.stat().st_mtime_ns)
        for file in corpus_files(path)
    ]
