"""What Hugging Face interop shares beyond any one model family: its error type and the
JSON reader for config files. The families themselves (config.json translation, tensor
names) live in `jaxllm.models`."""

from __future__ import annotations

import json
from pathlib import Path

from jaxllm.errors import DataError, UserError


class HFConversionError(UserError, ValueError):
    """A Hugging Face checkpoint or config this library cannot represent exactly."""


def read_json_object(path: Path, missing_hint: str) -> dict:
    """The JSON object in `path`; one-line errors for a missing file (with `missing_hint`),
    invalid JSON, or JSON that is not an object."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; {missing_hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} holds {type(data).__name__}, not a JSON object")
    return data
