"""Typed configs: dataclasses, YAML files, dotted `key=value` overrides and named presets.

A run's config is built in three layers, later ones winning:

1. the dataclass defaults below, with `model` replaced by a named preset when the YAML
   file (or an override) says `preset: NAME`;
2. the YAML file;
3. `dotted.key=value` overrides from the command line.

OmegaConf does the merging and the type checks; `load_config` turns its errors and our own
checks into a `ConfigError` whose message has one line per mistake, each naming the key
and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from jaxllm.answers import ANSWER_FORMATS
from jaxllm.chat_templates import CHAT_TEMPLATES, JINJA_SUFFIX, MODEL_TEMPLATE
from jaxllm.data import builtin_chat
from jaxllm.errors import ConfigError
from jaxllm.stages.registry import STAGES

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("xla", "cudnn")
ROPE_SCALINGS = ("none", "llama3", "linear")
NORMS = ("rms", "rms_one_plus")  # x_hat * w (Llama), x_hat * (1 + w) in float32 (Gemma)
MLP_ACTIVATIONS = ("silu", "gelu_tanh")  # SwiGLU, GeGLU with tanh-approximated gelu
LAYER_TYPES = ("full_attention", "sliding_attention")  # as HF's config.json names them
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "simpo", "orpo")  # `rl.preference_losses.dpo_loss`
REFERENCE_FREE_LOSSES = ("simpo", "orpo")  # scored without a reference policy
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "attention_out")
# Scalar heads the stages read: a reward model's score, PPO's value (zero at the start).
REWARD_HEAD, VALUE_HEAD = "reward", "value"


class Problems(list):
    """One line per mistake, collected so that a config reports all of them at once."""

    def check(self, ok: bool, line: str) -> None:
        if not ok:
            self.append(line)

    def one_of(self, key: str, value: str, choices: Sequence[str], how: str = "") -> None:
        """`value` of setting `key` must be one of `choices` (`how` says them otherwise)."""
        listed = how or (", ".join(choices[:-1]) + f" or {choices[-1]}" if choices else "")
        self.check(value in choices, f"{key}='{value}' is unknown; use {listed}")

    def dual_clip(self, key: str, value: float | None) -> None:
        self.check(
            value is None or value > 1,
            f"{key}={value} must be > 1 (Ye 2020 and verl use 3), or null for none",
        )


@dataclass
class ModelConfig:
    """A decoder-only transformer: RMSNorm, rotary positions, grouped-query attention and a
    gated MLP, with the block choices of the families in `jaxllm.models` (Llama, Mistral,
    Qwen2, Qwen3, Gemma 3). The defaults are Llama's."""

    vocab_size: int = 320
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    embed_dim: int = 64
    head_dim: int | None = None  # None: embed_dim // num_heads
    mlp_dim: int = 192
    max_seq_len: int = 64
    rope_theta: float = 10_000.0
    # "llama3": Llama 3.1+'s long-context rotary frequencies (low frequencies divided by
    # the factor, a smooth ramp between the two wavelengths the factors set).
    # "linear": every frequency divided by the factor (Gemma 3 4B+ global layers).
    rope_scaling: str = "none"
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192  # the context the unscaled frequencies were trained on
    family: str = "llama"  # the jaxllm.models family export-hf writes (config.json, tensors)
    norm: str = "rms"  # or "rms_one_plus": Gemma's x_hat * (1 + w) in float32, w starts at 0
    sandwich_norms: bool = False  # Gemma 3: also a norm on the attention and MLP outputs
    mlp_activation: str = "silu"  # or "gelu_tanh" (GeGLU)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before rope (Qwen3, Gemma 3)
    qkv_bias: bool = False  # biases on the query/key/value projections (Qwen2)
    embed_scale: bool = False  # embeddings x sqrt(embed_dim) in the compute dtype (Gemma)
    query_pre_attn_scalar: float | None = None  # attention scale q^-0.5; None: head_dim^-0.5
    final_logit_softcap: float | None = None  # logits -> tanh(logits / c) * c
    # A sliding layer's query at position p sees keys at p - sliding_window < position <= p.
    sliding_window: int = 0
    layer_types: list[str] = field(default_factory=list)  # per layer; empty: all full
    rope_local_theta: float | None = None  # sliding layers' rope base (unscaled); None: global
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    scalar_heads: list[str] = field(default_factory=list)  # e.g. ["value"] or ["reward"]
    dtype: str = "float32"  # compute dtype; params are always float32
    attention: str = "xla"
    remat: str = "none"
    scan_layers: bool = True  # False unrolls the layers (compile time grows with depth)
    # Mixture of experts (Qwen3-MoE): every layer's MLP is `num_experts` SwiGLU experts of
    # width `expert_mlp_dim`, each token sent to its top `experts_per_token` (jaxllm.moe).
    num_experts: int = 0  # 0: a dense MLP of width mlp_dim
    experts_per_token: int = 0
    expert_mlp_dim: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities to sum to 1
    router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss in the train loss

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.embed_dim // self.num_heads

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: whether it attends within `sliding_window` only."""
        if not self.layer_types:
            return (False,) * self.num_layers
        return tuple(kind == "sliding_attention" for kind in self.layer_types)

    def problems(self) -> list[str]:
        """One line per value of this section that cannot work."""
        found = Problems()
        for key in (
            "vocab_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "embed_dim",
            "mlp_dim",
            "max_seq_len",
        ):
            value = getattr(self, key)
            found.check(value > 0, f"model.{key} must be positive, got {value}")
        if self.num_heads > 0 and self.head_dim is None:
            found.check(
                self.embed_dim % self.num_heads == 0,
                f"model.num_heads={self.num_heads} does not divide model.embed_dim="
                f"{self.embed_dim}; pick a head count that divides the width or set "
                "model.head_dim",
            )
        if self.num_kv_heads > 0:
            found.check(
                self.num_heads % self.num_kv_heads == 0,
                f"model.num_kv_heads={self.num_kv_heads} does not divide model.num_heads="
                f"{self.num_heads}; grouped-query attention needs heads = kv_heads x group size",
            )
        found.check(
            self.resolved_head_dim % 2 == 0 if self.num_heads > 0 else True,
            f"head dim {self.resolved_head_dim} must be even for rotary embeddings",
        )
        found.one_of("model.dtype", self.dtype, DTYPES)
        found.one_of("model.rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        if self.rope_scaling == "llama3":
            found.check(
                self.rope_scaling_factor >= 1
                and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor
                and self.rope_original_max_len > 0,
                "llama3 rope scaling needs model.rope_scaling_factor >= 1, 0 < "
                "model.rope_low_freq_factor < model.rope_high_freq_factor and a positive "
                "model.rope_original_max_len",
            )
        elif self.rope_scaling == "linear":
            found.check(
                self.rope_scaling_factor > 0,
                f"linear rope scaling needs model.rope_scaling_factor > 0, got "
                f"{self.rope_scaling_factor}",
            )
        found.one_of("model.norm", self.norm, NORMS)
        found.one_of("model.mlp_activation", self.mlp_activation, MLP_ACTIVATIONS)
        for key in ("query_pre_attn_scalar", "final_logit_softcap", "rope_local_theta"):
            value = getattr(self, key)
            found.check(
                value is None or value > 0, f"model.{key}={value} must be positive, or null"
            )
        found.check(self.sliding_window >= 0, "model.sliding_window must be >= 0 (0: none)")
        found.check(
            not self.layer_types or len(self.layer_types) == self.num_layers,
            f"model.layer_types has {len(self.layer_types)} entries for model.num_layers="
            f"{self.num_layers}; give one per layer, or [] for all full_attention",
        )
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        found.check(not unknown, f"model.layer_types has {unknown}; use {' or '.join(LAYER_TYPES)}")
        found.check(
            self.sliding_window > 0 or "sliding_attention" not in self.layer_types,
            "model.layer_types has sliding_attention layers but model.sliding_window=0; "
            "set the window",
        )
        found.one_of("model.attention", self.attention, ATTENTION_BACKENDS)
        found.one_of("model.remat", self.remat, REMAT_POLICIES)
        found.check(
            len(set(self.scalar_heads)) == len(self.scalar_heads),
            f"model.scalar_heads={self.scalar_heads} names a head twice",
        )
        found.check(self.num_experts >= 0, "model.num_experts must be >= 0 (0: a dense MLP)")
        if self.num_experts > 0:
            found.check(
                1 <= self.experts_per_token <= self.num_experts,
                f"model.experts_per_token={self.experts_per_token} must be in 1.."
                f"{self.num_experts} (model.num_experts)",
            )
            found.check(
                self.expert_mlp_dim > 0,
                f"model.expert_mlp_dim must be positive with experts, got {self.expert_mlp_dim}",
            )
        found.check(
            self.router_aux_loss_coef >= 0,
            f"model.router_aux_loss_coef={self.router_aux_loss_coef} must be >= 0",
        )
        return found


@dataclass
class MeshConfig:
    """Device mesh axis sizes; -1 takes all remaining devices (at most one axis)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def problems(self) -> list[str]:
        found = Problems()
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for axis, size in sizes.items():
            found.check(
                size == -1 or size >= 1, f"mesh.{axis}={size} must be >= 1, or -1 for the rest"
            )
        found.check(
            list(sizes.values()).count(-1) <= 1,
            "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1",
        )
        return found


@dataclass
class DistributedConfig:
    """Multi-process JAX (`jax.distributed`): one process per host, all running the same
    command. Unset values come from the environment (JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID); on a multi-host TPU slice everything is detected."""

    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None
    timeout_s: int = 300  # how long to wait for every process to join
    cpu_collectives: str = "gloo"  # CPU cross-process collectives (tests, CPU clusters)

    def problems(self) -> list[str]:
        found = Problems()
        if self.num_processes is not None and self.process_id is not None:
            found.check(
                0 <= self.process_id < self.num_processes,
                f"distributed.process_id={self.process_id} must lie in [0, "
                f"distributed.num_processes={self.num_processes})",
            )
        found.check(self.timeout_s >= 1, "distributed.timeout_s must be >= 1")
        return found


@dataclass
class OptimizerConfig:
    """AdamW with linear warmup and cosine decay to `min_lr` at `decay_steps`."""

    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    decay_steps: int | None = None  # None: train.steps
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global-norm clip; 0 disables

    def problems(self) -> list[str]:
        found = Problems()
        found.check(self.lr >= 0, f"optimizer.lr must be >= 0 (0: a control run), got {self.lr}")
        found.check(
            0 <= self.min_lr <= self.lr, f"optimizer.min_lr={self.min_lr} must lie in [0, lr]"
        )
        found.check(self.warmup_steps >= 0, "optimizer.warmup_steps must be >= 0")
        found.check(
            0 <= self.b1 < 1 and 0 <= self.b2 < 1,
            "optimizer.b1 and optimizer.b2 must lie in [0, 1)",
        )
        found.check(self.weight_decay >= 0, "optimizer.weight_decay must be >= 0")
        found.check(self.grad_clip >= 0, "optimizer.grad_clip must be >= 0 (0 disables clipping)")
        found.check(
            self.decay_steps is None or self.decay_steps >= 1, "optimizer.decay_steps must be >= 1"
        )
        return found


@dataclass
class TrainConfig:
    steps: int = 1000
    seed: int = 0
    batch_size: int = 8  # global, in sequences per optimizer step
    seq_len: int = 64
    grad_accum: int = 1  # micro-batches per step; batch_size must divide by it
    eval_every: int = 250
    eval_batches: int = 20
    log_every: int = 1
    eval_at_start: bool = False  # also evaluate the initial params (before any update)
    samples: int = 2  # texts generated at each eval (0: none)
    sample_tokens: int = 64  # capped at model.max_seq_len - 1

    def problems(self) -> list[str]:
        found = Problems()
        for key in ("steps", "batch_size", "grad_accum", "seq_len"):
            value = getattr(self, key)
            found.check(value >= 1, f"train.{key} must be >= 1, got {value}")
        if self.grad_accum >= 1:
            found.check(
                self.batch_size % self.grad_accum == 0,
                f"train.batch_size={self.batch_size} does not divide into "
                f"train.grad_accum={self.grad_accum} micro-batches",
            )
        found.check(self.eval_every >= 1, "train.eval_every must be >= 1")
        found.check(self.eval_batches >= 1, "train.eval_batches must be >= 1")
        found.check(self.log_every >= 1, "train.log_every must be >= 1")
        found.check(self.samples >= 0, "train.samples must be >= 0")
        found.check(self.seed >= 0, f"train.seed must be >= 0, got {self.seed}")
        found.check(self.sample_tokens >= 1, "train.sample_tokens must be >= 1")
        return found


@dataclass
class DataConfig:
    # A .txt/.jsonl file, a folder of them, pydoc, or a Hugging Face dataset:
    # hf:NAME[:SPLIT], hf:NAME/CONFIG[:SPLIT] or hf:OWNER/NAME/CONFIG[:SPLIT] (a dataset
    # with an owner names its config, most often `default`), or hf:FOLDER[:SPLIT] for a
    # local folder of data files; SPLIT defaults to hf_split.
    path: str | None = None
    tokenizer: str = "bytes"  # a built-in name or a path to a .tiktoken file
    val_fraction: float = 0.1  # the last fraction of the data (when eval_path is unset)
    # Held-out data in data.path's format (every stage); for prompts from a Hugging Face
    # dataset its held-out split, e.g. hf:openai/gsm8k/main:test.
    eval_path: str | None = None
    text_field: str = "text"  # the field of a .jsonl line (or HF record) holding the text
    cache_dir: str | None = None  # tokenized arrays; None: <out_dir>/data
    hf_split: str = "train"
    hf_max_documents: int | None = None  # stop a streamed HF dataset after this many
    # Prompts (PPO, GRPO, label) from rows without `prompt` or `messages`: the field that
    # holds the prompt text, the field that holds the answer, and how that field states
    # it (`jaxllm.answers.extract_answer`). GSM8K: prompt_field=question
    # answer_format=gsm8k; MATH: prompt_field=problem answer_field=solution
    # answer_format=boxed.
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    answer_format: str = "plain"
    # Comparisons (reward, DPO): batches of comparisons of like length (each run of 8
    # batches of an epoch's permutation sorted by length, its batches shuffled), so a
    # batch's rows hold little padding; false: the permutation as it is.
    group_by_length: bool = True
    # data.path=builtin (SFT, PPO, GRPO): its task families (jaxllm.data.builtin_chat), in
    # turn, for training and held-out data alike; empty: all of them
    builtin_families: list[str] = field(default_factory=list)

    def builtin_family_names(self) -> tuple[str, ...]:
        """The built-in task families this data uses (`builtin_families`, else all)."""
        return tuple(self.builtin_families) or builtin_chat.FAMILIES

    def problems(self) -> list[str]:
        found = Problems()
        found.check(0 < self.val_fraction < 1, "data.val_fraction must lie in (0, 1)")
        for family in self.builtin_families:
            found.one_of("data.builtin_families", family, builtin_chat.FAMILIES)
        found.one_of("data.answer_format", self.answer_format, ANSWER_FORMATS)
        for key in ("prompt_field", "answer_field"):
            found.check(bool(getattr(self, key)), f"data.{key} is empty; name a field")
        return found


@dataclass
class SFTConfig:
    """Supervised fine-tuning on conversations (`data.path`: .jsonl chat data, `builtin` or
    `calculator`)."""

    init_from: str | None = None  # out_dir of an earlier run: its params, a fresh optimizer
    train_on: str = "all"  # assistant turns to train: all, or only the last
    truncation: str = "drop"  # conversations longer than a row: drop or truncate
    builtin_examples: int = 20_000  # conversations generated when data.path=builtin|calculator
    # of those, the fraction that open with the system prompt (builtin_chat.SYSTEM): with
    # it a conversation is about 120 byte tokens, without it about 54
    builtin_system_fraction: float = 0.3
    # data.path=calculator: the fraction of demonstrations that call the calculator (the
    # rest write the product at once, which a small model can only guess)
    tool_fraction: float = 0.2
    eval_prompts: int = 140  # held-out verifiable prompts for greedy accuracy (jaxllm.answers)
    max_new_tokens: int = 48  # reply budget when measuring accuracy

    def problems(self) -> list[str]:
        found = Problems()
        found.one_of("sft.train_on", self.train_on, ("all", "last"))
        found.one_of("sft.truncation", self.truncation, ("drop", "truncate"))
        found.check(
            self.eval_prompts >= 0 and self.builtin_examples >= 1,
            "sft.eval_prompts must be >= 0 and sft.builtin_examples >= 1",
        )
        found.check(
            0.0 <= self.builtin_system_fraction <= 1.0,
            f"sft.builtin_system_fraction={self.builtin_system_fraction} must lie in [0, 1] "
            "(0: no system prompt)",
        )
        found.check(
            0.0 <= self.tool_fraction <= 1.0,
            f"sft.tool_fraction={self.tool_fraction} must lie in [0, 1]",
        )
        return found


@dataclass
class RewardConfig:
    """A reward model from comparisons (`data.path`: preference .jsonl, see
    `jaxllm.data.preferences`): the backbone plus a scalar `reward` head."""

    init_from: str | None = None  # out_dir of an SFT or pre-training run: its params
    loss: str = "pairs"  # pairs (Bradley-Terry over every pair) or plackett_luce
    # + c * (r_a + r_b)^2, averaged over a comparison's pairs: for a pair TRL's
    # center_rewards_coefficient term, c * (r_chosen + r_rejected)^2
    center_coefficient: float = 0.0
    max_replies: int = 4  # K: replies per comparison a batch holds; longer rankings refused

    def problems(self) -> list[str]:
        found = Problems()
        found.one_of("reward.loss", self.loss, ("pairs", "plackett_luce"))
        found.check(self.max_replies >= 2, "reward.max_replies must be >= 2")
        found.check(self.center_coefficient >= 0, "reward.center_coefficient must be >= 0")
        return found


@dataclass
class DPOConfig:
    """Preference fine-tuning without a reward model (`data.path`: preference .jsonl, as
    for `reward`): the policy and its frozen reference both start from `policy_from`."""

    policy_from: str | None = None  # out_dir of an SFT run
    beta: float = 0.1  # the implicit reward is beta * (log pi - log pi_ref) of a reply
    # sigmoid (DPO), ipo, hinge (SLiC); reference-free: simpo (beta x the mean log-prob per
    # token; the paper uses beta 2-2.5) or orpo (+ the best reply's NLL; beta is its lambda)
    loss: str = "sigmoid"
    simpo_gamma: float = 0.5  # SimPO's target margin (TRL's simpo_gamma)
    label_smoothing: float = 0.0  # e: each target p becomes (1 - e) p + e (1 - p)
    # RPO (Pang et al. 2024; TRL's rpo_alpha): + this x the best-ranked reply's negative
    # log-likelihood per token, which keeps its probability from falling with the margin
    nll_coef: float = 0.0
    max_replies: int = 4  # K: replies per comparison a batch holds (rankings: all pairs)

    def problems(self) -> list[str]:
        found = Problems()
        found.one_of("dpo.loss", self.loss, DPO_LOSSES)
        found.check(self.nll_coef >= 0, f"dpo.nll_coef must be >= 0, got {self.nll_coef}")
        found.check(self.simpo_gamma >= 0, f"dpo.simpo_gamma must be >= 0, got {self.simpo_gamma}")
        found.check(
            self.loss != "orpo" or self.nll_coef == 0,
            "dpo.loss=orpo already adds the best reply's NLL (weight 1); leave dpo.nll_coef at 0 "
            f"(got {self.nll_coef})",
        )
        found.check(self.beta > 0, f"dpo.beta must be > 0, got {self.beta}")
        found.check(
            0 <= self.label_smoothing < 0.5,
            f"dpo.label_smoothing must lie in [0, 0.5), got {self.label_smoothing}",
        )
        found.check(self.max_replies >= 2, "dpo.max_replies must be >= 2")
        return found


@dataclass
class PPOConfig:
    """RLHF with PPO (`data.path`: prompts .jsonl, `builtin` or `calculator`; see
    `jaxllm.data.prompts`).
    `train.batch_size` is the rollouts per iteration; rows are `max_prompt_tokens +
    max_new_tokens` tokens (train.seq_len is set to that)."""

    policy_from: str | None = None  # out_dir of an SFT run: the policy and the reference
    # out_dir of a reward run: the frozen reward model; several, comma-separated: an ensemble
    reward_from: str | None = None
    reward_aggregation: str = "mean"  # an ensemble's score: mean, min or mean_minus_std
    max_prompt_tokens: int = 64
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_k: int = 0  # 0: off (filters make the sampler's ratios differ from the trainer's)
    top_p: float = 1.0
    epochs: int = 2  # passes over each iteration's rollouts
    minibatches: int = 2  # optimizer steps per pass
    # Rollouts the update computes end to end in one packed row, each prompt and reply its
    # own segment (the reply attending to its prompt), so no padding sits between a short
    # prompt and its reply (`rl.rollouts.group_rows`, in groups of 1), when
    # that costs fewer FLOPs than a row each: the largest divisor of a micro-batch's rows
    # up to this (whatever the mesh); 1: a row each, padded to the longest prompt and reply
    # (TRL's). On the quick start's PPO (CPU): padding 0.42 -> 0.19 at 2, the step 11%
    # shorter; 0.14 at 4, the update no shorter (0.31 s against 0.26 s at 2 on 2026-12-07,
    # with twice the compile time).
    pack_rollouts: int = 2
    clip_eps: float = 0.2
    # dual-clip PPO (Ye 2020): for A < 0 the loss -A x ratio is capped at -A x dual_clip,
    # so a token far above its old probability cannot dominate a step (verl's 3.0); > 1
    dual_clip: float | None = None
    value_clip_eps: float = 0.2
    vf_coef: float = 0.1
    value_stop_gradient: bool = False  # the value loss trains the value head alone
    # shared: a value head on the policy's backbone; separate: a critic model of its own
    # (Stiennon et al.), initialised from the (first) reward model, trained at critic_lr
    critic: str = "shared"
    critic_lr: float | None = None  # None: optimizer.lr (separate critic only)
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05  # initial (or fixed) coefficient of the per-token KL penalty
    kl_target: float | None = 0.05  # per-token mean KL the controller steers to; None: fixed
    kl_horizon: int = 10_000  # Ziegler et al.'s horizon, in rollouts
    # The controller never lowers kl_coef below this (None: no floor). Anti-windup: early
    # on the KL sits far under target and the coefficient would melt away, so the KL then
    # overshoots faster than the controller can raise it again.
    kl_coef_min: float | None = None
    normalize_reward: bool = True  # (score - mean) / std of the reward run's scores
    reward_clip: float | None = None  # clip the normalised score to +-this
    # >= 0, subtracted from the score of a reply cut off before <|im_end|> (TRL's sign)
    missing_eos_penalty: float | None = None
    whiten_advantages: bool = True
    gold_rule: str | None = None  # a simulated labeler's rule (`jaxllm.rl.labelers`)
    builtin_prompts: int = 2000  # training prompts when data.path=builtin or calculator
    eval_prompts: int = 64  # held-out prompts evaluated (builtin, or data.eval_path's first)
    hacking_window: int = 3  # evals each side of the reward-hacking comparison
    # Iterations each side of the collapse watch's comparison of the rollouts' reward-model
    # score and the policy's entropy (`rl.watch.CollapseWatch`); 0: no watch.
    collapse_window: int = 10
    # Multi-turn episodes (`jaxllm.rl.episodes`): up to max_turns assistant turns, the tool
    # calls of each answered by `tool` messages before the next; 1: one reply per prompt.
    max_turns: int = 1
    tools: list[str] = field(default_factory=list)  # registered tools a prompt without its
    # own `tools` list may call (`jaxllm.tools`: calculator, or register_tool in a script)

    def problems(self) -> list[str]:
        found = Problems()
        for key in (
            "max_prompt_tokens",
            "max_new_tokens",
            "epochs",
            "minibatches",
            "kl_horizon",
            "eval_prompts",
            "max_turns",
            "pack_rollouts",
        ):
            value = getattr(self, key)
            found.check(value >= 1, f"ppo.{key} must be >= 1, got {value}")
        found.check(self.temperature > 0, "ppo.temperature must be > 0 (PPO samples its rollouts)")
        found.check(
            self.collapse_window >= 0,
            f"ppo.collapse_window must be >= 0 (0: no watch), got {self.collapse_window}",
        )
        found.one_of("ppo.critic", self.critic, ("shared", "separate"))
        found.check(
            self.critic_lr is None or self.critic_lr >= 0, "ppo.critic_lr must be >= 0, or null"
        )
        found.check(
            self.missing_eos_penalty is None or self.missing_eos_penalty >= 0,
            f"ppo.missing_eos_penalty={self.missing_eos_penalty} must be >= 0 (it is subtracted "
            "from a cut-off reply's score, as TRL's), or null for none",
        )
        found.one_of(
            "ppo.reward_aggregation", self.reward_aggregation, ("mean", "min", "mean_minus_std")
        )
        found.check(self.clip_eps > 0 and self.value_clip_eps > 0, "ppo clip values must be > 0")
        found.dual_clip("ppo.dual_clip", self.dual_clip)
        found.check(self.kl_coef >= 0, "ppo.kl_coef must be >= 0")
        found.check(
            self.kl_target is None or self.kl_target > 0, "ppo.kl_target must be > 0, or null"
        )
        found.check(
            self.kl_coef_min is None or 0 <= self.kl_coef_min <= self.kl_coef,
            "ppo.kl_coef_min must be >= 0 and at most ppo.kl_coef (the starting coefficient), "
            "or null",
        )
        found.check(
            0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "ppo.gamma and ppo.lam must lie in [0, 1]"
        )
        return found


@dataclass
class GRPOConfig:
    """R1-style reasoning RL (`data.path`: prompts .jsonl with `answer`, `builtin` or
    `calculator`). `train.batch_size` is the prompts per iteration; each gets `group_size`
    replies."""

    policy_from: str | None = None  # out_dir of an SFT run: the policy and the reference
    reward_from: str | None = None  # a reward run, for the `reward_model` reward
    group_size: int = 8  # G replies per prompt (>= 2)
    rewards: dict[str, float] = field(default_factory=lambda: {"correct": 1.0, "format": 0.1})
    # By name from `rl.advantages.ADVANTAGE_ESTIMATORS`: grpo, (r - mean) / (std + std_eps)
    # (GRPO); dr_grpo, r - mean (Dr. GRPO); rloo, r - the mean of the group's others
    # (RLOO); reinforce_pp, r - mean whitened over the batch's tokens (REINFORCE++-baseline);
    # or a name a script registered with `register_advantage_estimator`.
    advantage_estimator: str = "grpo"
    std_eps: float = 1e-4  # added to the group's std by the grpo estimator (TRL's 1e-4)
    loss_aggregation: str = "sequence_mean"  # sequence_mean | token_mean | constant_length
    eps_low: float = 0.2
    eps_high: float = 0.2  # DAPO's clip-higher uses 0.28
    dual_clip: float | None = None  # as ppo.dual_clip, on the ratio the clip sees
    # token: each token's ratio is clipped (GRPO); sequence: one length-normalised ratio
    # per reply, clipped as a whole (GSPO, Zheng 2025, with eps_low 3e-4, eps_high 4e-4).
    # The two differ only off-policy (iterations > 1 or minibatches > 1).
    importance_sampling_level: str = "token"
    beta: float = 0.0  # weight of the KL to the reference, in the loss
    # k1 | k2 | k3 (`rl.kl.KL_ESTIMATORS`): the loss's per-token KL estimate. k2's gradient
    # is KL(policy || ref)'s; k3's (GRPO's paper) is KL(ref || policy)'s; k1's is 0 on average.
    kl_estimator: str = "k2"
    iterations: int = 1  # updates on each batch of rollouts (1, with minibatches 1: ratio 1)
    minibatches: int = 1
    dynamic_sampling: bool = False  # leave out groups whose rewards are all equal (DAPO)
    mask_truncated: bool = False  # leave out replies cut off at max_new_tokens (DAPO)
    max_prompt_tokens: int = 64
    max_new_tokens: int = 48
    length_cache: int = 8  # the `length` reward's soft band, in tokens
    temperature: float = 1.0
    builtin_prompts: int = 4000  # training prompts when data.path=builtin or calculator
    eval_prompts: int = 140  # held-out prompts for greedy accuracy and pass@k
    pass_k: int = 4  # k of pass@k (<= group_size), from group_size samples per prompt
    # Multi-turn episodes (`jaxllm.rl.episodes`): up to max_turns assistant turns, the tool
    # calls of each answered by `tool` messages before the next; 1: one reply per prompt.
    max_turns: int = 1
    tools: list[str] = field(default_factory=list)  # registered tools a prompt without its
    # own `tools` list may call (`jaxllm.tools`: calculator, or register_tool in a script)
    # How the `correct` reward reads a reply's answer (`jaxllm.answers.extract_answer`):
    # auto (the last \boxed{}, else what follows ####, else the whole reply), plain,
    # gsm8k, boxed or last_number; a prompt row's own `answer_format` field wins.
    answer_format: str = "auto"
    # Iterations each side of the collapse watch's comparison (`rl.watch.CollapseWatch`:
    # one warning line naming the likely cause when the rollouts' reward or held-out
    # accuracy falls steadily, or the entropy collapses); 0: no watch.
    collapse_window: int = 10
    # The update computes each group's prompt once, in one row with its G replies (each
    # at its own length), where that costs fewer FLOPs (the same log-probs and gradients
    # up to rounding); minibatches then hold whole groups. Off when train.batch_size
    # prompts do not split into minibatches x train.grad_accum whole groups.
    share_prompt: bool = True
    # With share_prompt, groups packed end to end in one row, so a short group fills the
    # room a long one leaves: the most, up to this, that split a micro-batch's prompts
    # into as many packs on each data-parallel device (`rl.rollouts.groups_per_pack`);
    # minibatches then move packs whole. 1: a group per row.
    pack_groups: int = 4
    # A control run: the training prompts' answers permuted among them (by train.seed),
    # so the `correct` reward says nothing about a reply to its prompt; the held-out
    # answers stay true. What GRPO gains beyond this run's figures, the answers taught.
    shuffled_answers: bool = False

    def problems(self) -> list[str]:
        found = Problems()
        found.check(
            not self.shuffled_answers or self.rewards.get("correct", 0) != 0,
            "grpo.shuffled_answers=true moves the answers only the correct reward reads, and "
            "grpo.rewards has no correct reward; add it or drop shuffled_answers",
        )
        found.check(
            self.collapse_window >= 0,
            f"grpo.collapse_window must be >= 0 (0: no watch), got {self.collapse_window}",
        )
        found.check(
            self.group_size >= 2,
            f"grpo.group_size={self.group_size}: a group needs at least 2 replies (advantages "
            "are relative to the group)",
        )
        for key in (
            "max_prompt_tokens",
            "max_new_tokens",
            "iterations",
            "minibatches",
            "pack_groups",
            "pass_k",
            "eval_prompts",
            "max_turns",
        ):
            value = getattr(self, key)
            found.check(value >= 1, f"grpo.{key} must be >= 1, got {value}")
        found.check(self.std_eps >= 0, f"grpo.std_eps={self.std_eps} must be >= 0 (TRL uses 1e-4)")
        # Imported here, not at the top, so that reading a config does not import JAX. The
        # estimators' names are the grpo stage's to check (`stages.grpo.config_problems`): a
        # name a script registered is unknown to a later process that only reads the run.
        from jaxllm.rl.policy_losses import AGGREGATION_MODES

        found.one_of("grpo.loss_aggregation", self.loss_aggregation, AGGREGATION_MODES)
        found.one_of(
            "grpo.importance_sampling_level",
            self.importance_sampling_level,
            ("token", "sequence"),
            "token (GRPO) or sequence (GSPO)",
        )
        if self.group_size >= 2:
            found.check(self.pass_k <= self.group_size, "grpo.pass_k must be <= grpo.group_size")
        found.check(
            self.eps_low > 0 and self.eps_high > 0, "grpo.eps_low and grpo.eps_high must be > 0"
        )
        found.dual_clip("grpo.dual_clip", self.dual_clip)
        found.check(
            self.beta >= 0 and self.temperature > 0, "grpo.beta must be >= 0, temperature > 0"
        )
        found.check(
            bool(self.rewards), "grpo.rewards is empty; name at least one reward and its weight"
        )
        found.one_of("grpo.answer_format", self.answer_format, ANSWER_FORMATS)
        return found


@dataclass
class ChatConfig:
    """How messages are written as tokens (SFT masks, generation, RL prompts alike)."""

    # jaxllm: <|im_start|>{role}<|im_sep|>{content}<|im_end|>; chatml: Qwen's
    # <|im_start|>{role}\n{content}<|im_end|>\n (both jaxllm's own, for runs trained here);
    # model: the imported model's own Jinja template (its tokenizer folder's); or a path to
    # a .jinja file.
    template: str = "jaxllm"
    # Passed to a Jinja template as `enable_thinking` when set (Qwen3's thinking switch).
    enable_thinking: bool | None = None

    def problems(self) -> list[str]:
        found = Problems()
        if self.template.endswith(JINJA_SUFFIX):
            found.check(
                Path(self.template).is_file(),
                f"chat.template={self.template}: no such file; name a Jinja chat template",
            )
        else:
            choices = (*CHAT_TEMPLATES, MODEL_TEMPLATE)
            found.one_of(
                "chat.template", self.template, choices, ", ".join(choices) + " or a .jinja file"
            )
        return found


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # a block's projections
LORA_BASE_DTYPES = ("float32", "bfloat16", "int8", "nf4")  # how the frozen base is stored


@dataclass
class LoraConfig:
    """Low-rank adapters (Hu et al. 2021): each targeted projection W of every block
    becomes W x + s B(A(x)), A (in, r) random and B (r, out) zero at the start (so step 0
    is the base model exactly), s = alpha / r (rsLoRA, Kalajdzievski 2023: alpha / sqrt(r)).
    Only the adapters, the scalar heads and (optionally) the embeddings train; the frozen
    base is stored as `base_dtype` (int8/nf4: QLoRA, quantised by qwix)."""

    rank: int = 0  # 0: off, every parameter trains
    alpha: float = 16.0
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank
    # Which projections get adapters: q, k, v, o (attention), gate, up, down (the MLP, or
    # every expert's with a mixture of experts).
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    dropout: float = 0.0  # on an adapter's input while training
    init_from: str | None = None  # out_dir of a LoRA run on the same base: its adapters
    base_dtype: str = "float32"
    train_embeddings: bool = False  # the embedding table (and an untied output head) train too

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def problems(self) -> list[str]:
        found = Problems()
        found.check(self.rank >= 0, f"lora.rank must be >= 0 (0: off), got {self.rank}")
        for target in self.targets:
            found.one_of("lora.targets", target, LORA_TARGETS)
        found.check(
            len(set(self.targets)) == len(self.targets),
            f"lora.targets={self.targets} names a projection twice",
        )
        found.check(
            not self.rank or self.targets,
            "lora.targets is empty; name at least one of " + ", ".join(LORA_TARGETS),
        )
        found.check(self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha}")
        found.check(0 <= self.dropout < 1, f"lora.dropout must lie in [0, 1), got {self.dropout}")
        found.one_of("lora.base_dtype", self.base_dtype, LORA_BASE_DTYPES)
        found.check(
            self.rank > 0 or self.base_dtype == "float32",
            f"lora.base_dtype={self.base_dtype} stores the frozen base of a LoRA run; set "
            "lora.rank > 0, or leave lora.base_dtype at float32",
        )
        found.check(
            self.init_from is None or self.rank > 0,
            "lora.init_from continues a LoRA run's adapters; set lora.rank (as that run's)",
        )
        return found


@dataclass
class CheckpointConfig:
    every: int = 500
    keep: int = 3
    async_save: bool = True

    def problems(self) -> list[str]:
        found = Problems()
        found.check(self.every >= 1, "checkpoint.every must be >= 1")
        found.check(self.keep >= 1, "checkpoint.keep must be >= 1")
        return found


@dataclass
class ResumeConfig:
    """What a run started again on an out_dir that holds a checkpoint may change
    (`jaxllm.run_inputs`)."""

    # Go on although the runs and files this run started from and on changed (each change
    # is added to out_dir/inputs.json with its step); off: such a resume is refused.
    allow_changed_inputs: bool = False

    def problems(self) -> list[str]:
        return []


@dataclass
class Config:
    out_dir: str = "runs/default"
    preset: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def problems(self) -> list[str]:
        """What ties sections together, for every stage (a stage's own cross-section rules
        are its `config_problems`)."""
        found = Problems()
        found.check(
            self.train.seq_len <= self.model.max_seq_len,
            f"train.seq_len={self.train.seq_len} is longer than model.max_seq_len="
            f"{self.model.max_seq_len}; shorten train.seq_len or raise model.max_seq_len",
        )
        rank = self.lora.rank
        sizes = {
            target: min(lora_projection_shape(self.model, target))
            for target in self.lora.targets
            if target in LORA_TARGETS
        }
        too_small = [f"{target} ({size})" for target, size in sizes.items() if size < rank]
        found.check(
            not too_small,
            f"lora.rank={rank} is above the size of projection {', '.join(too_small)}: a rank "
            f"can be at most min(inputs, outputs); lower lora.rank to at most "
            f"{min(sizes.values(), default=0)}",
        )
        return found


def lora_projection_shape(model: ModelConfig, target: str) -> tuple[int, int]:
    """(inputs, outputs) of one block projection `target` (an expert's, with experts)."""
    d, h = model.embed_dim, model.resolved_head_dim
    f = model.expert_mlp_dim if model.num_experts else model.mlp_dim
    return {
        "q": (d, model.num_heads * h),
        "k": (d, model.num_kv_heads * h),
        "v": (d, model.num_kv_heads * h),
        "o": (model.num_heads * h, d),
        "gate": (d, f),
        "up": (d, f),
        "down": (f, d),
    }[target]


MODEL_PRESETS: dict[str, ModelConfig] = {
    # For tests: small enough to compile in seconds, shaped to shard over 8 devices.
    "tiny": ModelConfig(),
    # nanoGPT's CPU Shakespeare size (its README: 4 layers, 4 heads, width 128, context 64).
    # SwiGLU at 8/3 of the width (Llama's rule) matches the parameters of GPT's 4x MLP.
    "shakespeare": ModelConfig(
        vocab_size=320,
        num_layers=4,
        num_heads=4,
        num_kv_heads=4,
        embed_dim=128,
        mlp_dim=344,
        max_seq_len=64,
    ),
    # GPT-2 small's size (12 x 768, 12 heads, 1024 context, tied embeddings) in the Llama
    # block; the vocabulary is GPT-2's 50257 + our specials, padded to a multiple of 128.
    "gpt2_124m": ModelConfig(
        vocab_size=50_304,
        num_layers=12,
        num_heads=12,
        num_kv_heads=12,
        embed_dim=768,
        mlp_dim=2048,
        max_seq_len=1024,
    ),
    # GPT-2 medium's size (24 x 1024, 16 heads) in the Llama block.
    "gpt2_350m": ModelConfig(
        vocab_size=50_304,
        num_layers=24,
        num_heads=16,
        num_kv_heads=16,
        embed_dim=1024,
        mlp_dim=2816,
        max_seq_len=2048,
    ),
    # ~1.2B Llama-3.2-1B-like shape with the cl100k vocabulary padded to 100352.
    "llama_1b": ModelConfig(
        vocab_size=100_352,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        embed_dim=2048,
        mlp_dim=8192,
        max_seq_len=2048,
        rope_theta=500_000.0,
        tie_embeddings=True,
    ),
}


# Keys that were removed or renamed: setting one says what replaced it.
REPLACED_KEYS = {
    "grpo.scale_rewards": "grpo.scale_rewards was replaced by grpo.advantage_estimator "
    "(group -> grpo, none -> dr_grpo)",
}


def _format_omegaconf_error(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None) or "?"
    if isinstance(error, ConfigKeyError) and key in REPLACED_KEYS:
        return REPLACED_KEYS[key]
    if isinstance(error, ConfigKeyError):
        section, _, name = key.rpartition(".")
        where = f"section '{section}'" if section else "the top level"
        return f"unknown config key '{key}': {where} has no '{name}'; check the spelling"
    if isinstance(error, ValidationError):
        if not dataclasses.is_dataclass(error.object_type):  # a dict's value, say
            reason = error.msg.splitlines()[0] if error.msg else "wrong type"
            return f"config key '{key}' has the wrong type: {reason}"
        expected = "?"
        if dataclasses.is_dataclass(error.object_type):
            hints = typing.get_type_hints(error.object_type)
            expected = getattr(hints.get(error.key), "__name__", str(hints.get(error.key)))
        return f"config key '{key}' has the wrong type: got {error.value!r}, expected {expected}"
    return f"config key '{key}': {error.msg}"


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line: what PyYAML found wrong and where (its own message spans several lines)."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{problem}{where}"


def _sections(cls: type = Config, prefix: str = "") -> dict[str, type]:
    """Dotted name -> dataclass of every config section (`train`, `model`, ...)."""
    hints = typing.get_type_hints(cls)
    found: dict[str, type] = {}
    for section in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[section.name]):
            found[prefix + section.name] = hints[section.name]
            found.update(_sections(hints[section.name], f"{prefix}{section.name}."))
    return found


def _refuse_values_for_sections(
    file_values: dict[str, Any], overrides: Sequence[str], path: str | Path | None
) -> None:
    """`train=5` or `train: 5` replaces a whole section by a value; OmegaConf's error for it
    names no key, so name it here."""
    for name, cls in _sections().items():
        example = f"{name}.{dataclasses.fields(cls)[0].name}"
        line = f"'{name}' is a config section, not a value; set its keys instead (e.g. {example})"
        for override in overrides:
            if override.partition("=")[0].strip() == name:
                raise ConfigError(f"override {line}")
        value: Any = file_values
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"config file '{path}': {line}")


def _parsed_overrides(overrides: Sequence[str]):
    """The overrides as an OmegaConf tree; a value that is not valid YAML names its override."""
    for override in overrides:
        try:
            OmegaConf.from_dotlist([override])
        except yaml.YAMLError as error:
            raise ConfigError(
                f"override '{override}' is not a valid YAML value ({_yaml_problem(error)}); "
                "fix the brackets or quote the value"
            ) from None
    return OmegaConf.from_dotlist(list(overrides))


def read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a folder; pass --config with a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass --config with a YAML file")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"config file '{path}': byte {error.start} is not valid UTF-8; save the file as UTF-8"
        ) from None
    except yaml.YAMLError as error:
        problem = _yaml_problem(error)
        raise ConfigError(f"config file '{path}' is not valid YAML: {problem}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"config file '{path}' must hold a mapping of keys, not a {type(loaded).__name__}"
        )
    return loaded


def _preset_name(file_values: dict[str, Any], overrides: Sequence[str]) -> str | None:
    name = file_values.get("preset")
    for override in overrides:
        key, _, value = override.partition("=")
        if key.strip() == "preset":
            name = value.strip()
    return name


def _merged_values(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` laid over `base`, section by section (nested mappings merge, values replace)."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged_values(merged[key], value)
        else:
            merged[key] = value
    return merged


def merged_object(base: Any, values: dict[str, Any], overrides: Sequence[str]) -> Any:
    """The dataclass `base` (an instance or the class) with nested `values` and dotted
    `overrides` laid over it, typed; a ConfigError naming the key for an unknown key or a
    wrong type."""
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(base), OmegaConf.create(values), _parsed_overrides(overrides)
        )
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise ConfigError(_format_omegaconf_error(error)) from None


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    check: bool = True,
    values: dict[str, Any] | None = None,
    stage: str | None = None,
) -> Config:
    """Build and validate a `Config` from an optional YAML file, `values` laid over it (a
    pipeline's section for one stage) and `key=value` overrides (`check=False`: types
    only, for a first look before values are inherited). `stage`: the stage that will run
    it, whose checks that tie its section to `train.*` then apply too (`validate`).

    Raises:
        ConfigError: one line per mistake (unknown key, wrong type, values that can't work).
    """
    file_values = read_yaml(Path(path)) if path is not None else {}
    file_values = _merged_values(file_values, values or {})
    for override in overrides:
        if "=" not in override or not override.partition("=")[0].strip():
            raise ConfigError(f"override '{override}' is not of the form dotted.key=value")
    _refuse_values_for_sections(file_values, overrides, path)
    preset = _preset_name(file_values, overrides)
    base = Config()
    if preset is not None:
        if preset not in MODEL_PRESETS:
            raise ConfigError(
                f"unknown preset '{preset}'; choose one of {', '.join(MODEL_PRESETS)}"
            )
        base = dataclasses.replace(base, model=dataclasses.replace(MODEL_PRESETS[preset]))
    config = merged_object(base, file_values, overrides)
    # Files as written to config.yaml: the run folder works from any directory.
    tokenizer = config.data.tokenizer
    if tokenizer.endswith(".tiktoken") and not Path(tokenizer).is_absolute():
        data = dataclasses.replace(config.data, tokenizer=str(Path(tokenizer).absolute()))
        config = dataclasses.replace(config, data=data)
    template = config.chat.template
    if template.endswith(JINJA_SUFFIX) and not Path(template).is_absolute():
        chat = dataclasses.replace(config.chat, template=str(Path(template).absolute()))
        config = dataclasses.replace(config, chat=chat)
    mistakes = validate(config, stage) if check else []
    if mistakes:
        raise ConfigError("\n".join(mistakes))
    return config


# Keys earlier versions wrote into every run's config.yaml: (section, old key) -> the key that
# replaced it and how its values read now.
LEGACY_RUN_KEYS = {
    ("grpo", "scale_rewards"): ("advantage_estimator", {"group": "grpo", "none": "dr_grpo"}),
}


def read_run_values(path: str | Path) -> dict[str, Any]:
    """A run's saved `config.yaml` as a mapping, also when an earlier version wrote it: its
    replaced keys (`LEGACY_RUN_KEYS`) are read as the keys that replaced them (a user's own
    config or override that sets one is refused with the replacement instead), and a model
    saved before `model.family` existed is a Qwen2 where it has q/k/v biases (the one
    family then told apart), else a Llama."""
    values = read_yaml(Path(path))
    for (section, old), (new, meanings) in LEGACY_RUN_KEYS.items():
        own = values.get(section)
        if isinstance(own, dict) and old in own:
            value = own.pop(old)
            own.setdefault(new, meanings.get(value, value))
    model = values.get("model")
    if isinstance(model, dict) and "family" not in model:
        model["family"] = "qwen2" if model.get("qkv_bias") else "llama"
    return values


def load_run_config(path: str | Path) -> Config:
    """A run's saved `config.yaml` as a `Config` (`read_run_values`)."""
    return load_config(None, values=read_run_values(path))


def load_stage_config(
    stage: str,
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    values: dict[str, Any] | None = None,
    start_values: dict[str, Any] | None = None,
) -> tuple[Config, list[str]]:
    """`load_config` for `stage`, with the model and tokenizer of the run it starts from
    (`start_values`: that run's config as a mapping, for a run not made yet).

    When the stage's start key (its `StageSpec.start_key`) names a run, that run's
    `config.yaml` gives `model.*`, `data.tokenizer`, `chat.template` and
    `chat.enable_thinking`, winning over presets and the config file; only command-line
    overrides of those keys (and a pipeline section's `values`, which are the user's
    choices for this stage) win over the run. A run being
    resumed whose starting run is gone takes them from its own `out_dir/config.yaml`.
    Returns the config and one line per inherited value that differs from what the file
    and defaults said.
    """
    cfg = load_config(path, overrides, False, values)  # checked once the model is known
    key = STAGES[stage].start_key if stage in STAGES else None
    run_dir = OmegaConf.select(OmegaConf.structured(cfg), key) if key else None
    if not run_dir:
        return load_config(path, overrides, values=values, stage=stage), []
    run_config_path = Path(run_dir) / "config.yaml"
    own_config = Path(cfg.out_dir) / "config.yaml"
    if start_values is not None:
        run_values = start_values
    else:
        if not run_config_path.is_file() and own_config.is_file():
            run_config_path = own_config  # resuming a run whose starting run is gone
        if not run_config_path.is_file():
            raise ConfigError(
                f"{key}={run_dir} has no config.yaml; point it at the out_dir of a training run"
            )
        run_values = read_run_values(run_config_path)
    if key.endswith("policy_from") and REWARD_HEAD in (
        (run_values.get("model") or {}).get("scalar_heads") or []
    ):
        raise ConfigError(
            f"{key}={run_dir} is a reward run (its model has a reward head); start the policy "
            "from an SFT run (the reward run goes in ppo.reward_from / grpo.reward_from)"
        )
    explicit = {o.partition("=")[0].strip() for o in overrides} | _dotted_keys(values or {})
    inherited: dict[str, Any] = {}
    if "preset" not in explicit:
        for name, value in (run_values.get("model") or {}).items():
            if f"model.{name}" not in explicit:
                inherited[f"model.{name}"] = value
    for name, value in (
        ("data.tokenizer", (run_values.get("data") or {}).get("tokenizer")),
        ("chat.template", (run_values.get("chat") or {}).get("template")),
        ("chat.enable_thinking", (run_values.get("chat") or {}).get("enable_thinking")),
    ):
        if value is not None and name not in explicit:
            inherited[name] = value
    before = OmegaConf.structured(cfg)
    lines = [
        f"{name}={value} (from {run_config_path}; the config said {OmegaConf.select(before, name)})"
        for name, value in inherited.items()
        if OmegaConf.select(before, name) != value
    ]
    as_overrides = [f"{name}={json.dumps(value)}" for name, value in inherited.items()]
    return load_config(path, [*as_overrides, *overrides], values=values, stage=stage), lines


def _dotted_keys(values: dict[str, Any], prefix: str = "") -> set[str]:
    """Every leaf key of nested `values` as a dotted name (`model.dtype`, ...)."""
    keys = set()
    for key, value in values.items():
        if isinstance(value, dict):
            keys |= _dotted_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def config_differences(
    before: dict[str, Any], after: dict[str, Any], prefix: str = ""
) -> list[str]:
    """One `key: old -> new` line per setting of `after` that differs from `before`, two
    configs as nested dicts (`dataclasses.asdict`); keys `before` lacks are left out."""
    lines = []
    for key, new in after.items():
        if key not in before:
            continue
        old = before[key]
        if isinstance(old, dict) and isinstance(new, dict):
            lines += config_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            lines.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return lines


INT_LIMIT = 2**31 - 1  # an integer setting becomes an int32 on the device


def _unreadable_numbers(section: Any, prefix: str = "") -> list[str]:
    """One line per key, in every section, whose number no range check can read: a float
    that is NaN or infinite, an integer beyond the int32 it becomes."""
    lines = []
    for key in dataclasses.fields(section):
        value, name = getattr(section, key.name), f"{prefix}{key.name}"
        if dataclasses.is_dataclass(value):
            lines += _unreadable_numbers(value, f"{name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            lines.append(f"{name}={value} must be a finite number")
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_LIMIT:
            lines.append(
                f"{name}={value} is out of range: an integer setting lies in "
                "[-(2**31 - 1), 2**31 - 1]"
            )
    return lines


def check_for_stage(config: Config, stage: str) -> None:
    """Raise the ConfigError of `validate(config, stage)`'s mistakes, if any: what a stage
    called from Python (not through `load_stage_config`) checks first."""
    mistakes = validate(config, stage)
    if mistakes:
        raise ConfigError("\n".join(mistakes))


def validate(config: Config, stage: str | None = None) -> list[str]:
    """Every mistake of `config`, one line each: each section's own (`problems`), those
    between sections (`Config.problems`) and, for `stage`, that stage's rules between its
    section and the rest (`config_problems` of its module: how PPO's rollouts split into
    minibatches, a reply's room in the context): another stage's batch size is its own."""
    unreadable = _unreadable_numbers(config)
    if unreadable:  # every range check below would misread NaN, Inf or a huge integer
        return unreadable
    mistakes = [
        line
        for section in dataclasses.fields(config)
        if dataclasses.is_dataclass(getattr(config, section.name))
        for line in getattr(config, section.name).problems()
    ]
    mistakes += config.problems()
    if stage in STAGES:
        mistakes += _lora_start_problems(config, stage)
        mistakes += STAGES[stage].config_problems(config)
    return mistakes


def _lora_start_problems(config: Config, stage: str) -> list[str]:
    """Adapters adapt the model a stage starts from: a stage that starts from scratch
    (pre-training) cannot take them, and one that can start from a run must name it."""
    if config.lora.rank == 0:
        return []
    key = STAGES[stage].start_key
    if key is None:
        return [
            f"{stage} trains every parameter from scratch; lora.rank={config.lora.rank} "
            "adapts a trained model: set lora.rank=0, or fine-tune a run with `jaxllm sft`"
        ]
    if not OmegaConf.select(OmegaConf.structured(config), key):
        return [
            f"lora.rank={config.lora.rank} adapts the model of the run a stage starts from; "
            f"set {key} (an imported or trained run)"
        ]
    return []


def to_yaml(config: Config) -> str:
    """The resolved config as YAML (what a run writes to `out_dir/config.yaml`)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))
