"""Qwen2 / Qwen2.5: Llama's block with biases on the query, key and value projections.

Refused: `use_sliding_window` with a window shorter than the context (transformers' Qwen2
slides only the layers past `max_window_layers`; not modelled), and what Llama refuses.
"""

from __future__ import annotations

from typing import Any

from jaxllm.config import ModelConfig
from jaxllm.models.base import LLAMA_BLOCK, refuse, register
from jaxllm.models.llama import LlamaFamily


def refuse_sliding_window(hf: dict[str, Any]) -> None:
    """Qwen's `use_sliding_window`, refused where the window would cut the context."""
    window = hf.get("sliding_window")
    cuts = window is not None and int(window) < int(hf.get("max_position_embeddings") or 0)
    if hf.get("use_sliding_window") and cuts:
        refuse("use_sliding_window", True, "Qwen's sliding-window layers are not modelled")


class QwenFamily(LlamaFamily):
    """Qwen2 and Qwen3: Llama's config.json with `use_sliding_window` off."""

    def config_from_hf(self, hf: dict[str, Any]) -> tuple[ModelConfig, list[str]]:
        refuse_sliding_window(hf)
        return super().config_from_hf(hf)

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        hf = {**super().config_to_hf(cfg), "use_sliding_window": False, "sliding_window": None}
        del hf["mlp_bias"]
        if cfg.qkv_bias:  # Qwen2's are always on: no field
            del hf["attention_bias"]
        return hf


QWEN2 = register(
    QwenFamily(
        "qwen2",
        ("Qwen2ForCausalLM",),
        "qwen2",
        {**LLAMA_BLOCK, "qkv_bias": True, "sliding_window": 0, "layer_types": []},
    )
)
