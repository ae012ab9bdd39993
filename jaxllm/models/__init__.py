"""Model families, one module each (`llama`, `qwen2`, `qwen3`, `gemma3`, ...), registered by
name: each owns its Hugging Face config.json translation and tensor names (`base.Family`).

Every module of this package registers its families when the package is imported, so a
new family is one module (and its parity test) and nothing else changes: import-hf finds
it by the config.json `architectures`, export-hf by `model.family`.
"""

from __future__ import annotations

import importlib
import pkgutil

from jaxllm.hf.convert import HFConversionError
from jaxllm.models.base import FAMILIES, REFUSED_ARCHITECTURES, Family, TensorMap

__all__ = ["FAMILIES", "Family", "TensorMap", "family", "family_of_architecture"]

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def family(name: str) -> Family:
    """The registered family `name` (`model.family`)."""
    if name not in FAMILIES:
        raise HFConversionError(
            f"model.family={name!r} is unknown; use one of {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[name]


def family_of_architecture(architecture: str | None) -> Family:
    """The family that imports a config.json whose `architectures` starts with
    `architecture`."""
    for candidate in FAMILIES.values():
        if architecture in candidate.architectures:
            return candidate
    if architecture in REFUSED_ARCHITECTURES:
        raise HFConversionError(
            f"config.json architectures=[{architecture!r}] is not supported: "
            f"{REFUSED_ARCHITECTURES[architecture]}"
        )
    known = [name for f in FAMILIES.values() for name in f.architectures]
    listed = [architecture] if architecture is not None else []
    raise HFConversionError(
        f"config.json architectures={listed} is not supported; import one of {', '.join(known)}"
    )
