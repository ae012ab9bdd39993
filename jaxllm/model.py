"""A decoder-only transformer in Flax NNX, used through a functional boundary.

Features:
- RMSNorm, rotary positions (per-token positions, so packed documents restart at 0),
  grouped-query attention, a gated MLP; tied or untied input/output embeddings;
- the block choices of the families in `jaxllm.models` (Llama, Mistral, Qwen2, Qwen3,
  Gemma 3), set by `ModelConfig`: Gemma's (1 + w) RMSNorm and its "sandwich" norms after
  attention and MLP, GeGLU, q/k norms, q/k/v biases, embeddings x sqrt(D), the attention
  scale, final logit soft-capping, and per-layer sliding windows with their own rope base
  (the layers still scan: each takes its kind as a scanned flag that selects between two
  masks and two rotary tables);
- a mixture-of-experts MLP (`jaxllm.moe`, Qwen3-MoE) in place of the dense one when
  `model.num_experts` > 0, its router statistics returned per layer for the
  load-balancing loss (`hidden_and_router_stats`);
- every parameter declared once with its logical axes (`sharding.py` maps them to the mesh)
  and activation sharding constraints at block boundaries;
- layers stacked on a leading `layers` axis and run with `jax.lax.scan`, so compile time
  does not grow with depth; rematerialisation policy by name;
- float32 parameters, compute in `model.dtype` (bfloat16 on accelerators);
- optional scalar heads (`value`, `reward`, ...) in the same params pytree;
- a KV cache (`KVCache`) for prefill and decode, with the same segment rules;
- `LanguageModel`: the functional boundary. It splits the module once into a graphdef and
  a params pytree (a plain nested dict of arrays) and exposes pure functions of params.

Shape letters: B batch, T sequence, D embed, V vocab, N query heads, K kv heads,
H head dim, F mlp hidden, L layers.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name

from jaxllm.activations import gated
from jaxllm.attention import (
    BandedMask,
    KeyBounds,
    apply_rotary,
    banded_mask,
    decode_attention,
    dot_product_attention,
    rotary_inverse_frequencies,
    rotary_tables,
    segment_mask,
    window_mask,
)
from jaxllm.config import LoraConfig, ModelConfig
from jaxllm.lora import (
    adapter_key,
    adapter_of,
    has_adapters,
    merge_adapters,
    split_trainable,
    strip_adapters,
)
from jaxllm.moe import MoE, RouterStats
from jaxllm.quant import (
    dequantize,
    dequantize_layer,
    dequantize_params,
    is_quantized,
    store_frozen,
)
from jaxllm.sharding import DEFAULT_RULES, ShardingRules, constrain, unsharded

Params = dict[str, Any]

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}


# A KV cache layer's (B, K, S, H) keys or values, sharded like the activations.
CACHE_AXES = ("batch", "act_kv_heads", "act_seq", None)


def rows_at(x: jax.Array, index_bq: jax.Array, axis: int = 1) -> jax.Array:
    """x's entries at columns `index_bq` of each row along `axis`: (B, T, ...) -> (B, Q, ...)
    (with the axes before `axis` kept, e.g. a (B, 1, T, S) mask's rows at axis 2)."""
    index = index_bq.reshape(index_bq.shape[:1] + (1,) * (axis - 1) + index_bq.shape[1:])
    index = index.reshape(index.shape + (1,) * (x.ndim - axis - 1))
    return jnp.take_along_axis(x, index, axis=axis)


def _param(
    rngs: nnx.Rngs, shape: tuple[int, ...], logical_axes: tuple[str, ...], std: float | None
) -> nnx.Param:
    """A float32 parameter: normal(0, std), or ones when std is None (norm scales)."""
    if std is None:
        value = jnp.ones(shape, jnp.float32)
    else:
        value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, out_sharding=logical_axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    """x_hat = x / sqrt(mean(x^2) + eps) over the last axis, in float32, then

    - "rms": x_hat cast back to x's dtype, times w (Llama, Qwen; w starts at 1);
    - "rms_one_plus": x_hat * (1 + w) in float32, then cast (Gemma; w starts at 0)."""

    def __init__(self, cfg: ModelConfig, dim: int, rngs: nnx.Rngs, axis: str = "embed"):
        self.one_plus = cfg.norm == "rms_one_plus"
        self.scale_d = _param(rngs, (dim,), (axis,), 0.0 if self.one_plus else None)
        self.eps = cfg.norm_eps

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        x32 = x_btd.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.one_plus:
            return (normed * (1.0 + self.scale_d[...].astype(jnp.float32))).astype(x_btd.dtype)
        return normed.astype(x_btd.dtype) * self.scale_d[...]


class Attention(nnx.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        rules: ShardingRules,
        rngs: nnx.Rngs,
        lora: LoraConfig | None = None,
    ):
        d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
        self.wq_dnh = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), cfg.init_std)
        self.wk_dkh = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg.init_std)
        self.wv_dkh = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg.init_std)
        self.wo_nhd = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), out_std)
        # Low-rank adapters (`jaxllm.lora`), None where not targeted.
        embed, heads, kv_heads = ("embed",), ("heads", "head_dim"), ("kv_heads", "head_dim")
        self.q_lora = adapter_of(lora, "q", (d,), embed, (n, h), heads, rngs)
        self.k_lora = adapter_of(lora, "k", (d,), embed, (k, h), kv_heads, rngs)
        self.v_lora = adapter_of(lora, "v", (d,), embed, (k, h), kv_heads, rngs)
        self.o_lora = adapter_of(lora, "o", (n, h), heads, (d,), embed, rngs)
        if cfg.qkv_bias:  # Qwen2's; zero at init
            self.bq_nh = _param(rngs, (n, h), ("heads", "head_dim"), 0.0)
            self.bk_kh = _param(rngs, (k, h), ("kv_heads", "head_dim"), 0.0)
            self.bv_kh = _param(rngs, (k, h), ("kv_heads", "head_dim"), 0.0)
        if cfg.qk_norm:  # Qwen3's and Gemma 3's: over each head's H values, before rope
            self.q_norm = RMSNorm(cfg, h, rngs, axis="head_dim")
            self.k_norm = RMSNorm(cfg, h, rngs, axis="head_dim")
        self.qkv_bias = cfg.qkv_bias
        self.qk_norm = cfg.qk_norm
        scalar = cfg.query_pre_attn_scalar
        self.scale = h**-0.5 if scalar is None else scalar**-0.5
        self.head_dim = h
        self.backend = cfg.attention
        self.rules = rules

    def __call__(
        self,
        x_btd,
        sin_cos,
        mask_b1ts,
        cache: LayerCache | None = None,
        key=None,
        query_index_bq=None,
    ):
        """Self-attention over the row, or, with a `LayerCache`, over the cache after writing
        this call's keys and values at slots [cache.slot, cache.slot + T) of its layer.
        `key`: the adapters' dropout key (None: no dropout). `query_index_bq` (without a
        cache): only the queries at these Q columns of each row, each attending to the
        keys its own column would (causal, `mask_b1ts`); the output is then (B, Q, D).

        Returns ((B, T, D), the updated `LayerCache` or None), with or without a cache."""
        b, t, d = x_btd.shape
        x_md = x_btd.reshape(b * t, d)  # M = B*T rows: 2-D matmuls are every backend's fast path
        weights = [w[...].reshape(d, -1) for w in (self.wq_dnh, self.wk_dkh, self.wv_dkh)]
        inputs, query_sin_cos = [x_md] * 3, sin_cos
        if query_index_bq is not None:
            inputs[0] = rows_at(x_btd, query_index_bq).reshape(-1, d)
            query_sin_cos = tuple(rows_at(table, query_index_bq) for table in sin_cos)
            # Causality as a mask: the queries are no longer the last columns of the keys.
            visible_b1qs = query_index_bq[:, None, :, None] >= jnp.arange(t)[None, None, None, :]
            mask_b1ts = rows_at(mask_b1ts, query_index_bq, axis=2) & visible_b1qs
        if cache is not None and unsharded(self.rules, "heads", "kv_heads"):
            # Sampling: one matmul for q, k and v, within 1e-6 of three (XLA hoists the
            # concatenation of the weights out of the decode loop).
            q_width, k_width = weights[0].shape[1], weights[1].shape[1]
            qkv_mx = x_md @ jnp.concatenate(weights, axis=1)
            outputs = jnp.split(qkv_mx, [q_width, q_width + k_width], axis=1)
        else:
            outputs = [x @ w for x, w in zip(inputs, weights, strict=True)]
        adapters = (self.q_lora, self.k_lora, self.v_lora)
        outputs = [
            y if adapter is None else y + adapter(x, adapter_key(key, i))
            for i, (y, x, adapter) in enumerate(zip(outputs, inputs, adapters, strict=True))
        ]
        q, k, v = (y.reshape(b, -1, y.shape[1] // self.head_dim, self.head_dim) for y in outputs)
        if self.qkv_bias:
            q, k, v = q + self.bq_nh[...], k + self.bk_kh[...], v + self.bv_kh[...]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = constrain(q, ("batch", "act_seq", "act_heads", None), self.rules)
        k = constrain(k, ("batch", "act_seq", "act_kv_heads", None), self.rules)
        q, k = apply_rotary(q, query_sin_cos), apply_rotary(k, sin_cos)
        if cache is None:
            out_btnh = dot_product_attention(
                q,
                k,
                v,
                mask_b1ts,
                # A few queries with a mask: cuDNN's gradient refuses an odd query length
                # with a mask (a bias to it), and the work is small.
                backend=self.backend if query_index_bq is None else "xla",
                is_causal=query_index_bq is None,
                scale=self.scale,
            )
        else:
            cache = cache.write(k, v)
            if t == 1:  # decode: read only the filled slots, chunk by chunk
                out_btnh = decode_attention(
                    q[:, 0],
                    cache.k_bksh,
                    cache.v_bksh,
                    mask_b1ts[:, 0, 0],
                    cache.slot + 1,
                    cache.chunk_slots,
                    self.scale,
                )[:, None]
            else:  # prefill: every slot, in the layout the backends take
                k_bskh = cache.k_bksh.transpose(0, 2, 1, 3)
                v_bskh = cache.v_bksh.transpose(0, 2, 1, 3)
                out_btnh = dot_product_attention(
                    q,
                    k_bskh,
                    v_bskh,
                    mask_b1ts,
                    backend=self.backend,
                    is_causal=False,
                    scale=self.scale,
                )
        out_btnh = checkpoint_name(out_btnh, "attention_out")
        attended_mx = out_btnh.reshape(-1, out_btnh.shape[2] * out_btnh.shape[3])
        out_md = attended_mx @ self.wo_nhd[...].reshape(-1, d)
        if self.o_lora is not None:
            out_md = out_md + self.o_lora(attended_mx, adapter_key(key, 3))
        return out_md.reshape(b, -1, d), cache


class GatedMLP(nnx.Module):
    """down(act(x W_gate) * (x W_up)): SwiGLU (act = silu) or GeGLU (tanh-approximated gelu)."""

    def __init__(
        self,
        cfg: ModelConfig,
        rules: ShardingRules,
        rngs: nnx.Rngs,
        lora: LoraConfig | None = None,
    ):
        d, f = cfg.embed_dim, cfg.mlp_dim
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
        self.w_gate_df = _param(rngs, (d, f), ("embed", "mlp"), cfg.init_std)
        self.w_up_df = _param(rngs, (d, f), ("embed", "mlp"), cfg.init_std)
        self.w_down_fd = _param(rngs, (f, d), ("mlp", "embed"), out_std)
        self.gate_lora = adapter_of(lora, "gate", (d,), ("embed",), (f,), ("mlp",), rngs)
        self.up_lora = adapter_of(lora, "up", (d,), ("embed",), (f,), ("mlp",), rngs)
        self.down_lora = adapter_of(lora, "down", (f,), ("mlp",), (d,), ("embed",), rngs)
        self.activation = cfg.mlp_activation
        self.rules = rules

    def __call__(self, x_btd, sampling: bool = False, key=None):
        """(B, T, D). `sampling` (a decode or prefill step), with the mlp axis unsharded:
        one matmul for gate and up (within 1e-6 of two). `key`: the adapters' dropout key."""
        b, t, d = x_btd.shape
        x_md = x_btd.reshape(b * t, d)
        if sampling and unsharded(self.rules, "mlp"):
            gate_up_df = jnp.concatenate([self.w_gate_df[...], self.w_up_df[...]], axis=1)
            gate_mf, up_mf = jnp.split(x_md @ gate_up_df, 2, axis=1)
        else:
            gate_mf = x_md @ self.w_gate_df[...]
            up_mf = x_md @ self.w_up_df[...]
        if self.gate_lora is not None:
            gate_mf = gate_mf + self.gate_lora(x_md, adapter_key(key, 0))
        if self.up_lora is not None:
            up_mf = up_mf + self.up_lora(x_md, adapter_key(key, 1))
        hidden_mf = constrain(
            gated(self.activation, gate_mf, up_mf), ("batch", "act_mlp"), self.rules
        )
        out_md = hidden_mf @ self.w_down_fd[...]
        if self.down_lora is not None:
            out_md = out_md + self.down_lora(hidden_mf, adapter_key(key, 2))
        return out_md.reshape(b, t, d)


class Block(nnx.Module):
    """x + attention(norm(x)), then x + mlp(norm(x)); with `sandwich_norms` (Gemma 3) the
    attention and MLP outputs are normalised too before each residual add."""

    def __init__(
        self,
        cfg: ModelConfig,
        rules: ShardingRules,
        rngs: nnx.Rngs,
        lora: LoraConfig | None = None,
    ):
        self.attention_norm = RMSNorm(cfg, cfg.embed_dim, rngs)
        self.attention = Attention(cfg, rules, rngs, lora)
        self.mlp_norm = RMSNorm(cfg, cfg.embed_dim, rngs)
        # The one place the MLP is chosen: a mixture of experts (Qwen3-MoE) or dense.
        mlp = MoE if cfg.num_experts else GatedMLP
        self.mlp = mlp(cfg, rules, rngs, lora)
        if cfg.sandwich_norms:
            self.attention_out_norm = RMSNorm(cfg, cfg.embed_dim, rngs)
            self.mlp_out_norm = RMSNorm(cfg, cfg.embed_dim, rngs)
        self.sandwich_norms = cfg.sandwich_norms
        self.rules = rules

    def __call__(
        self,
        x_btd,
        sin_cos,
        mask_b1ts,
        cache: LayerCache | None = None,
        token_mask_bt=None,
        key=None,
        query_index_bq=None,
    ):
        """((B, T, D), the updated `LayerCache` or None, the MoE layer's `RouterStats` over
        the tokens where `token_mask_bt` is true, or None for a dense MLP). `key`: the
        layer's adapter dropout key (None: no dropout). `query_index_bq`: the layer's
        output at these Q columns only, (B, Q, D) (`Attention`)."""
        with jax.named_scope("attention"):
            attended, cache = self.attention(
                self.attention_norm(x_btd),
                sin_cos,
                mask_b1ts,
                cache,
                adapter_key(key, 0),
                query_index_bq,
            )
            if query_index_bq is not None:
                x_btd = rows_at(x_btd, query_index_bq)
                if token_mask_bt is not None:
                    token_mask_bt = rows_at(token_mask_bt, query_index_bq)
            if self.sandwich_norms:
                attended = self.attention_out_norm(attended)
            x_btd = x_btd + attended
        with jax.named_scope("mlp"):
            sampling, stats = cache is not None, None
            mlp_key = adapter_key(key, 1)
            if isinstance(self.mlp, MoE):
                mlp_out, stats = self.mlp(self.mlp_norm(x_btd), token_mask_bt, sampling, mlp_key)
            else:
                mlp_out = self.mlp(self.mlp_norm(x_btd), sampling=sampling, key=mlp_key)
            if self.sandwich_norms:
                mlp_out = self.mlp_out_norm(mlp_out)
            x_btd = x_btd + mlp_out
        x_btd = constrain(x_btd, ("batch", "act_seq", "act_embed"), self.rules)
        return x_btd, cache, stats


class ScalarHead(nnx.Module):
    """A linear map from the final hidden state to one number per token (value, reward).

    Starts at 0: PPO's first value estimates are 0 (its first advantages are the rewards
    themselves), and an untrained reward model scores every reply alike, so it prefers
    none and its first eval is chance (a random head would rank replies by whatever its
    direction happens to read from the hidden state, often their length)."""

    def __init__(self, dim: int, rngs: nnx.Rngs):
        self.w_d = _param(rngs, (dim,), ("embed",), 0.0)
        self.bias = nnx.Param(jnp.zeros((), jnp.float32), out_sharding=(), eager_sharding=False)

    def __call__(self, hidden_btd):
        return jnp.einsum("btd,d->bt", hidden_btd, self.w_d[...]) + self.bias[...]


@struct.dataclass
class KVCache:
    """Keys and values of every layer for `S` slots, and which segment fills each slot.

    Slots are written left to right; `index` is the next free one. Segment id 0 marks an
    empty (or padding) slot, which no query attends to. One array per layer, so a layer
    reads and updates its own in place (a slice of a stacked array would be a copy), with
    slots next to the head dim: a decode step reads each (row, kv head) as one block,
    `chunk_slots` slots at a time up to the last filled one.
    """

    keys: tuple[jax.Array, ...]  # L arrays (B, K, S, H)
    values: tuple[jax.Array, ...]  # L arrays (B, K, S, H)
    segment_ids_bs: jax.Array  # (B, S) int32
    index: jax.Array  # int32 scalar
    chunk_slots: int = struct.field(pytree_node=False, default=0)  # divides S


@struct.dataclass
class LayerCache:
    """One layer's part of a `KVCache` and the first slot this call writes."""

    k_bksh: jax.Array  # (B, K, S, H)
    v_bksh: jax.Array  # (B, K, S, H)
    slot: jax.Array  # int32 scalar
    chunk_slots: int = struct.field(pytree_node=False, default=0)

    def write(self, k_btkh: jax.Array, v_btkh: jax.Array) -> LayerCache:
        """Keys and values (B, T, K, H) stored at slots [slot, slot + T)."""
        at = (0, 0, self.slot, 0)
        k_bkth = k_btkh.transpose(0, 2, 1, 3).astype(self.k_bksh.dtype)
        v_bkth = v_btkh.transpose(0, 2, 1, 3).astype(self.v_bksh.dtype)
        return self.replace(
            k_bksh=jax.lax.dynamic_update_slice(self.k_bksh, k_bkth, at),
            v_bksh=jax.lax.dynamic_update_slice(self.v_bksh, v_bkth, at),
        )


class Transformer(nnx.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        rules: ShardingRules,
        rngs: nnx.Rngs,
        lora: LoraConfig | None = None,
    ):
        self.token_embedding_vd = _param(
            rngs, (cfg.vocab_size, cfg.embed_dim), ("vocab", "embed"), cfg.init_std
        )

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stacked_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rules, rngs, lora)

        self.blocks = stacked_blocks(rngs)
        self.final_norm = RMSNorm(cfg, cfg.embed_dim, rngs)
        if not cfg.tie_embeddings:
            self.lm_head_dv = _param(
                rngs, (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"), cfg.init_std
            )
        self.heads = nnx.Dict({name: ScalarHead(cfg.embed_dim, rngs) for name in cfg.scalar_heads})
        self.tie_embeddings = cfg.tie_embeddings
        self.remat = cfg.remat
        self.scan_layers = cfg.scan_layers
        self.num_layers = cfg.num_layers
        self.max_seq_len = cfg.max_seq_len
        self.rotary_frequencies = rotary_inverse_frequencies(
            cfg.resolved_head_dim, cfg.rope_theta, cfg
        )
        self.local_rotary_frequencies = None  # sliding layers' own, unscaled (Gemma 3)
        if cfg.rope_local_theta is not None:
            self.local_rotary_frequencies = rotary_inverse_frequencies(
                cfg.resolved_head_dim, cfg.rope_local_theta
            )
        self.sliding_layers = cfg.sliding_layers
        self.sliding_window = cfg.sliding_window
        self.embed_scale = cfg.embed_dim**0.5 if cfg.embed_scale else None
        self.final_logit_softcap = cfg.final_logit_softcap
        self.rules = rules

    def __call__(
        self,
        tokens_bt,
        positions_bt,
        segment_ids_bt,
        cache: KVCache | None = None,
        layers=None,
        dropout_key=None,
        prefix_segment_ids_bt=None,
        query_index_bq=None,
        key_bounds: KeyBounds | None = None,
    ):
        """Without a cache: (final normalised hidden states (B, T, D), the MoE layers'
        `RouterStats` stacked on a leading layers axis, or None for a dense model); with a
        cache: (hidden states, the updated cache). With `query_index_bq` (no cache): the
        final hidden states at those Q columns only, (B, Q, D), and no router statistics;
        unrolled, the last layer computes them there alone (its keys and values at every
        column).

        Without a cache the row attends to itself, causally within each segment and, where
        `prefix_segment_ids_bt` is > 0, to that earlier segment of the row too (a shared
        prompt; positions go on from its end). With one,
        this call's tokens fill slots [cache.index, cache.index + T) and attend to every
        filled slot of their segment up to their own. Sliding layers see only the last
        `sliding_window` positions (slots: a cache's rows are contiguous from their first
        token, so slot distance is position distance). `layers` (unrolled layers only): each
        layer's params, already sliced from the stacked ones (`LanguageModel.layer_params`).
        `dropout_key` (without a cache): the adapters' dropout key, folded with each layer's
        index (None: no dropout). `key_bounds` (without a cache or `query_index_bq`): where
        each query's keys lie; the attention then reads them block by block when that
        scores fewer pairs (`attention.KeyBounds`).
        """
        # Gather the table whole before the lookup (as FSDP gathers every weight): a gather
        # from a vocab-sharded table makes XLA replicate it the slow way.
        table_vd = constrain(self.token_embedding_vd[...], (None, "act_embed"), self.rules)
        x_btd = jnp.take(table_vd, tokens_bt, axis=0)
        if self.embed_scale is not None:  # Gemma: the scale in the compute dtype first
            x_btd = x_btd * jnp.asarray(self.embed_scale, jnp.float32).astype(x_btd.dtype)
        x_btd = constrain(x_btd, ("batch", "act_seq", "act_embed"), self.rules)
        # Shared by every layer: rotary angles and which keys each query may see.
        # A table of every position a token here can have (the context, this call's tokens,
        # the cache's slots: all static).
        num_positions = max(self.max_seq_len, tokens_bt.shape[1])
        if cache is not None:
            num_positions = max(num_positions, cache.segment_ids_bs.shape[1])
        sin_cos = rotary_tables(positions_bt, self.rotary_frequencies, num_positions)
        local_sin_cos = sin_cos
        if self.local_rotary_frequencies is not None and any(self.sliding_layers):
            local_sin_cos = rotary_tables(
                positions_bt, self.local_rotary_frequencies, num_positions
            )
        block_graphdef, block_params = nnx.split(self.blocks)
        t = tokens_bt.shape[1]
        banded = cache is None and query_index_bq is None and key_bounds is not None
        if banded and key_bounds.pays(t):  # the keys each query may see, block by block
            mask_b1ts = banded_mask(segment_ids_bt, prefix_segment_ids_bt, positions_bt, key_bounds)
            sliding_mask_b1ts = mask_b1ts
            if any(self.sliding_layers) and self.sliding_window < t:
                sliding_mask_b1ts = banded_mask(
                    segment_ids_bt,
                    prefix_segment_ids_bt,
                    positions_bt,
                    key_bounds,
                    self.sliding_window,
                )
        elif cache is None:
            mask_b1ts = segment_mask(segment_ids_bt, segment_ids_bt, prefix_segment_ids_bt)
            # Windows by position: a reply held after others in a packed row is as near its
            # shared prompt as in a row of its own (positions never exceed columns).
            query_places_bt = key_places_bs = positions_bt
            num_keys = t
        else:
            slot = cache.index
            cache_segments_bs = jax.lax.dynamic_update_slice(
                cache.segment_ids_bs, segment_ids_bt, (0, slot)
            )
            query_slots_t = slot + jnp.arange(t)
            key_slots_s = jnp.arange(cache_segments_bs.shape[1])
            mask_b1ts = segment_mask(segment_ids_bt, cache_segments_bs) & (
                key_slots_s[None, None, None, :] <= query_slots_t[None, None, :, None]
            )
            query_places_bt, key_places_bs = query_slots_t[None], key_slots_s[None]
            num_keys = key_slots_s.shape[0]
        if not isinstance(mask_b1ts, BandedMask):
            sliding_mask_b1ts = mask_b1ts
            # A window as wide as the keys (Mistral's 4096 over a shorter context) hides none.
            if any(self.sliding_layers) and self.sliding_window < num_keys:
                sliding_mask_b1ts = mask_b1ts & window_mask(
                    query_places_bt, key_places_bs, self.sliding_window
                )

        def inputs_of_layer(is_sliding):
            """(sin_cos, mask) of a layer: a static choice where all layers are of one kind
            (or the layers are unrolled), else a select on the layer's scanned flag."""
            same = sliding_mask_b1ts is mask_b1ts and local_sin_cos is sin_cos
            if same or len(set(self.sliding_layers)) == 1:
                is_sliding = self.sliding_layers[0]
            if isinstance(is_sliding, bool):
                return (local_sin_cos, sliding_mask_b1ts) if is_sliding else (sin_cos, mask_b1ts)
            return jax.tree.map(
                lambda sliding, full: jnp.where(is_sliding, sliding, full),
                (local_sin_cos, sliding_mask_b1ts),
                (sin_cos, mask_b1ts),
            )

        if cache is None:
            token_mask_bt = segment_ids_bt > 0  # padding leaves the router's statistics

            def layer(x_btd, layer_inputs, query_index_bq=None):
                params_of_one_layer, _, is_sliding, index = layer_inputs
                block = nnx.merge(block_graphdef, dequantize_layer(params_of_one_layer))
                key = adapter_key(dropout_key, index)
                x_btd, _, stats = block(
                    x_btd,
                    *inputs_of_layer(is_sliding),
                    token_mask_bt=token_mask_bt,
                    key=key,
                    query_index_bq=query_index_bq,
                )
                return x_btd, stats

            if self.remat != "none":
                layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
            if query_index_bq is None or self.scan_layers:
                x_btd, router_stats = self._over_layers(layer, x_btd, block_params)
                if query_index_bq is None:
                    return self.final_norm(x_btd), router_stats
                # Scanned layers run the last one at every column too: scanning the others
                # alone would slice (L-1)/L of the stacked weights, a copy of them.
                return self.final_norm(rows_at(x_btd, query_index_bq)), None
            for index in range(self.num_layers):  # unrolled: the last at the read columns
                last = index == self.num_layers - 1
                layer_inputs = (
                    jax.tree.map(lambda a, i=index: a[i], block_params),
                    None,
                    self.sliding_layers[index],
                    index,
                )
                x_btd, _ = layer(x_btd, layer_inputs, query_index_bq if last else None)
            return self.final_norm(x_btd), None

        def cached_layer(x_btd, layer_inputs):
            params_of_one_layer, (k_bksh, v_bksh), is_sliding, _ = layer_inputs
            block = nnx.merge(block_graphdef, dequantize_layer(params_of_one_layer))
            view = LayerCache(k_bksh, v_bksh, slot, cache.chunk_slots)
            x_btd, view, _ = block(x_btd, *inputs_of_layer(is_sliding), view)
            return x_btd, (view.k_bksh, view.v_bksh)

        layer_caches = tuple(zip(cache.keys, cache.values, strict=True))
        x_btd, layer_caches = self._over_layers(
            cached_layer, x_btd, block_params, layer_caches, layers
        )
        keys, values = zip(*layer_caches, strict=True)
        new_cache = cache.replace(
            keys=keys, values=values, segment_ids_bs=cache_segments_bs, index=slot + t
        )
        return self.final_norm(x_btd), new_cache

    def _over_layers(self, layer, x_btd, params_of_layers, layer_caches=None, layers=None):
        """Run `layer(x, (params_of_layer_i, cache_i, is_sliding_i, i)) -> (x, output_i)` over
        the layers; returns (x, the outputs: one per layer with caches, else stacked on a
        leading layers axis, None where the layer outputs None).

        `layer_caches` is None or one pytree per layer. Scanned layers stack them for the
        scan and split them after (copies; unrolled layers update each in place), and take
        `is_sliding_i` as a scanned bool (unrolled ones as a Python bool). Unrolled layers
        slice their params from `params_of_layers`, or take them from `layers`."""
        num_layers = self.num_layers
        if self.scan_layers:
            stacked = None
            if layer_caches is not None:
                stacked = jax.tree.map(lambda *layers: jnp.stack(layers), *layer_caches)
            flags_l = jnp.asarray(self.sliding_layers)
            inputs = (params_of_layers, stacked, flags_l, jnp.arange(num_layers))
            x_btd, stacked = jax.lax.scan(layer, x_btd, inputs)
            if layer_caches is None:
                return x_btd, stacked
            return x_btd, tuple(
                jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(num_layers)
            )
        outputs = []
        for index in range(num_layers):
            if layers is not None:
                params_of_one_layer = layers[index]
            else:
                params_of_one_layer = jax.tree.map(lambda a, i=index: a[i], params_of_layers)
            cache = None if layer_caches is None else layer_caches[index]
            layer_inputs = (params_of_one_layer, cache, self.sliding_layers[index], index)
            x_btd, output = layer(x_btd, layer_inputs)
            outputs.append(output)
        if layer_caches is None:  # stacked, as a scan stacks them
            return x_btd, jax.tree.map(lambda *layers: jnp.stack(layers), *outputs)
        return x_btd, tuple(outputs)

    def logits(self, hidden_btd) -> jax.Array:
        """Next-token logits (B, T, V) in float32."""
        b, t, d = hidden_btd.shape
        hidden_md = hidden_btd.reshape(b * t, d)
        if self.tie_embeddings:
            logits_mv = hidden_md @ self.token_embedding_vd[...].T
        else:
            logits_mv = hidden_md @ self.lm_head_dv[...]
        logits_btv = logits_mv.reshape(b, t, -1)
        logits_btv = constrain(logits_btv, ("batch", "act_seq", "act_vocab"), self.rules).astype(
            jnp.float32
        )
        if self.final_logit_softcap is not None:  # Gemma's tanh(x / c) * c
            cap = self.final_logit_softcap
            logits_btv = jnp.tanh(logits_btv / cap) * cap
        return logits_btv


class LanguageModel:
    """Pure functions of a params pytree for one `ModelConfig`, with low-rank adapters on
    its blocks when `lora` has a rank (`jaxllm.lora`).

    >>> model = LanguageModel(load_config(None, ["preset=tiny"]).model)
    >>> params = model.init(jax.random.key(0))
    >>> logits_btv = model.logits(params, tokens_bt)

    A model with adapters called on params without them (`base_params`) is its base model:
    that is how the RL stages score the reference policy with no second copy of the weights.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        rules: ShardingRules = DEFAULT_RULES,
        lora: LoraConfig | None = None,
    ):
        self.cfg = cfg
        self.rules = rules
        self.lora = lora if lora is not None and lora.rank > 0 else None
        self.dropout_key = None  # set on a training copy (`with_dropout`)
        self.base = self if self.lora is None else LanguageModel(cfg, rules)
        # Shapes only, with logical axes: no mesh applies, also where the model is built
        # under one (a stage's loader, inside `jax.set_mesh`).
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
            abstract = nnx.eval_shape(lambda: Transformer(cfg, rules, nnx.Rngs(0), self.lora))
        self.graphdef, abstract_state = nnx.split(abstract)
        # As TrainState.params holds them: the frozen base as `lora.base_dtype` (`jaxllm.quant`).
        self.abstract_params: Params = nnx.to_pure_dict(abstract_state)
        if self.lora is not None and self.lora.base_dtype != "float32":
            self.abstract_params = jax.eval_shape(
                lambda float_params: store_frozen(float_params, self.lora), self.abstract_params
            )
        self.logical_axes: Params = jax.tree.map(
            tuple,
            nnx.to_pure_dict(nnx.get_partition_spec(abstract_state)),
            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
        )
        self.dtype = jnp.dtype(cfg.dtype)

    def with_heads(self, heads: list[str]) -> LanguageModel:
        """The same backbone with the scalar heads `heads` (e.g. a reward model beside a
        policy with a value head)."""
        if list(heads) == list(self.cfg.scalar_heads):
            return self
        cfg = dataclasses.replace(self.cfg, scalar_heads=list(heads))
        return LanguageModel(cfg, self.rules, self.lora)

    def init(self, key: jax.Array) -> Params:
        """Fresh params, float32 but for a LoRA model's frozen base, which is stored as
        `lora.base_dtype` (`jaxllm.quant`); jit this with out_shardings to create them
        sharded."""
        module = Transformer(self.cfg, self.rules, nnx.Rngs(key), self.lora)
        return store_frozen(nnx.to_pure_dict(nnx.state(module)), self.lora)

    # --- low-rank adapters ------------------------------------------------------------

    def split_trainable(self, tree: Params) -> tuple[Params, Params]:
        """(what trains, what is frozen) of a params-shaped tree (params, their shardings or
        logical axes): without adapters everything trains, (tree, {})."""
        return split_trainable(tree, self.lora)

    def base_params(self, params: Params) -> Params:
        """The params without adapters (the same arrays): the base model's."""
        return strip_adapters(params) if self.lora is not None else params

    def merged_params(self, params: Params) -> Params:
        """The base model's params with every adapter folded in, W + s A B (float32; a
        base stored in another dtype, or quantised, is read as float32 first)."""
        if self.lora is None:
            return params
        merged = merge_adapters(
            params, self.lora.scale, functools.partial(dequantize, dtype=jnp.float32)
        )
        if self.lora.base_dtype == "float32":
            return merged
        return dequantize_params(merged, jnp.float32)

    def sampling_params(self, params: Params) -> Params:
        """Params for a loop that runs the model many times (the sampler), for `self.base`:
        adapters merged, then in the compute dtype."""
        return self.base.compute_params(self.merged_params(params))

    def with_dropout(self, key: jax.Array | None) -> LanguageModel:
        """A copy whose forward passes drop adapter inputs with `key` (inside one traced
        training step); the model itself when there is no adapter dropout."""
        if key is None or self.lora is None or not self.lora.dropout:
            return self
        training = copy.copy(self)
        training.dropout_key = key
        return training

    def compute_params(self, params: Params) -> Params:
        """`params` in the compute dtype. Every model call casts its params; a loop that
        runs the model many times (the sampler's decode loop) casts them once outside it
        instead, since the cast of params already in the compute dtype is free (inside a
        `lax.while_loop` body XLA re-ran the cast of the embedding table at every step).
        A quantised weight stays quantised (its scale cast: it dequantises in the compute
        dtype inside its layer)."""
        return jax.tree.map(lambda p: p.astype(self.dtype), params, is_leaf=is_quantized)

    def _module(self, params: Params) -> Transformer:
        if self.lora is not None and not has_adapters(params):
            return self.base._module(params)
        return nnx.merge(self.graphdef, self.compute_params(params))

    def hidden(
        self,
        params: Params,
        tokens_bt: jax.Array,
        positions_bt: jax.Array | None = None,
        segment_ids_bt: jax.Array | None = None,
        prefix_segment_ids_bt: jax.Array | None = None,
        query_index_bq: jax.Array | None = None,
        key_bounds: KeyBounds | None = None,
    ) -> jax.Array:
        """Final hidden states (B, T, D). Positions default to 0..T-1, segments to one; a
        token also attends to the segment `prefix_segment_ids_bt` names (> 0), if given.
        With `query_index_bq`, only those at these Q columns of each row, (B, Q, D); with
        unrolled layers (`model.scan_layers=false`) the last layer then runs its queries,
        output and MLP at those columns alone (a scalar head read at a few tokens saves
        about 1/L of the FLOPs). `key_bounds`: the rows' keys lie within them
        (`attention.KeyBounds`: a shared prompt and its replies), so the XLA attention may
        read them block by block; the result is the same."""
        return self.hidden_and_router_stats(
            params,
            tokens_bt,
            positions_bt,
            segment_ids_bt,
            prefix_segment_ids_bt,
            query_index_bq,
            key_bounds,
        )[0]

    def hidden_and_router_stats(
        self,
        params: Params,
        tokens_bt,
        positions_bt=None,
        segment_ids_bt=None,
        prefix_segment_ids_bt=None,
        query_index_bq=None,
        key_bounds: KeyBounds | None = None,
    ) -> tuple[jax.Array, RouterStats | None]:
        """(final hidden states (B, T, D), the MoE layers' `RouterStats` over the tokens of
        segments > 0, stacked on a leading layers axis; None for a dense model): what
        `moe.load_balancing_loss` reads. With `query_index_bq`: (`hidden`'s (B, Q, D), None)."""
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
        if segment_ids_bt is None:
            segment_ids_bt = jnp.ones_like(tokens_bt)
        module = self._module(params)
        return module(
            tokens_bt,
            positions_bt,
            segment_ids_bt,
            dropout_key=self.dropout_key,
            prefix_segment_ids_bt=prefix_segment_ids_bt,
            query_index_bq=query_index_bq,
            # Other backends (cuDNN's fused attention) take the whole row's mask.
            key_bounds=key_bounds if self.cfg.attention == "xla" else None,
        )

    def logits_from_hidden(self, params: Params, hidden_btd: jax.Array) -> jax.Array:
        return self._module(params).logits(hidden_btd)

    def logits(
        self,
        params: Params,
        tokens_bt,
        positions_bt=None,
        segment_ids_bt=None,
        prefix_segment_ids_bt=None,
    ):
        """Next-token logits (B, T, V), float32 (arguments as `hidden`'s)."""
        hidden_btd = self.hidden(
            params, tokens_bt, positions_bt, segment_ids_bt, prefix_segment_ids_bt
        )
        return self.logits_from_hidden(params, hidden_btd)

    def init_cache(self, batch_size: int, num_slots: int, chunk_slots: int = 0) -> KVCache:
        """An empty cache of `num_slots` positions in the compute dtype. A decode step reads
        it `chunk_slots` at a time up to the last filled slot (0: all slots in one pass)."""
        cfg = self.cfg
        chunk_slots = chunk_slots or num_slots
        if num_slots % chunk_slots:
            raise ValueError(f"num_slots={num_slots} is not a multiple of {chunk_slots=}")
        shape = (batch_size, cfg.num_kv_heads, num_slots, cfg.resolved_head_dim)

        def empty():
            return tuple(
                constrain(jnp.zeros(shape, self.dtype), CACHE_AXES, self.rules)
                for _ in range(cfg.num_layers)
            )

        return KVCache(
            keys=empty(),
            values=empty(),
            segment_ids_bs=jnp.zeros((batch_size, num_slots), jnp.int32),
            index=jnp.zeros((), jnp.int32),
            chunk_slots=chunk_slots,
        )

    def layer_params(self, params: Params) -> tuple:
        """Each layer's params (compute dtype), sliced from the stacked ones, for
        `*_with_cache(..., layers=)` of a model with unrolled layers: a loop that runs the
        model many times (the sampler's decode loop) then slices them once, not at every
        step (on the CPU that cost 5% of a decode step)."""
        if self.cfg.scan_layers:
            raise ValueError("layer_params serves unrolled layers (model.scan_layers=false)")
        _, stacked = nnx.split(self._module(params).blocks)
        return tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(self.cfg.num_layers))

    def hidden_with_cache(
        self, params: Params, tokens_bt, positions_bt, segment_ids_bt, cache: KVCache, layers=None
    ) -> tuple[jax.Array, KVCache]:
        """Final hidden states (B, T, D) of tokens that extend what `cache` holds, and the
        new cache. `layers`: `layer_params(params)`, if the caller has them."""
        return self._module(params)(tokens_bt, positions_bt, segment_ids_bt, cache, layers)

    def logits_with_cache(
        self, params: Params, tokens_bt, positions_bt, segment_ids_bt, cache: KVCache, layers=None
    ) -> tuple[jax.Array, KVCache]:
        """Logits (B, T, V) of tokens that extend what `cache` holds, and the new cache."""
        hidden_btd, cache = self.hidden_with_cache(
            params, tokens_bt, positions_bt, segment_ids_bt, cache, layers
        )
        return self.logits_from_hidden(params, hidden_btd), cache

    def scalar_head(self, params: Params, name: str, hidden_btd: jax.Array) -> jax.Array:
        """One float32 number per token, (B, T), from the scalar head `name`."""
        return self._module(params).heads[name](hidden_btd).astype(jnp.float32)

    def param_count(self) -> int:
        """Number of parameters (a tied embedding counted once)."""
        leaves = jax.tree.leaves(self.abstract_params, is_leaf=is_quantized)
        return sum(math.prod(leaf.shape) for leaf in leaves)

    def active_param_count(self) -> int:
        """Parameters one token runs through: all of them, less the experts a token is not
        routed to (num_experts - experts_per_token of each MoE layer's)."""
        cfg = self.cfg
        if not cfg.num_experts:
            return self.param_count()
        mlp = self.abstract_params["blocks"]["mlp"]
        experts = sum(
            math.prod(mlp[name].shape) for name in ("w_gate_edf", "w_up_edf", "w_down_efd")
        )
        idle = cfg.num_experts - cfg.experts_per_token
        return self.param_count() - experts * idle // cfg.num_experts

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, 4N + 2N_t + 12·L·H·Q·T (PaLM, appendix B: 6N when
        everything trains), T summed over the layers as the keys each attends to
        (min(T, window) in a sliding layer).

        N counts the parameters that take part in a token's matmuls: the active ones (a
        mixture of experts' routed experts only), less the input embedding table when it is
        not tied to the output head (a lookup is not a matmul). Each costs 2 FLOPs forward
        and 2 backward through its input; N_t of them, those that train, 2 more for their
        gradient: N_t = N without adapters, the adapters and heads (and trained tied
        embeddings) with them (an expert's adapters counted whole).
        """
        cfg = self.cfg
        lookup = (
            0 if cfg.tie_embeddings else math.prod(self.abstract_params["token_embedding_vd"].shape)
        )
        n = self.active_param_count() - lookup
        trained = n
        if self.lora is not None:
            trainable, _ = self.split_trainable(self.abstract_params)
            trained = sum(leaf.size for leaf in jax.tree.leaves(trainable))
            if "token_embedding_vd" in trainable:
                trained -= lookup
        # Q: the keys a query attends to, at most the window in a sliding layer.
        keys = sum(min(seq_len, cfg.sliding_window) if s else seq_len for s in cfg.sliding_layers)
        return 4.0 * n + 2.0 * trained + 12.0 * cfg.num_heads * cfg.resolved_head_dim * keys
