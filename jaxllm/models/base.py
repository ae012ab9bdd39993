"""The family interface: what a model family (Llama, Qwen3, Gemma 3, ...) owns.

A `Family` translates a Hugging Face `config.json` into a `ModelConfig` and back, and names
the HF tensor of each of our params (`TensorMap`). Its block choices (norm kind, MLP, q/k
norm, biases, embedding scale, ...) are fields of `ModelConfig` that the one forward pass
in `jaxllm.model` reads, so a family module is a config translation and a tensor map, and
registers itself with `register`.

Shared here, not copied per family: the rope settings of a transformers 4
(`rope_theta`, `rope_scaling`) or 5 (`rope_parameters`, per layer type for Gemma 3) config,
the required positive fields, the refusal of a field we do not model, and the tensor names
that the Llama-style families share.

Tensors: HF's linear layers store (out, in) matrices, ours (in, out) with the heads split
out, e.g. `q_proj.weight` (N*H, D) <-> `wq_dnh` (D, N, H). Rotary embeddings need no
permutation: HF's `rotate_half` rotates the pairs (x[i], x[i + H/2]), exactly what
`attention.apply_rotary` does (the interleaved pairing of Meta's original checkpoints would
need one; tests/test_hf.py shows that mapping fails parity).

Shape letters: L layers, E experts, D embed, N heads, K kv heads, H head dim, F mlp hidden.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, NoReturn

import numpy as np

from jaxllm.config import Config, ModelConfig, validate
from jaxllm.hf.convert import HFConversionError

# config.json keys that carry the rope; export replaces them all with the family's own.
ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "rope_local_base_freq")
# The block of Llama, which the other dense families change in a few fields.
LLAMA_BLOCK: dict[str, Any] = dict(
    norm="rms",
    sandwich_norms=False,
    mlp_activation="silu",
    qk_norm=False,
    qkv_bias=False,
    embed_scale=False,
    query_pre_attn_scalar=None,
    final_logit_softcap=None,
    rope_local_theta=None,
    num_experts=0,
)


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One of our params and the HF tensor(s) it comes from.

    `path`: keys into our params; `hf_name`: the HF tensor name, with `{i}` for the layer
    of a param stacked (L, ...) and `{e}` for the expert of one stacked (L, E, ...): one HF
    tensor per layer (and expert); `transpose`: HF stores it (out, in); `in_axes`: how many
    of our leading axes (after the stacked ones) form HF's `in` dimension."""

    path: tuple[str, ...]
    hf_name: str
    transpose: bool = False
    in_axes: int = 1

    @property
    def stacked_axes(self) -> int:
        """How many leading axes of our param index HF tensors (0, 1: layers, 2: experts)."""
        return ("{i}" in self.hf_name) + ("{e}" in self.hf_name)

    def hf_names(self, shape: tuple[int, ...]) -> Iterator[str]:
        """The HF tensor names our param of `shape` is made of, in the order of its stacked
        axes (layer-major)."""
        if self.stacked_axes == 0:
            yield self.hf_name
        elif self.stacked_axes == 1:
            for layer in range(shape[0]):
                yield self.hf_name.format(i=layer)
        else:
            for layer in range(shape[0]):
                for expert in range(shape[1]):
                    yield self.hf_name.format(i=layer, e=expert)

    def to_ours(self, hf_tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """HF's tensor in our layout of `shape` (one layer's/expert's shape when stacked)."""
        tensor = hf_tensor.T if self.transpose else hf_tensor
        return np.ascontiguousarray(tensor).reshape(shape)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        """Our tensor (one layer/expert of a stacked param) in HF's layout."""
        if not self.transpose:  # biases are flat in HF: (N*H,) <-> (N, H)
            return ours.reshape(-1) if self.hf_name.endswith(".bias") else ours
        rows = int(np.prod(ours.shape[: self.in_axes]))
        return np.ascontiguousarray(ours.reshape(rows, -1).T)


def refuse(field: str, value: Any, why: str) -> NoReturn:
    """The one error line for a config.json field this library does not model."""
    raise HFConversionError(f"config.json {field}={value!r} is not supported: {why}")


def positive(hf: dict[str, Any], field: str, default: Any = None) -> int | float:
    """`hf[field]` (or `default`), refused unless a positive number."""
    value = hf.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise HFConversionError(
            f"config.json {field}={value!r}: a positive number is needed; is this a "
            "save_pretrained config?"
        )
    return value


def refuse_unless(hf: dict[str, Any], field: str, allowed: tuple, why: str) -> Any:
    """`hf[field]` (absent reads as `allowed[0]`), refused unless one of `allowed`."""
    value = hf.get(field, allowed[0])
    if value not in allowed:
        refuse(field, value, why)
    return value


def rope_settings(
    hf: dict[str, Any], layer_type: str | None = None, default_theta: float = 10_000.0
) -> dict[str, Any]:
    """`ModelConfig` rope fields (rope_theta, rope_scaling, ...) of a config.json's rope:
    transformers 4's `rope_theta` + `rope_scaling`, or 5's `rope_parameters` (for
    `layer_type`'s entry where it holds one dict per layer type, as Gemma 3's does)."""
    parameters = hf.get("rope_parameters")
    per_type = isinstance(parameters, dict) and any(
        isinstance(v, dict) for v in parameters.values()
    )
    if per_type and layer_type is None:
        refuse("rope_parameters", "per layer type", "this family has one rope for all layers")
    if per_type:
        parameters = parameters.get(layer_type) or {}
    if isinstance(parameters, dict):
        theta = parameters.get("rope_theta", hf.get("rope_theta", default_theta))
        scaling = dict(parameters)
    else:
        theta = hf.get("rope_theta", default_theta)
        scaling = dict(hf.get("rope_scaling") or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    rope: dict[str, Any] = {"rope_theta": float(theta)}
    try:
        if kind == "llama3":
            rope.update(
                rope_scaling="llama3",
                rope_scaling_factor=float(scaling["factor"]),
                rope_low_freq_factor=float(scaling["low_freq_factor"]),
                rope_high_freq_factor=float(scaling["high_freq_factor"]),
                rope_original_max_len=int(
                    scaling.get("original_max_position_embeddings")
                    or positive(hf, "max_position_embeddings")
                ),
            )
        elif kind == "linear":
            rope.update(rope_scaling="linear", rope_scaling_factor=float(scaling["factor"]))
        elif kind != "default":
            refuse("rope_scaling.rope_type", kind, "default, linear and llama3 are modelled")
    except (KeyError, TypeError, ValueError) as error:
        raise HFConversionError(
            f"config.json {kind} rope scaling lacks a number for {error}; see the "
            "model's own config.json"
        ) from None
    return rope


def rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    """transformers 5's `rope_parameters` of one rope: `cfg`'s base and scaling."""
    parameters: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling == "linear":
        parameters.update(rope_type="linear", factor=cfg.rope_scaling_factor)
    elif cfg.rope_scaling == "llama3":
        parameters.update(
            rope_type="llama3",
            factor=cfg.rope_scaling_factor,
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_len,
        )
    return parameters


def shape_fields(hf: dict[str, Any], tie_default: bool = False) -> dict[str, Any]:
    """The `ModelConfig` fields every family reads the same way (sizes, eps, tying;
    `tie_default` where config.json does not say)."""
    heads = int(positive(hf, "num_attention_heads"))
    embed_dim = int(positive(hf, "hidden_size"))
    return dict(
        vocab_size=int(positive(hf, "vocab_size")),
        num_layers=int(positive(hf, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(positive(hf, "num_key_value_heads", heads)),
        embed_dim=embed_dim,
        head_dim=int(hf.get("head_dim") or embed_dim // heads),
        mlp_dim=int(positive(hf, "intermediate_size")),
        max_seq_len=int(positive(hf, "max_position_embeddings")),
        norm_eps=float(positive(hf, "rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", tie_default)),
    )


def shape_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json fields of `shape_fields` (vocab_size aside: export sets it)."""
    return {
        "hidden_size": cfg.embed_dim,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
    }


def decoder_tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """The HF names of a Llama-style decoder's params (Llama, Mistral, Qwen2, Qwen3 and
    Gemma 3 share them), with the optional ones `cfg` has: q/k/v biases, q/k norms, the
    sandwich norms (then `post_attention_layernorm` is the attention output's norm and
    `pre_feedforward_layernorm` the MLP input's) and an untied output head."""
    layer = "model.layers.{i}."
    mlp_input_norm = "post_attention_layernorm"
    if cfg.sandwich_norms:
        mlp_input_norm = "pre_feedforward_layernorm"
    maps = [
        TensorMap(("token_embedding_vd",), "model.embed_tokens.weight"),
        TensorMap(("final_norm", "scale_d"), "model.norm.weight"),
        TensorMap(("blocks", "attention_norm", "scale_d"), layer + "input_layernorm.weight"),
        TensorMap(("blocks", "mlp_norm", "scale_d"), layer + mlp_input_norm + ".weight"),
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
    if cfg.qk_norm:
        maps += [
            TensorMap(
                ("blocks", "attention", f"{x}_norm", "scale_d"), f"{layer}self_attn.{x}_norm.weight"
            )
            for x in ("q", "k")
        ]
    if cfg.sandwich_norms:
        maps += [
            TensorMap(
                ("blocks", "attention_out_norm", "scale_d"),
                layer + "post_attention_layernorm.weight",
            ),
            TensorMap(
                ("blocks", "mlp_out_norm", "scale_d"), layer + "post_feedforward_layernorm.weight"
            ),
        ]
    if not cfg.tie_embeddings:
        maps.append(TensorMap(("lm_head_dv",), "lm_head.weight", True))
    return maps


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: the HF architectures it imports and its block choices.

    `block`: the `ModelConfig` fields every model of the family has (e.g. Qwen3's
    `qk_norm=True`); import sets them, export refuses a config that differs (say a run
    with q/k norms exported as Llama). A family module subclasses this for its
    `config_from_hf` (the fields it reads beyond `shape_fields`) and `config_to_hf`."""

    name: str
    architectures: tuple[str, ...]
    model_type: str
    block: dict[str, Any] = dataclasses.field(default_factory=dict)

    def config_from_hf(self, hf: dict[str, Any]) -> tuple[ModelConfig, list[str]]:
        """Our `ModelConfig` and notes (one line each) for `hf` (a config.json); raises
        `HFConversionError` naming a field we would not reproduce exactly."""
        raise NotImplementedError

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """This family's config.json fields for `cfg` (architectures, model_type, shapes,
        rope, block choices; no vocab_size, dtype or *_token_id)."""
        raise NotImplementedError

    def tensor_maps(self, cfg: ModelConfig) -> list[TensorMap]:
        """Every param of a model of `cfg` (scalar heads aside) and its HF tensor name."""
        return decoder_tensor_maps(cfg)

    def build(self, fields: dict[str, Any]) -> ModelConfig:
        """A checked `ModelConfig` of this family from `fields` (its block choices added)."""
        cfg = ModelConfig(**fields, **self.block, family=self.name)
        mistakes = validate(Config(model=cfg))
        if mistakes:
            raise HFConversionError(
                f"config.json gives a model this library cannot build: {mistakes[0]}"
            )
        return cfg

    def common_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """The fields every family writes: architecture, model_type and the shapes; first
        refusing a `cfg` whose block choices are not this family's."""
        for field, value in self.block.items():
            if getattr(cfg, field) != value:
                raise HFConversionError(
                    f"model.{field}={getattr(cfg, field)!r} cannot be exported as "
                    f"{self.name} (which has {field}={value!r}); set model.family to a "
                    "family with that block"
                )
        return {
            "architectures": [self.architectures[0]],
            "model_type": self.model_type,
            **shape_to_hf(cfg),
        }


FAMILIES: dict[str, Family] = {}
# Architectures a family module refuses, with the line that says what to import instead.
REFUSED_ARCHITECTURES: dict[str, str] = {}


def register(family: Family) -> Family:
    """Add `family` to `FAMILIES` (by its name); a family module calls this once."""
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is registered twice")
    FAMILIES[family.name] = family
    return family
