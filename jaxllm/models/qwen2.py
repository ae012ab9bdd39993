"""Qwen2 / Qwen2.5: Llama's block with biases on the query, key and value projections.

Refused: `use_sliding_window` with a window shorter than the context (transformers' Qwen2
slides only the layers past `max_window_layers`; not modelled), and what Llama refuses.
"""

from __future__ import annotations

from typing import Any

from jaxllm.config import ModelConfig
from jaxllm.models.base import (
    LLAMA_BLOCK,
    Family,
    refuse,
    register,
    rope_parameters,
    rope_settings,
    shape_fields,
)
from jaxllm.models.llama import refuse_llama_unknowns


def refuse_sliding_window(hf: dict[str, Any]) -> None:
    """Qwen's `use_sliding_window`, refused where the window would cut the context."""
    window = hf.get("sliding_window")
    cuts = window is not None and int(window) < int(hf.get("max_position_embeddings") or 0)
    if hf.get("use_sliding_window") and cuts:
        refuse("use_sliding_window", True, "Qwen's sliding-window layers are not modelled")


class QwenFamily(Family):
    """Qwen2 and Qwen3: a Llama-style config.json with `use_sliding_window` off."""

    def config_from_hf(self, hf: dict[str, Any]) -> tuple[ModelConfig, list[str]]:
        refuse_llama_unknowns(hf)
        refuse_sliding_window(hf)
        return self.build({**shape_fields(hf), **rope_settings(hf)}), []

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        return {
            **self.common_to_hf(cfg),
            "hidden_act": "silu",
            **({} if cfg.qkv_bias else {"attention_bias": False}),  # Qwen2's are always on
            "use_sliding_window": False,
            "sliding_window": None,
            "rope_parameters": rope_parameters(cfg),
        }


QWEN2 = register(
    QwenFamily(
        "qwen2",
        ("Qwen2ForCausalLM",),
        "qwen2",
        {**LLAMA_BLOCK, "qkv_bias": True, "sliding_window": 0, "layer_types": []},
    )
)
