"""A dropless mixture-of-experts MLP (Qwen3-MoE's sparse block) and its load-balancing loss.

Features:
- a linear router, softmax in float32, each token sent to its top `experts_per_token`
  experts, the k weights renormalised to sum to 1 when `norm_topk_prob` (as transformers'
  `Qwen3MoeSparseMoeBlock`), then cast to the compute dtype;
- SwiGLU experts stacked on a leading `expert` logical axis, which the sharding rules map to
  the `tensor` mesh axis (expert parallelism);
- dropless: every token reaches all of its k experts, no capacity and no token dropped. The
  (token, expert) assignments are sorted by expert and each projection is one grouped
  matmul over the experts' rows: `jax.lax.ragged_dot` on GPU and TPU (and wherever the
  experts are sharded), a `BlockLayout` of rows on CPU (where ragged_dot costs E dense
  matmuls);
- `RouterStats`, the per-layer sums the load-balancing loss needs; they add over layers,
  micro-batches and data shards, and `load_balancing_loss` turns them into transformers'
  `load_balancing_loss_func` value.

Shape letters: B batch, T sequence, D embed, E experts, K experts per token,
F expert hidden width, M tokens (B*T), R assignments (M*K), G blocks, P rows in blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxllm.activations import gated
from jaxllm.config import LoraConfig, ModelConfig
from jaxllm.lora import adapter_key, adapter_of
from jaxllm.sharding import ShardingRules, constrain, unsharded

# Bounds on a BlockLayout's rows per block.
MIN_BLOCK_ROWS = 8
MAX_BLOCK_ROWS = 128


@struct.dataclass
class RouterStats:
    """What the load-balancing loss reads from one MoE layer, summed over its unmasked
    tokens. Fields add elementwise over layers (a scan stacks them on a leading L axis,
    which `load_balancing_loss` sums), micro-batches and data shards."""

    expert_counts_e: jax.Array  # (..., E) top-k selections of each expert, all k slots
    router_prob_sum_e: jax.Array  # (..., E) router probabilities of each expert, summed
    token_count: jax.Array  # (...,) tokens counted


def load_balancing_loss(stats: RouterStats, num_experts: int) -> jax.Array:
    """Switch Transformer's auxiliary loss as transformers' `load_balancing_loss_func`.

    With n the tokens counted over all layers (L x unmasked tokens), c_e the top-k
    selections of expert e and p_e the summed router probabilities of e over them:

        loss = E * sum_e (c_e / n) * (p_e / n)

    equal to transformers' value for the same layers' router logits and attention mask
    (it concatenates every layer's tokens). K when routing is even (every c_e = n K / E,
    every p_e = n / E); larger the more a few experts take.

    Leading axes of `stats` (layers) are summed. Returns a float32 scalar; gradients reach
    the router through p_e only (the top-k choice has none).
    """
    counts_e = stats.expert_counts_e.reshape(-1, num_experts).sum(axis=0)
    prob_sum_e = stats.router_prob_sum_e.reshape(-1, num_experts).sum(axis=0)
    tokens = jnp.sum(stats.token_count)
    return num_experts * jnp.sum(counts_e * prob_sum_e) / (tokens * tokens)


@struct.dataclass
class BlockLayout:
    """Rows sorted by group (group e: the next group_sizes_e[e] rows) placed in blocks of
    `block_rows` rows, each group padded with zero rows to whole blocks, so that every block
    belongs to one group and a grouped matmul is one batched matmul over the blocks.

    XLA:CPU has no grouped matmul: jax lowers `jax.lax.ragged_dot` there to a dense matmul
    against every group with the other groups' rows masked to zero, E times the work
    (`experiments/bench_moe.py` measures it). Blocks waste at most E * (block_rows - 1)
    padding rows instead, and are exact: padding rows are dropped on the way back.

    The layer uses blocks only while the experts are whole on each device: with the experts
    sharded, XLA would assemble the per-block weights (G, D, F) with an all-reduce, about
    the experts' whole volume per matmul (seen in the compiled HLO), where `ragged_dot`
    runs each device's own experts and all-reduces the (R, F) and (R, D) activations.
    """

    padded_row_r: jax.Array  # (R,) where sorted row r sits among the G * block_rows rows
    group_of_block_g: jax.Array  # (G,) the group each block belongs to
    block_rows: int = struct.field(pytree_node=False)

    @classmethod
    def for_groups(cls, group_sizes_e: jax.Array, num_rows: int) -> BlockLayout:
        """Blocks of a power of two near the mean group size, within [8, 128] rows: enough
        rows for an efficient matmul, few enough to bound the padding."""
        num_groups = group_sizes_e.shape[0]
        mean_rows = -(-num_rows // num_groups)
        block_rows = min(MAX_BLOCK_ROWS, max(MIN_BLOCK_ROWS, 1 << (mean_rows - 1).bit_length()))
        num_blocks = -(-(num_rows + num_groups * (block_rows - 1)) // block_rows)
        padded_sizes_e = -(-group_sizes_e // block_rows) * block_rows
        padded_ends_e = jnp.cumsum(padded_sizes_e)
        group_starts_e = jnp.cumsum(group_sizes_e) - group_sizes_e
        group_of_row_r = jnp.repeat(
            jnp.arange(num_groups), group_sizes_e, total_repeat_length=num_rows
        )
        padded_row_r = (
            (padded_ends_e - padded_sizes_e)[group_of_row_r]
            + jnp.arange(num_rows)
            - group_starts_e[group_of_row_r]
        )
        # Blocks past the last group hold only zero rows; any group's weights will do.
        group_of_block_g = jnp.minimum(
            jnp.searchsorted(padded_ends_e, jnp.arange(num_blocks) * block_rows, side="right"),
            num_groups - 1,
        )
        return cls(padded_row_r, group_of_block_g, block_rows)

    def pad(self, rows_rd: jax.Array) -> jax.Array:
        """(G * block_rows, D): the sorted rows in their blocks, zero rows between groups."""
        num_padded = self.group_of_block_g.shape[0] * self.block_rows
        padded_pd = jnp.zeros((num_padded, rows_rd.shape[1]), rows_rd.dtype)
        return padded_pd.at[self.padded_row_r].set(rows_rd)

    def unpad(self, rows_pd: jax.Array) -> jax.Array:
        """(R, D): the sorted rows back, the padding dropped."""
        return rows_pd[self.padded_row_r]

    def matmul(self, rows_pd: jax.Array, weights_edf: jax.Array) -> jax.Array:
        """(G * block_rows, F): each padded row times its group's (D, F) weights."""
        blocks_gbd = rows_pd.reshape(-1, self.block_rows, rows_pd.shape[1])
        out_gbf = jnp.einsum("gbd,gdf->gbf", blocks_gbd, weights_edf[self.group_of_block_g])
        return out_gbf.reshape(rows_pd.shape[0], -1)


def grouped_matmul_blocked(rows_rd: jax.Array, weights_edf: jax.Array, group_sizes_e: jax.Array):
    """(R, F): rows_rd[r] @ weights_edf[e] for the group e that sorted row r falls in,
    through a `BlockLayout` (the CPU path)."""
    layout = BlockLayout.for_groups(group_sizes_e, rows_rd.shape[0])
    return layout.unpad(layout.matmul(layout.pad(rows_rd), weights_edf))


def grouped_matmul_ragged(rows_rd: jax.Array, weights_edf: jax.Array, group_sizes_e: jax.Array):
    """`grouped_matmul_blocked`'s result by `jax.lax.ragged_dot`, one grouped matmul on GPU
    and TPU (the path there)."""
    return jax.lax.ragged_dot(rows_rd, weights_edf, group_sizes_e)


def has_grouped_matmul() -> bool:
    """Whether the default backend runs `jax.lax.ragged_dot` as one grouped matmul (GPU,
    TPU). XLA:CPU does not; the layer uses a `BlockLayout` there, experts unsharded."""
    return jax.default_backend() != "cpu"


def _param(
    rngs: nnx.Rngs, shape: tuple[int, ...], logical_axes: tuple[str, ...], std: float
) -> nnx.Param:
    """A float32 parameter drawn from normal(0, std), with its logical axes."""
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, out_sharding=logical_axes, eager_sharding=False)


class MoE(nnx.Module):
    """Qwen3-MoE's sparse MLP block: a router and `num_experts` SwiGLU experts.

    For token x (D,), router probabilities p = softmax(x W_router) in float32, its experts
    S = top-k(p), weights w_e = p_e (divided by sum_{s in S} p_s when `norm_topk_prob`) in
    the compute dtype, and

        y = sum_{e in S} w_e * (silu(x W_gate[e]) * (x W_up[e])) W_down[e]

    Departs from transformers in one place: the router logits are computed in float32 (the
    router weights and inputs upcast), where transformers computes them in the compute
    dtype; identical in float32.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        rules: ShardingRules,
        rngs: nnx.Rngs,
        lora: LoraConfig | None = None,
    ):
        d, e, f = cfg.embed_dim, cfg.num_experts, cfg.expert_mlp_dim
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
        self.w_router_de = _param(rngs, (d, e), ("embed", "expert"), cfg.init_std)
        self.w_gate_edf = _param(rngs, (e, d, f), ("expert", "embed", "expert_mlp"), cfg.init_std)
        self.w_up_edf = _param(rngs, (e, d, f), ("expert", "embed", "expert_mlp"), cfg.init_std)
        self.w_down_efd = _param(rngs, (e, f, d), ("expert", "expert_mlp", "embed"), out_std)
        # Each expert's own low-rank adapters (`jaxllm.lora`), None where not targeted.
        embed, mlp = ("embed",), ("expert_mlp",)
        self.gate_lora = adapter_of(lora, "gate", (d,), embed, (f,), mlp, rngs, experts=e)
        self.up_lora = adapter_of(lora, "up", (d,), embed, (f,), mlp, rngs, experts=e)
        self.down_lora = adapter_of(lora, "down", (f,), mlp, (d,), embed, rngs, experts=e)
        self.experts_per_token = cfg.experts_per_token
        self.norm_topk_prob = cfg.norm_topk_prob
        self.rules = rules

    def __call__(
        self,
        x_btd: jax.Array,
        token_mask_bt: jax.Array | None = None,
        sampling: bool = False,
        key: jax.Array | None = None,
    ) -> tuple[jax.Array, RouterStats]:
        """((B, T, D) in x's dtype, this layer's `RouterStats` over the tokens where
        `token_mask_bt` (B, T) is true, default all). `sampling` (a decode or prefill step),
        with the expert_mlp axis unsharded: one grouped matmul for gate and up. `key`: the
        adapters' dropout key (None: no dropout)."""
        b, t, d = x_btd.shape
        k = self.experts_per_token
        num_experts = self.w_router_de.shape[1]
        x_md = x_btd.reshape(b * t, d)
        with jax.named_scope("router"):
            logits_me = x_md.astype(jnp.float32) @ self.w_router_de[...].astype(jnp.float32)
            probs_me = jax.nn.softmax(logits_me, axis=-1)
            top_probs_mk, experts_mk = jax.lax.top_k(probs_me, k)
            if self.norm_topk_prob:
                top_probs_mk = top_probs_mk / jnp.sum(top_probs_mk, axis=-1, keepdims=True)
            weights_mk = top_probs_mk.astype(x_btd.dtype)
        with jax.named_scope("experts"):
            # Assignment r = token * K + slot; sorted by expert, each expert's rows adjoin.
            experts_r = experts_mk.reshape(-1)
            order_r = jnp.argsort(experts_r, stable=True)
            token_of_r = order_r // k
            group_sizes_e = jnp.bincount(experts_r, length=num_experts).astype(jnp.int32)
            rows_rd = x_md[token_of_r]
            if has_grouped_matmul() or not unsharded(self.rules, "expert"):
                matmul = functools.partial(jax.lax.ragged_dot, group_sizes=group_sizes_e)
                out_rd = self._experts(rows_rd, matmul, sampling, key)
            else:
                layout = BlockLayout.for_groups(group_sizes_e, rows_rd.shape[0])
                padded_pd = layout.pad(rows_rd)
                out_rd = layout.unpad(self._experts(padded_pd, layout.matmul, sampling, key))
            weighted_rd = out_rd * weights_mk.reshape(-1)[order_r][:, None]
            y_md = jnp.zeros_like(x_md).at[token_of_r].add(weighted_rd)
        y_btd = constrain(y_md.reshape(b, t, d), ("batch", "act_seq", "act_embed"), self.rules)
        if token_mask_bt is None:
            mask_m = jnp.ones((b * t,), jnp.float32)
        else:
            mask_m = token_mask_bt.reshape(-1).astype(jnp.float32)
        stats = RouterStats(
            expert_counts_e=jnp.zeros((num_experts,), jnp.float32)
            .at[experts_r]
            .add(jnp.repeat(mask_m, k)),
            router_prob_sum_e=mask_m @ probs_me,
            token_count=jnp.sum(mask_m),
        )
        return y_btd, stats

    def _experts(self, rows_pd: jax.Array, grouped_matmul, sampling: bool, key=None) -> jax.Array:
        """(P, D): each row through its expert's SwiGLU (and adapters); `grouped_matmul(rows,
        weights_edf)` multiplies each row by its own expert's weights."""
        if sampling and unsharded(self.rules, "expert_mlp"):
            gate_up_edf = jnp.concatenate([self.w_gate_edf[...], self.w_up_edf[...]], axis=2)
            gate_pf, up_pf = jnp.split(grouped_matmul(rows_pd, gate_up_edf), 2, axis=1)
        else:
            gate_pf = grouped_matmul(rows_pd, self.w_gate_edf[...])
            up_pf = grouped_matmul(rows_pd, self.w_up_edf[...])
        if self.gate_lora is not None:
            gate_pf = gate_pf + self.gate_lora.grouped(rows_pd, grouped_matmul, adapter_key(key, 0))
        if self.up_lora is not None:
            up_pf = up_pf + self.up_lora.grouped(rows_pd, grouped_matmul, adapter_key(key, 1))
        hidden_pf = gated("silu", gate_pf, up_pf)
        out_pd = grouped_matmul(hidden_pf, self.w_down_efd[...])
        if self.down_lora is not None:
            out_pd = out_pd + self.down_lora.grouped(hidden_pf, grouped_matmul, adapter_key(key, 2))
        return out_pd
