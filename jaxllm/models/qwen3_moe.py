"""Qwen3-MoE (e.g. Qwen3-30B-A3B): Qwen3's attention (q/k norms, no biases) and, in every
layer, a mixture of SwiGLU experts (`jaxllm.moe.MoE`) in place of the dense MLP.

config.json: `num_local_experts` (transformers 5; `num_experts` in earlier configs, and
what export writes, which both read), `num_experts_per_tok`, `moe_intermediate_size`,
`norm_topk_prob`, `router_aux_loss_coef`; an absent one reads as transformers'
`Qwen3MoeConfig` default, as transformers reads it. Tensors as `save_pretrained` writes
them: the router `mlp.gate.weight` (E, D) and one `mlp.experts.{e}.{gate,up,down}_proj.weight`
per expert, which import stacks on our `expert` axis.

Refused: dense layers among the sparse ones (`mlp_only_layers` not empty, or
`decoder_sparse_step` other than 1), and what Qwen3 refuses.
"""

from __future__ import annotations

from typing import Any

from jaxllm.config import ModelConfig
from jaxllm.hf.convert import HFConversionError
from jaxllm.models.base import (
    LLAMA_BLOCK,
    TensorMap,
    decoder_tensor_maps,
    positive,
    refuse,
    refuse_unless,
    register,
    rope_settings,
    shape_fields,
)
from jaxllm.models.llama import refuse_llama_unknowns
from jaxllm.models.qwen2 import QwenFamily, refuse_sliding_window

# transformers' Qwen3MoeConfig defaults, which an absent config.json field means.
HF_DEFAULTS = dict(
    num_experts=128,
    num_experts_per_tok=8,
    moe_intermediate_size=768,
    norm_topk_prob=False,
    router_aux_loss_coef=0.001,
)
EVERY_LAYER_SPARSE = "every layer here is a mixture of experts (no dense MLP layers)"


class Qwen3MoeFamily(QwenFamily):
    def config_from_hf(self, hf: dict[str, Any]) -> tuple[ModelConfig, list[str]]:
        refuse_llama_unknowns(hf)
        refuse_sliding_window(hf)
        if hf.get("mlp_only_layers"):
            refuse("mlp_only_layers", hf["mlp_only_layers"], EVERY_LAYER_SPARSE)
        refuse_unless(hf, "decoder_sparse_step", (1,), EVERY_LAYER_SPARSE)
        experts_field = "num_local_experts" if "num_local_experts" in hf else "num_experts"
        fields = {
            **shape_fields(hf),
            **rope_settings(hf),
            "num_experts": int(positive(hf, experts_field, HF_DEFAULTS["num_experts"])),
            "experts_per_token": int(
                positive(hf, "num_experts_per_tok", HF_DEFAULTS["num_experts_per_tok"])
            ),
            "expert_mlp_dim": int(
                positive(hf, "moe_intermediate_size", HF_DEFAULTS["moe_intermediate_size"])
            ),
            "norm_topk_prob": bool(hf.get("norm_topk_prob", HF_DEFAULTS["norm_topk_prob"])),
            "router_aux_loss_coef": float(
                hf.get("router_aux_loss_coef", HF_DEFAULTS["router_aux_loss_coef"])
            ),
        }
        return self.build(fields), []

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        if cfg.num_experts == 0:
            raise HFConversionError(
                "model.num_experts=0 cannot be exported as qwen3_moe, whose layers are all "
                "mixtures of experts; set model.family=qwen3 for a dense model"
            )
        return {
            **super().config_to_hf(cfg),
            "num_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.experts_per_token,
            "moe_intermediate_size": cfg.expert_mlp_dim,
            "norm_topk_prob": cfg.norm_topk_prob,
            "router_aux_loss_coef": cfg.router_aux_loss_coef,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        }

    def tensor_maps(self, cfg: ModelConfig) -> list[TensorMap]:
        """Qwen3's names, the dense MLP's replaced by the router's and each expert's."""
        experts = "model.layers.{i}.mlp.experts.{e}."
        maps = [m for m in decoder_tensor_maps(cfg) if m.path[:2] != ("blocks", "mlp")]
        return maps + [
            TensorMap(("blocks", "mlp", "w_router_de"), "model.layers.{i}.mlp.gate.weight", True),
            TensorMap(("blocks", "mlp", "w_gate_edf"), experts + "gate_proj.weight", True),
            TensorMap(("blocks", "mlp", "w_up_edf"), experts + "up_proj.weight", True),
            TensorMap(("blocks", "mlp", "w_down_efd"), experts + "down_proj.weight", True),
        ]


# The block of Qwen3; the expert fields come from each config.json (so not fixed here).
QWEN3_MOE_BLOCK = {
    **{field: value for field, value in LLAMA_BLOCK.items() if field != "num_experts"},
    "qk_norm": True,
    "sliding_window": 0,
    "layer_types": [],
}
QWEN3_MOE = register(
    Qwen3MoeFamily("qwen3_moe", ("Qwen3MoeForCausalLM",), "qwen3_moe", QWEN3_MOE_BLOCK)
)
