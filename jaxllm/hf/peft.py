"""A LoRA run's adapters as a PEFT adapter folder (`jaxllm export-hf RUN --adapter`).

PEFT's LoRA layer computes y = x W_hf^T + s x lora_A^T lora_B^T with `lora_A.weight`
(r, in), `lora_B.weight` (out, r) and s = lora_alpha / r (`use_rslora`: / sqrt(r)); ours
(`jaxllm.lora`) y = x W + s x A B with A (I..., r), B (r, O...) per layer. The family's
`TensorMap` of a linear weight writes our W (I..., O...) as HF's (out, in) by a reshape to
(in, out) and a transpose, so to_hf(A B) = to_hf(B) to_hf(A):

    lora_A.weight = A written by the weight's map (A's leading axes are the weight's in),
    lora_B.weight = B written by the same map with one input axis (r).

The same alpha, rank and rslora give PEFT the same s. Tensor names are the ones
`PeftModel.save_pretrained` writes: `base_model.model.` + the weight's module +
`.lora_A.weight`. Embeddings trained beside the adapters (`lora.train_embeddings`) go in
whole, as PEFT's `modules_to_save` (tied ones with `ensure_weight_tying`).

Refused, one line each: a run without adapters; a reward run (its score head is no part of
a causal-LM adapter); adapters on MoE experts (transformers 5 stores a layer's experts as
one `gate_up_proj` (E, 2F, D) and one `down_proj` parameter, which PEFT adapts only through
`target_parameters`, one rank-r adapter over gate and up together: not our two). Attention
adapters of an MoE model export.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import REWARD_HEAD, Config, LoraConfig
from jaxllm.hf.convert import HFConversionError
from jaxllm.lora import ADAPTED_WEIGHTS, ADAPTER_SUFFIX, EMBEDDINGS
from jaxllm.model import Params
from jaxllm.models.base import TensorMap

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
TIED_HEAD = "lm_head.weight"  # transformers' output head, tied to the embedding or not
EXPERT_TARGETS = ("gate", "up", "down")  # with experts, these adapt every expert
# Our weight's name -> the target whose adapter sits beside it.
TARGET_OF_WEIGHT = {
    name: target
    for target, names in ADAPTED_WEIGHTS.items()
    for name in ((names,) if isinstance(names, str) else names)
}


def check_adapter_export(run_dir: Path, cfg: Config) -> None:
    """Raise `HFConversionError` (one line) unless the run `cfg` of `run_dir` exports as a
    PEFT causal-LM adapter."""
    lora = cfg.lora
    if not lora.rank:
        raise HFConversionError(
            f"--adapter: {run_dir} has no adapters (its lora.rank is 0); export it without "
            "--adapter"
        )
    if REWARD_HEAD in cfg.model.scalar_heads:
        raise HFConversionError(
            f"--adapter: {run_dir} is a reward model, whose score head a causal-LM adapter "
            "cannot carry; export it without --adapter (merged, a sequence classifier)"
        )
    experts = [t for t in lora.targets if t in EXPERT_TARGETS] if cfg.model.num_experts else []
    if experts:
        raise HFConversionError(
            f"--adapter: {run_dir} has adapters on the MoE experts ({','.join(experts)}), "
            "which PEFT cannot load onto transformers' fused experts as plain LoRA layers; "
            "export it without --adapter (merged weights)"
        )


def _adapter_beside(params: Params, weight_map: TensorMap) -> Params | None:
    """The adapter ({"a", "b"}) of the weight `weight_map` names, or None."""
    module = params
    for key in weight_map.path[:-1]:
        module = module.get(key, {})
    target = TARGET_OF_WEIGHT.get(weight_map.path[-1])
    return module.get(f"{target}{ADAPTER_SUFFIX}") if target else None


def module_name(weight_map: TensorMap) -> str:
    """The HF module a weight belongs to: `q_proj` of `model.layers.{i}.self_attn.q_proj.weight`."""
    return weight_map.hf_name.removesuffix(".weight").rsplit(".", 1)[-1]


def adapter_tensors(
    params: Params, maps: list[TensorMap], dtype: str
) -> Iterator[tuple[str, np.ndarray]]:
    """(PEFT name, tensor in `dtype`) of both factors of every adapter in `params`, per
    layer: `lora_A.weight` (r, in) and `lora_B.weight` (out, r)."""
    np_dtype = jnp.dtype(dtype)  # bfloat16 too
    for weight_map in maps:
        adapter = _adapter_beside(params, weight_map)
        if adapter is None:
            continue
        a_lir = np.asarray(jax.device_get(adapter["a"]), np.float32)  # (L, I..., r)
        b_lro = np.asarray(jax.device_get(adapter["b"]), np.float32)  # (L, r, O...)
        b_map = dataclasses.replace(weight_map, in_axes=1)
        for layer, name in enumerate(weight_map.hf_names(a_lir.shape)):
            module = PEFT_PREFIX + name.removesuffix(".weight")
            yield f"{module}.lora_A.weight", weight_map.to_hf(a_lir[layer]).astype(np_dtype)
            yield f"{module}.lora_B.weight", b_map.to_hf(b_lro[layer]).astype(np_dtype)


def target_modules(params: Params, maps: list[TensorMap]) -> list[str]:
    """The HF module names the adapters in `params` adapt (`q_proj`, ...), sorted."""
    return sorted({module_name(m) for m in maps if _adapter_beside(params, m) is not None})


def embedding_maps(maps: list[TensorMap]) -> list[TensorMap]:
    """The maps of the embedding table and an untied output head."""
    return [m for m in maps if m.path[0] in EMBEDDINGS]


def saved_module_tensors(
    embeddings: Iterator[tuple[str, np.ndarray]], tied: bool
) -> dict[str, np.ndarray]:
    """The `modules_to_save` tensors under PEFT's names for the HF embedding tensors
    `embeddings` (name, tensor); with `tied` embeddings the output head too, the same
    tensor, as PEFT's `ensure_weight_tying` saves and loads it."""
    tensors = {}
    for name, tensor in embeddings:
        tensors[PEFT_PREFIX + name] = tensor
        if tied:
            tensors[PEFT_PREFIX + TIED_HEAD] = tensor
    return tensors


def adapter_config(
    lora: LoraConfig,
    modules: list[str],
    saved_modules: list[str],
    tied_embeddings: bool,
    base_model: str | None,
) -> dict[str, Any]:
    """The `adapter_config.json` of a LoRA run's adapters on HF modules `modules`, with the
    whole modules `saved_modules` (trained embeddings), for the model at `base_model`."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "use_rslora": lora.rslora,
        "lora_dropout": lora.dropout,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": saved_modules or None,
        "ensure_weight_tying": bool(saved_modules) and tied_embeddings,
    }
