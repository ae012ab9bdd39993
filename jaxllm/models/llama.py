"""Llama (2, 3.x) and Mistral: RMSNorm, SwiGLU, grouped-query attention, no biases.

- `LlamaForCausalLM`: rope default, or Llama 3.1's "llama3" scaling (or "linear").
- `MistralForCausalLM`: the same block, every layer attending within `sliding_window`
  (transformers applies Mistral's window to all layers whatever `use_sliding_window` says;
  absent means 4096, null means none).

Refused: another `hidden_act`, `attention_bias` or `mlp_bias`, other rope scalings.
"""

from __future__ import annotations

from typing import Any

from jaxllm.config import ModelConfig
from jaxllm.hf.convert import HFConversionError
from jaxllm.models.base import (
    LLAMA_BLOCK,
    Family,
    refuse,
    refuse_unless,
    register,
    rope_parameters,
    rope_settings,
    shape_fields,
)


def refuse_llama_unknowns(hf: dict[str, Any]) -> None:
    """The checks of a Llama-style config.json: a SwiGLU MLP and no output/MLP biases."""
    refuse_unless(hf, "hidden_act", ("silu",), "the MLP here is SwiGLU (silu)")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            refuse(field, True, "biases are modelled only on q/k/v projections (Qwen2)")


class LlamaFamily(Family):
    def config_from_hf(self, hf: dict[str, Any]) -> tuple[ModelConfig, list[str]]:
        refuse_llama_unknowns(hf)
        return self.build({**shape_fields(hf), **rope_settings(hf)}), []

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        return {
            **self.common_to_hf(cfg),
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "rope_parameters": rope_parameters(cfg),
        }


class MistralFamily(LlamaFamily):
    def config_from_hf(self, hf: dict[str, Any]) -> tuple[ModelConfig, list[str]]:
        return self.build(self.fields_from_hf(hf)), []

    def fields_from_hf(self, hf: dict[str, Any]) -> dict[str, Any]:
        """The `ModelConfig` fields of a Mistral config.json (its block's aside)."""
        refuse_llama_unknowns(hf)
        fields = {**shape_fields(hf), **rope_settings(hf)}
        window = hf.get("sliding_window", 4096)
        if window is not None:
            window = int(window)
            fields.update(
                sliding_window=window, layer_types=["sliding_attention"] * fields["num_layers"]
            )
        return fields

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        if len(set(cfg.sliding_layers)) > 1:
            raise HFConversionError(
                f"model.layer_types={cfg.layer_types} cannot be exported as mistral, whose "
                "layers all share one window; use gemma3 for a mix"
            )
        window = cfg.sliding_window if all(cfg.sliding_layers) else None
        return {**super().config_to_hf(cfg), "sliding_window": window}


LLAMA = register(
    LlamaFamily(
        "llama",
        ("LlamaForCausalLM",),
        "llama",
        {**LLAMA_BLOCK, "sliding_window": 0, "layer_types": []},
    )
)
MISTRAL = register(MistralFamily("mistral", ("MistralForCausalLM",), "mistral", LLAMA_BLOCK))
