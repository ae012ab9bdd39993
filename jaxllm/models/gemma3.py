"""Gemma 3 (text): `Gemma3ForCausalLM`, config.json model_type `gemma3_text`.

Its block, against Llama's:
- RMSNorm as x_hat * (1 + w) in float32 (weights stored as HF stores them, 0 = identity),
  and "sandwich" norms: the attention and MLP outputs are normalised before each residual
  add (input_layernorm, post_attention_layernorm, pre_feedforward_layernorm,
  post_feedforward_layernorm);
- GeGLU (tanh-approximated gelu), q/k RMSNorm over head_dim, embeddings x sqrt(width)
  (in the compute dtype), attention scale query_pre_attn_scalar^-0.5, optional final
  logit soft-capping;
- local layers (`layer_types`, or every `sliding_window_pattern`-th layer global when a
  transformers 4 config lacks them) attend within `sliding_window` and use their own rope
  base (`rope_local_base_freq`, unscaled); global layers may scale theirs ("linear" in
  Gemma 3 4B+).

Refused: `Gemma3ForConditionalGeneration` (import the text model), `attn_logit_softcapping`,
`use_bidirectional_attention`, `attention_bias`, another `hidden_activation`.
"""

from __future__ import annotations

from typing import Any

from jaxllm.config import ModelConfig
from jaxllm.models.base import (
    LLAMA_BLOCK,
    REFUSED_ARCHITECTURES,
    Family,
    positive,
    refuse,
    refuse_unless,
    register,
    rope_parameters,
    rope_settings,
    shape_fields,
)

GLOBAL_THETA, LOCAL_THETA = 1_000_000.0, 10_000.0  # transformers' defaults for Gemma 3


class Gemma3Family(Family):
    def config_from_hf(self, hf: dict[str, Any]) -> tuple[ModelConfig, list[str]]:
        refuse_unless(
            hf, "hidden_activation", ("gelu_pytorch_tanh",), "the MLP here is GeGLU (gelu tanh)"
        )
        for field, why in (
            ("attn_logit_softcapping", "attention scores are not soft-capped here"),
            ("use_bidirectional_attention", "attention here is causal"),
            ("attention_bias", "Gemma 3's projections have no biases here"),
        ):
            if hf.get(field):
                refuse(field, hf[field], why)
        fields = shape_fields(hf, tie_default=True)
        layer_types = hf.get("layer_types")
        if layer_types is None:  # transformers 4's configs: one global layer in `pattern`
            pattern = int(positive(hf, "sliding_window_pattern", 6))
            layer_types = [
                "sliding_attention" if (i + 1) % pattern else "full_attention"
                for i in range(fields["num_layers"])
            ]
        if isinstance(hf.get("rope_parameters"), dict):  # transformers 5: one per layer type
            local = rope_settings(hf, "sliding_attention", LOCAL_THETA)
            if "rope_scaling" in local:
                refuse(
                    "rope_parameters.sliding_attention.rope_type",
                    local["rope_scaling"],
                    "local layers' rope is unscaled here",
                )
            local_theta = local["rope_theta"]
        else:  # transformers 4: rope_scaling is the global layers', the local base its own
            local_theta = float(positive(hf, "rope_local_base_freq", LOCAL_THETA))
        softcap = hf.get("final_logit_softcapping")
        fields.update(
            rope_settings(hf, "full_attention", GLOBAL_THETA),
            rope_local_theta=local_theta,
            layer_types=list(layer_types),
            sliding_window=int(positive(hf, "sliding_window", 4096)),
            query_pre_attn_scalar=float(positive(hf, "query_pre_attn_scalar", 256)),
            final_logit_softcap=None if softcap is None else float(softcap),
        )
        return self.build(fields), []

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta}
        if cfg.rope_local_theta is None:  # the sliding layers share the global rope
            local = rope_parameters(cfg)
        return {
            **self.common_to_hf(cfg),
            "hidden_activation": "gelu_pytorch_tanh",
            "attention_bias": False,
            # transformers' Gemma3TextConfig takes an int here (a float is refused)
            "query_pre_attn_scalar": int(cfg.query_pre_attn_scalar)
            if float(cfg.query_pre_attn_scalar).is_integer()
            else cfg.query_pre_attn_scalar,
            "final_logit_softcapping": cfg.final_logit_softcap,
            "attn_logit_softcapping": None,
            "use_bidirectional_attention": False,
            "sliding_window": cfg.sliding_window or None,
            "layer_types": [
                "sliding_attention" if sliding else "full_attention"
                for sliding in cfg.sliding_layers
            ],
            "rope_parameters": {"full_attention": rope_parameters(cfg), "sliding_attention": local},
        }


# Llama's block with Gemma's choices; query_pre_attn_scalar, final_logit_softcap and
# rope_local_theta are read from each config.json.
GEMMA3_BLOCK = {
    **{
        field: value
        for field, value in LLAMA_BLOCK.items()
        if field not in ("query_pre_attn_scalar", "final_logit_softcap", "rope_local_theta")
    },
    "norm": "rms_one_plus",
    "sandwich_norms": True,
    "mlp_activation": "gelu_tanh",
    "qk_norm": True,
    "embed_scale": True,
}
GEMMA3 = register(Gemma3Family("gemma3", ("Gemma3ForCausalLM",), "gemma3_text", GEMMA3_BLOCK))
REFUSED_ARCHITECTURES["Gemma3ForConditionalGeneration"] = (
    "that is Gemma 3 with its vision tower; import the text model (Gemma3ForCausalLM, "
    "model_type gemma3_text: the 1B checkpoint, or a larger one's language model saved alone)"
)
