"""Reading UTF-8 text and JSON Lines with errors that name the file and line."""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jaxllm.errors import DataError


def read_utf8(path: Path) -> str:
    """The text of `path`; a leading byte-order mark (Windows editors) is dropped, bytes
    that are not UTF-8 are a `DataError` naming the file and offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        offset = error.start + (len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0)
        raise DataError(
            f"{path}: byte {offset} is not valid UTF-8; re-encode the file as UTF-8"
        ) from None


def json_lines(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """(where, record) of every non-blank line of `text`, read from `path`; `where` is
    `path:line` (1-based) for the caller's own errors about the record."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg})") from None
        yield where, record
