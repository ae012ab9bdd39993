"""A Llama-style decoder-only transformer in Flax NNX, used through a functional boundary.

Features:
- RMSNorm, rotary positions (per-token positions, so packed documents restart at 0),
  grouped-query attention, SwiGLU MLP; tied or untied input/output embeddings;
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

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name

from jaxllm.attention import apply_rotary, dot_product_attention, rotary_tables, segment_mask
from jaxllm.config import ModelConfig
from jaxllm.sharding import DEFAULT_RULES, ShardingRules, constrain

Params = dict[str, Any]

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}


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
    def __init__(self, dim: int, eps: float, rngs: nnx.Rngs):
        self.scale_d = _param(rngs, (dim,), ("embed",), None)
        self.eps = eps

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        x32 = x_btd.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale_d[...]).astype(x_btd.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rules: ShardingRules, rngs: nnx.Rngs):
        d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
        self.wq_dnh = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), cfg.init_std)
        self.wk_dkh = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg.init_std)
        self.wv_dkh = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg.init_std)
        self.wo_nhd = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), out_std)
        self.head_dim = h
        self.backend = cfg.attention
        self.rules = rules

    def __call__(self, x_btd, sin_cos, mask_b1ts, cache=None):
        """Self-attention over the row, or, with `cache = (k_bskh, v_bskh, slot)`, over the
        cache after writing this call's keys and values at slots [slot, slot + T).

        Returns (B, T, D), and the updated (k_bskh, v_bskh) when a cache was given."""
        b, t, d = x_btd.shape
        x_md = x_btd.reshape(b * t, d)  # M = B*T rows: 2-D matmuls are every backend's fast path
        q = (x_md @ self.wq_dnh[...].reshape(d, -1)).reshape(b, t, -1, self.head_dim)
        k = (x_md @ self.wk_dkh[...].reshape(d, -1)).reshape(b, t, -1, self.head_dim)
        v = (x_md @ self.wv_dkh[...].reshape(d, -1)).reshape(b, t, -1, self.head_dim)
        q = constrain(q, ("batch", "act_seq", "act_heads", None), self.rules)
        k = constrain(k, ("batch", "act_seq", "act_kv_heads", None), self.rules)
        q, k = apply_rotary(q, sin_cos), apply_rotary(k, sin_cos)
        if cache is None:
            out_btnh = dot_product_attention(q, k, v, mask_b1ts, backend=self.backend)
            new_cache = None
        else:
            k_cache, v_cache, slot = cache
            k_cache = jax.lax.dynamic_update_slice(
                k_cache, k.astype(k_cache.dtype), (0, slot, 0, 0)
            )
            v_cache = jax.lax.dynamic_update_slice(
                v_cache, v.astype(v_cache.dtype), (0, slot, 0, 0)
            )
            out_btnh = dot_product_attention(
                q, k_cache, v_cache, mask_b1ts, backend=self.backend, is_causal=False
            )
            new_cache = (k_cache, v_cache)
        out_btnh = checkpoint_name(out_btnh, "attention_out")
        out_md = out_btnh.reshape(b * t, -1) @ self.wo_nhd[...].reshape(-1, d)
        out_btd = out_md.reshape(b, t, d)
        return out_btd if cache is None else (out_btd, new_cache)


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, rules: ShardingRules, rngs: nnx.Rngs):
        d, f = cfg.embed_dim, cfg.mlp_dim
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
        self.w_gate_df = _param(rngs, (d, f), ("embed", "mlp"), cfg.init_std)
        self.w_up_df = _param(rngs, (d, f), ("embed", "mlp"), cfg.init_std)
        self.w_down_fd = _param(rngs, (f, d), ("mlp", "embed"), out_std)
        self.rules = rules

    def __call__(self, x_btd):
        b, t, d = x_btd.shape
        x_md = x_btd.reshape(b * t, d)
        gate_mf = x_md @ self.w_gate_df[...]
        up_mf = x_md @ self.w_up_df[...]
        hidden_mf = constrain(jax.nn.silu(gate_mf) * up_mf, ("batch", "act_mlp"), self.rules)
        return (hidden_mf @ self.w_down_fd[...]).reshape(b, t, d)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rules: ShardingRules, rngs: nnx.Rngs):
        self.attention_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, rngs)
        self.attention = Attention(cfg, rules, rngs)
        self.mlp_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, rngs)
        self.mlp = SwiGLU(cfg, rules, rngs)
        self.rules = rules

    def __call__(self, x_btd, sin_cos, mask_b1ts, cache=None):
        with jax.named_scope("attention"):
            attended = self.attention(self.attention_norm(x_btd), sin_cos, mask_b1ts, cache)
            if cache is not None:
                attended, cache = attended
            x_btd = x_btd + attended
        with jax.named_scope("mlp"):
            x_btd = x_btd + self.mlp(self.mlp_norm(x_btd))
        x_btd = constrain(x_btd, ("batch", "act_seq", "act_embed"), self.rules)
        return x_btd if cache is None else (x_btd, cache)


class ScalarHead(nnx.Module):
    """A linear map from the final hidden state to one number per token (value, reward)."""

    def __init__(self, dim: int, rngs: nnx.Rngs):
        self.w_d = _param(rngs, (dim,), ("embed",), dim**-0.5)
        self.bias = nnx.Param(jnp.zeros((), jnp.float32), out_sharding=(), eager_sharding=False)

    def __call__(self, hidden_btd):
        return jnp.einsum("btd,d->bt", hidden_btd, self.w_d[...]) + self.bias[...]


@struct.dataclass
class KVCache:
    """Keys and values of every layer for `S` slots, and which segment fills each slot.

    Slots are written left to right; `index` is the next free one. Segment id 0 marks an
    empty (or padding) slot, which no query attends to.
    """

    k_lbskh: jax.Array  # (L, B, S, K, H)
    v_lbskh: jax.Array  # (L, B, S, K, H)
    segment_ids_bs: jax.Array  # (B, S) int32
    index: jax.Array  # int32 scalar


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rules: ShardingRules, rngs: nnx.Rngs):
        self.token_embedding_vd = _param(
            rngs, (cfg.vocab_size, cfg.embed_dim), ("vocab", "embed"), cfg.init_std
        )

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stacked_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rules, rngs)

        self.blocks = stacked_blocks(rngs)
        self.final_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, rngs)
        if not cfg.tie_embeddings:
            self.lm_head_dv = _param(
                rngs, (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"), cfg.init_std
            )
        self.heads = nnx.Dict({name: ScalarHead(cfg.embed_dim, rngs) for name in cfg.scalar_heads})
        self.tie_embeddings = cfg.tie_embeddings
        self.remat = cfg.remat
        self.scan_layers = cfg.scan_layers
        self.num_layers = cfg.num_layers
        self.head_dim = cfg.resolved_head_dim
        self.rope_theta = cfg.rope_theta
        self.rules = rules

    def __call__(self, tokens_bt, positions_bt, segment_ids_bt, cache: KVCache | None = None):
        """Final normalised hidden states (B, T, D); with a cache, also the updated cache.

        Without a cache the row attends to itself, causally within each segment. With one,
        this call's tokens fill slots [cache.index, cache.index + T) and attend to every
        filled slot of their segment up to their own.
        """
        # Gather the table whole before the lookup (as FSDP gathers every weight): a gather
        # from a vocab-sharded table makes XLA replicate it the slow way.
        table_vd = constrain(self.token_embedding_vd[...], (None, "act_embed"), self.rules)
        x_btd = jnp.take(table_vd, tokens_bt, axis=0)
        x_btd = constrain(x_btd, ("batch", "act_seq", "act_embed"), self.rules)
        # Shared by every layer: rotary angles and which keys each query may see.
        sin_cos = rotary_tables(positions_bt, self.head_dim, self.rope_theta)
        block_graphdef, block_params = nnx.split(self.blocks)
        if cache is None:
            mask_b1ts = segment_mask(segment_ids_bt, segment_ids_bt)

            def layer(x_btd, params_of_one_layer):
                block = nnx.merge(block_graphdef, params_of_one_layer)
                return block(x_btd, sin_cos, mask_b1ts), None

            if self.remat != "none":
                layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
            x_btd, _ = self._over_layers(layer, x_btd, block_params)
            return self.final_norm(x_btd)

        t, slot = tokens_bt.shape[1], cache.index
        cache_segments_bs = jax.lax.dynamic_update_slice(
            cache.segment_ids_bs, segment_ids_bt, (0, slot)
        )
        query_slots_t = slot + jnp.arange(t)
        key_slots_s = jnp.arange(cache_segments_bs.shape[1])
        mask_b1ts = segment_mask(segment_ids_bt, cache_segments_bs) & (
            key_slots_s[None, None, None, :] <= query_slots_t[None, None, :, None]
        )

        def cached_layer(x_btd, layer_inputs):
            params_of_one_layer, k_bskh, v_bskh = layer_inputs
            block = nnx.merge(block_graphdef, params_of_one_layer)
            return block(x_btd, sin_cos, mask_b1ts, (k_bskh, v_bskh, slot))

        x_btd, (k_lbskh, v_lbskh) = self._over_layers(
            cached_layer, x_btd, (block_params, cache.k_lbskh, cache.v_lbskh)
        )
        new_cache = KVCache(k_lbskh, v_lbskh, cache_segments_bs, slot + t)
        return self.final_norm(x_btd), new_cache

    def _over_layers(self, layer, x_btd, per_layer_inputs):
        """Run `layer(x, inputs_of_layer_i) -> (x, output_i)` over the stacked layers."""
        if self.scan_layers:
            return jax.lax.scan(layer, x_btd, per_layer_inputs)
        outputs = []
        for index in range(self.num_layers):
            x_btd, output = layer(x_btd, jax.tree.map(lambda a, i=index: a[i], per_layer_inputs))
            outputs.append(output)
        return x_btd, jax.tree.map(lambda *layers: jnp.stack(layers), *outputs)

    def logits(self, hidden_btd) -> jax.Array:
        """Next-token logits (B, T, V) in float32."""
        b, t, d = hidden_btd.shape
        hidden_md = hidden_btd.reshape(b * t, d)
        if self.tie_embeddings:
            logits_mv = hidden_md @ self.token_embedding_vd[...].T
        else:
            logits_mv = hidden_md @ self.lm_head_dv[...]
        logits_btv = logits_mv.reshape(b, t, -1)
        return constrain(logits_btv, ("batch", "act_seq", "act_vocab"), self.rules).astype(
            jnp.float32
        )


class LanguageModel:
    """Pure functions of a params pytree for one `ModelConfig`.

    >>> model = LanguageModel(load_config(None, ["preset=tiny"]).model)
    >>> params = model.init(jax.random.key(0))
    >>> logits_btv = model.logits(params, tokens_bt)
    """

    def __init__(self, cfg: ModelConfig, rules: ShardingRules = DEFAULT_RULES):
        self.cfg = cfg
        self.rules = rules
        abstract = nnx.eval_shape(lambda: Transformer(cfg, rules, nnx.Rngs(0)))
        self.graphdef, abstract_state = nnx.split(abstract)
        self.abstract_params: Params = nnx.to_pure_dict(abstract_state)
        self.logical_axes: Params = jax.tree.map(
            tuple,
            nnx.to_pure_dict(nnx.get_partition_spec(abstract_state)),
            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
        )
        self.dtype = jnp.dtype(cfg.dtype)

    def init(self, key: jax.Array) -> Params:
        """Fresh float32 params; jit this with out_shardings to create them sharded."""
        return nnx.to_pure_dict(nnx.state(Transformer(self.cfg, self.rules, nnx.Rngs(key))))

    def _module(self, params: Params) -> Transformer:
        compute_params = jax.tree.map(lambda p: p.astype(self.dtype), params)
        return nnx.merge(self.graphdef, compute_params)

    def hidden(
        self,
        params: Params,
        tokens_bt: jax.Array,
        positions_bt: jax.Array | None = None,
        segment_ids_bt: jax.Array | None = None,
    ) -> jax.Array:
        """Final hidden states (B, T, D). Positions default to 0..T-1, segments to one."""
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
        if segment_ids_bt is None:
            segment_ids_bt = jnp.ones_like(tokens_bt)
        return self._module(params)(tokens_bt, positions_bt, segment_ids_bt)

    def logits_from_hidden(self, params: Params, hidden_btd: jax.Array) -> jax.Array:
        return self._module(params).logits(hidden_btd)

    def logits(self, params: Params, tokens_bt, positions_bt=None, segment_ids_bt=None):
        """Next-token logits (B, T, V), float32."""
        hidden_btd = self.hidden(params, tokens_bt, positions_bt, segment_ids_bt)
        return self.logits_from_hidden(params, hidden_btd)

    def init_cache(self, batch_size: int, num_slots: int) -> KVCache:
        """An empty cache of `num_slots` positions in the compute dtype."""
        cfg = self.cfg
        shape = (cfg.num_layers, batch_size, num_slots, cfg.num_kv_heads, cfg.resolved_head_dim)
        axes = ("layers", "batch", "act_seq", "act_kv_heads", None)  # sharded like activations
        return KVCache(
            k_lbskh=constrain(jnp.zeros(shape, self.dtype), axes, self.rules),
            v_lbskh=constrain(jnp.zeros(shape, self.dtype), axes, self.rules),
            segment_ids_bs=jnp.zeros((batch_size, num_slots), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    def logits_with_cache(
        self, params: Params, tokens_bt, positions_bt, segment_ids_bt, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """Logits (B, T, V) of tokens that extend what `cache` holds, and the new cache."""
        module = self._module(params)
        hidden_btd, cache = module(tokens_bt, positions_bt, segment_ids_bt, cache)
        return module.logits(hidden_btd), cache

    def scalar_head(self, params: Params, name: str, hidden_btd: jax.Array) -> jax.Array:
        """One float32 number per token, (B, T), from the scalar head `name`."""
        return self._module(params).heads[name](hidden_btd).astype(jnp.float32)

    def param_count(self) -> int:
        """Number of parameters (a tied embedding counted once)."""
        return sum(leaf.size for leaf in jax.tree.leaves(self.abstract_params))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, 6N + 12·L·H·Q·T (PaLM, appendix B).

        N counts the parameters that take part in matmuls: all of them, less the input
        embedding table when it is not tied to the output head (a lookup is not a matmul).
        """
        cfg = self.cfg
        n = self.param_count()
        if not cfg.tie_embeddings:
            n -= self.abstract_params["token_embedding_vd"].size
        return 6.0 * n + 12.0 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * seq_len
