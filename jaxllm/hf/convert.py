"""The mapping between Hugging Face Llama-family configs and tensors and ours.

Architectures: `LlamaForCausalLM`, `MistralForCausalLM` and `Qwen2ForCausalLM` (the same
block; Qwen2 adds biases to the query, key and value projections). A config field we do not
model (another activation or rope scaling, an output-projection or MLP bias, Qwen2's
sliding window) raises `HFConversionError` naming the field; a Mistral sliding window
shorter than the context becomes `model.max_seq_len` (exact up to there).

Tensors: HF's linear layers store (out, in) matrices, ours (in, out) with the heads split
out, e.g. `q_proj.weight` (N*H, D) <-> `wq_dnh` (D, N, H). Rotary embeddings need no
permutation: HF's `rotate_half` rotates the pairs (x[i], x[i + H/2]), exactly what
`attention.apply_rotary` does, so q and k rows keep their order (the interleaved pairing
of Meta's original checkpoints would need one; tests/test_hf.py shows that mapping fails
parity).

Shape letters: L layers, D embed, N heads, K kv heads, H head dim, F mlp hidden, V vocab.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.config import REWARD_HEAD, Config, ModelConfig, validate
from jaxllm.errors import DataError, UserError

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


class HFConversionError(UserError, ValueError):
    """A Hugging Face checkpoint or config this library cannot represent exactly."""


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One of our params and the HF tensor(s) it comes from.

    `path`: keys into our params; `hf_name`: the HF tensor name, with `{i}` for the layer
    of a stacked param (one HF tensor per layer); `transpose`: HF stores it (out, in);
    `in_axes`: how many of our leading axes (after `layers`) form HF's `in` dimension."""

    path: tuple[str, ...]
    hf_name: str
    transpose: bool = False
    in_axes: int = 1

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_name

    def to_ours(self, hf_tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """HF's tensor in our layout of `shape` (one layer's shape for a stacked param)."""
        tensor = hf_tensor.T if self.transpose else hf_tensor
        return np.ascontiguousarray(tensor).reshape(shape)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        """Our tensor (one layer of a stacked param) in HF's layout."""
        if not self.transpose:  # biases are flat in HF: (N*H,) <-> (N, H)
            return ours.reshape(-1) if self.hf_name.endswith(".bias") else ours
        rows = int(np.prod(ours.shape[: self.in_axes]))
        return np.ascontiguousarray(ours.reshape(rows, -1).T)


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


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Every param of a model of `cfg` (scalar heads aside) and its HF source."""
    layer = "model.layers.{i}."
    maps = [
        TensorMap(("token_embedding_vd",), "model.embed_tokens.weight"),
        TensorMap(("final_norm", "scale_d"), "model.norm.weight"),
        TensorMap(("blocks", "attention_norm", "scale_d"), layer + "input_layernorm.weight"),
        TensorMap(("blocks", "mlp_norm", "scale_d"), layer + "post_attention_layernorm.weight"),
        TensorMap(("blocks", "attention", "wq_dnh"), layer + "self_attn.q_proj.weight", True),
        TensorMap(("blocks", "attention", "wk_dkh"), layer + "self_attn.k_proj.weight", True),
        TensorMap(("blocks", "attention", "wv_dkh"), layer + "self_attn.v_proj.weight", True),
        TensorMap(("blocks", "attention", "wo_nhd"), layer + "self_attn.o_proj.weight", True, 2),
        TensorMap(("blocks", "mlp", "w_gate_df"), layer + "mlp.gate_proj.weight", True),
        TensorMap(("blocks", "mlp", "w_up_df"), layer + "mlp.up_proj.weight", True),
        TensorMap(("blocks", "mlp", "w_down_fd"), layer + "mlp.down_proj.weight", True),
    ]
    if cfg.qkv_bias:
        maps += [
            TensorMap(("blocks", "attention", "bq_nh"), layer + "self_attn.q_proj.bias"),
            TensorMap(("blocks", "attention", "bk_kh"), layer + "self_attn.k_proj.bias"),
            TensorMap(("blocks", "attention", "bv_kh"), layer + "self_attn.v_proj.bias"),
        ]
    if not cfg.tie_embeddings:
        maps.append(TensorMap(("lm_head_dv",), "lm_head.weight", True))
    return maps


def hf_names(tensor_map: TensorMap, num_layers: int) -> Iterator[str]:
    """The HF tensor names one of our params is made of (one per layer when stacked)."""
    if tensor_map.per_layer:
        for index in range(num_layers):
            yield tensor_map.hf_name.format(i=index)
    else:
        yield tensor_map.hf_name


def _rope_settings(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope scaling dict or None) from a config of transformers 4
    (`rope_theta`, `rope_scaling`) or 5 (`rope_parameters`)."""
    parameters = hf.get("rope_parameters")
    if isinstance(parameters, dict) and any(isinstance(v, dict) for v in parameters.values()):
        raise HFConversionError(
            "config.json rope_parameters per layer type is not supported: one rope for all "
            "layers is modelled"
        )
    if isinstance(parameters, dict):
        theta = parameters.get("rope_theta", hf.get("rope_theta", 10_000.0))
        scaling = dict(parameters)
    else:
        theta = hf.get("rope_theta", 10_000.0)
        scaling = dict(hf.get("rope_scaling") or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return float(theta), None if kind == "default" else {**scaling, "rope_type": kind}


def model_config_from_hf(hf: dict[str, Any]) -> tuple[ModelConfig, str, list[str]]:
    """Our `ModelConfig`, the HF architecture name, and notes (one line each) for a
    `config.json`. Raises `HFConversionError` for anything we would not reproduce exactly."""
    architectures = hf.get("architectures") or []
    architecture = architectures[0] if architectures else None
    if architecture not in ARCHITECTURES:
        raise HFConversionError(
            f"config.json architectures={architectures} is not supported; import one of "
            f"{', '.join(ARCHITECTURES)}"
        )
    kind = ARCHITECTURES[architecture]

    def refuse(field: str, value: Any, why: str) -> None:
        raise HFConversionError(f"config.json {field}={value!r} is not supported: {why}")

    activation = hf.get("hidden_act", "silu")
    if activation != "silu":
        refuse("hidden_act", activation, "the MLP here is SwiGLU (silu)")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            refuse(field, True, "biases are modelled only on q/k/v projections (Qwen2)")

    def required(field: str, default: Any = None) -> int:
        value = hf.get(field, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise HFConversionError(
                f"config.json {field}={value!r}: a positive number is needed; is this a "
                "save_pretrained config?"
            )
        return value

    theta, scaling = _rope_settings(hf)
    rope: dict[str, Any] = {}
    if scaling is not None:
        if scaling["rope_type"] != "llama3":
            refuse("rope_scaling.rope_type", scaling["rope_type"], "only llama3 is modelled")
        try:
            rope = dict(
                rope_scaling="llama3",
                rope_scaling_factor=float(scaling["factor"]),
                rope_low_freq_factor=float(scaling["low_freq_factor"]),
                rope_high_freq_factor=float(scaling["high_freq_factor"]),
                rope_original_max_len=int(
                    scaling.get("original_max_position_embeddings")
                    or required("max_position_embeddings")
                ),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise HFConversionError(
                f"config.json llama3 rope scaling lacks a number for {error}; it needs factor, "
                "low_freq_factor, high_freq_factor and original_max_position_embeddings"
            ) from None
    max_len = int(required("max_position_embeddings"))
    notes = []
    if kind == "mistral":  # transformers applies Mistral's window whatever use_sliding_window says
        window = hf.get("sliding_window", 4096)
    else:
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    if window is not None and int(window) < max_len:
        if kind == "qwen2":
            refuse("use_sliding_window", True, "sliding-window attention is not modelled")
        # Within its window a sliding-window model attends to everything: exact up to there.
        notes.append(
            f"model.max_seq_len={window} (the sliding window; max_position_embeddings was "
            f"{max_len}): attention here is exact up to the window"
        )
        max_len = int(window)
    heads = int(required("num_attention_heads"))
    embed_dim = int(required("hidden_size"))
    cfg = ModelConfig(
        vocab_size=int(required("vocab_size")),
        num_layers=int(required("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(required("num_key_value_heads", heads)),
        embed_dim=embed_dim,
        head_dim=int(hf.get("head_dim") or embed_dim // heads),
        mlp_dim=int(required("intermediate_size")),
        max_seq_len=max_len,
        rope_theta=theta,
        norm_eps=float(required("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=kind == "qwen2",
        **rope,
    )
    mistakes = validate(Config(model=cfg))
    if mistakes:
        raise HFConversionError(
            f"config.json gives a model this library cannot build: {mistakes[0]}"
        )
    return cfg, architecture, notes


def hf_config_from_model(
    cfg: ModelConfig, vocab_size: int, special_ids: dict, reward: bool = False
) -> dict:
    """A `config.json` for our model (Qwen2 when it has q/k/v biases, else Llama), with
    `vocab_size` rows; `special_ids` gives bos/eos/pad ids (None where absent). `reward`:
    as `...ForSequenceClassification` with one label (a reward model's score head)."""
    architecture = "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"
    model_type = ARCHITECTURES[architecture]
    if reward:
        architecture = architecture.replace("ForCausalLM", "ForSequenceClassification")
    hf: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": cfg.embed_dim,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "dtype": "float32",  # transformers 5; 4 reads torch_dtype
        "torch_dtype": "float32",
        **special_ids,
    }
    if reward:
        hf["num_labels"] = 1
        hf["id2label"], hf["label2id"] = {"0": REWARD_HEAD}, {REWARD_HEAD: 0}
    if cfg.qkv_bias:
        hf["use_sliding_window"] = False
    else:
        hf["attention_bias"] = False
        hf["mlp_bias"] = False
    if cfg.rope_scaling == "llama3":
        hf["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": cfg.rope_scaling_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_len,
        }
    return hf
