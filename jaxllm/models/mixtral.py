"""Mixtral (e.g. Mixtral-8x7B): Mistral's attention (every layer within `sliding_window`,
or none) and, in every layer, a mixture of SwiGLU experts (`jaxllm.moe.MoE`) whose top-k
weights are always renormalised (`norm_topk_prob`).

config.json: `num_local_experts`, `num_experts_per_tok`, `intermediate_size` (each
expert's width), `router_aux_loss_coef`; an absent one reads as transformers'
`MixtralConfig` default. Tensors as `save_pretrained` writes them: the router
`block_sparse_moe.gate.weight` (E, D) and one `block_sparse_moe.experts.{e}.w1` (gate),
`w3` (up) and `w2` (down) per expert.

Refused: `router_jitter_noise` (training-time noise on the router's input, not modelled),
and what Mistral refuses.
"""

from __future__ import annotations

from typing import Any

from jaxllm.config import ModelConfig
from jaxllm.hf.convert import HFConversionError
from jaxllm.models.base import LLAMA_BLOCK, TensorMap, decoder_tensor_maps, positive, register
from jaxllm.models.llama import MistralFamily

# transformers' MixtralConfig defaults, which an absent config.json field means.
HF_DEFAULTS = dict(num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.001)


class MixtralFamily(MistralFamily):
    def config_from_hf(self, hf: dict[str, Any]) -> tuple[ModelConfig, list[str]]:
        if hf.get("router_jitter_noise"):
            raise HFConversionError(
                f"config.json router_jitter_noise={hf['router_jitter_noise']!r} is not "
                "supported: the router's input is not perturbed here; set it to 0"
            )
        fields = self.fields_from_hf(hf)
        experts = positive(hf, "num_local_experts", HF_DEFAULTS["num_local_experts"])
        top_k = positive(hf, "num_experts_per_tok", HF_DEFAULTS["num_experts_per_tok"])
        coef = hf.get("router_aux_loss_coef", HF_DEFAULTS["router_aux_loss_coef"])
        fields.update(
            num_experts=int(experts),
            experts_per_token=int(top_k),
            expert_mlp_dim=fields["mlp_dim"],  # intermediate_size: each expert's width
            router_aux_loss_coef=float(coef),
        )
        return self.build(fields), []

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        if cfg.num_experts == 0:
            raise HFConversionError(
                "model.num_experts=0 cannot be exported as mixtral, whose layers are all "
                "mixtures of experts; set model.family=mistral for a dense model"
            )
        return {
            **super().config_to_hf(cfg),
            "intermediate_size": cfg.expert_mlp_dim,
            "num_local_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.experts_per_token,
            "router_aux_loss_coef": cfg.router_aux_loss_coef,
            "router_jitter_noise": 0.0,
        }

    def tensor_maps(self, cfg: ModelConfig) -> list[TensorMap]:
        """Mistral's names, the dense MLP's replaced by the router's and each expert's."""
        moe = "model.layers.{i}.block_sparse_moe."
        maps = [m for m in decoder_tensor_maps(cfg) if m.path[:2] != ("blocks", "mlp")]
        return maps + [
            TensorMap(("blocks", "mlp", "w_router_de"), moe + "gate.weight", True),
            TensorMap(("blocks", "mlp", "w_gate_edf"), moe + "experts.{e}.w1.weight", True),
            TensorMap(("blocks", "mlp", "w_up_edf"), moe + "experts.{e}.w3.weight", True),
            TensorMap(("blocks", "mlp", "w_down_efd"), moe + "experts.{e}.w2.weight", True),
        ]


# Mistral's block; the expert counts come from each config.json (so not fixed here).
MIXTRAL_BLOCK = {
    **{field: value for field, value in LLAMA_BLOCK.items() if field != "num_experts"},
    "norm_topk_prob": True,
}
MIXTRAL = register(MixtralFamily("mixtral", ("MixtralForCausalLM",), "mixtral", MIXTRAL_BLOCK))
