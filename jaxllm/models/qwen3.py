"""Qwen3: Llama's block with RMSNorm over head_dim on q and k (before rope), `head_dim`
independent of the width, and no biases.

Refused: `attention_bias`, `use_sliding_window` with a window shorter than the context,
and what Llama refuses.
"""

from __future__ import annotations

from jaxllm.models.base import LLAMA_BLOCK, register
from jaxllm.models.qwen2 import QwenFamily

QWEN3 = register(
    QwenFamily(
        "qwen3",
        ("Qwen3ForCausalLM",),
        "qwen3",
        {**LLAMA_BLOCK, "qk_norm": True, "sliding_window": 0, "layer_types": []},
    )
)
