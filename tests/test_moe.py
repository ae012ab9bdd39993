"""The mixture-of-experts layer against transformers' Qwen3-MoE block and loss, sharded and
unsharded, full and sampling paths, and its gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import skip_if_not_enough_devices
from flax import nnx
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeSparseMoeBlock,
    load_balancing_loss_func,
)

import jaxllm.moe
from jaxllm.config import MeshConfig, ModelConfig
from jaxllm.moe import (
    MoE,
    RouterStats,
    grouped_matmul_blocked,
    grouped_matmul_ragged,
    load_balancing_loss,
)
from jaxllm.sharding import DEFAULT_RULES, make_mesh, named_sharding, tree_shardings

CFG = ModelConfig(
    embed_dim=32,
    num_layers=2,
    num_experts=8,
    experts_per_token=2,
    expert_mlp_dim=16,
    init_std=0.2,
)


def make_moe(cfg: ModelConfig = CFG, seed: int = 0) -> MoE:
    return MoE(cfg, DEFAULT_RULES, nnx.Rngs(seed))


def random_x(shape=(3, 7, 32), seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def hf_block(moe: MoE, cfg: ModelConfig) -> Qwen3MoeSparseMoeBlock:
    """transformers' block with `moe`'s weights (its gate_up_proj is gate rows then up)."""
    hf_config = Qwen3MoeConfig(
        hidden_size=cfg.embed_dim,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.experts_per_token,
        moe_intermediate_size=cfg.expert_mlp_dim,
        norm_topk_prob=cfg.norm_topk_prob,
    )
    block = Qwen3MoeSparseMoeBlock(hf_config).eval()

    def tensor(param):
        return torch.from_numpy(np.array(param[...]))

    with torch.no_grad():
        block.gate.weight.copy_(tensor(moe.w_router_de).T)
        gate_up = torch.cat([tensor(moe.w_gate_edf), tensor(moe.w_up_edf)], dim=2)
        block.experts.gate_up_proj.copy_(gate_up.transpose(1, 2))
        block.experts.down_proj.copy_(tensor(moe.w_down_efd).transpose(1, 2))
    return block


@pytest.mark.parametrize("ragged_dot", [False, True])  # the CPU path, the GPU/TPU path
@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("experts_per_token", [1, 2])
def test_moe_equals_transformers_block(norm_topk_prob, experts_per_token, ragged_dot, monkeypatch):
    monkeypatch.setattr(jaxllm.moe, "has_grouped_matmul", lambda: ragged_dot)
    cfg = dataclasses.replace(
        CFG, norm_topk_prob=norm_topk_prob, experts_per_token=experts_per_token
    )
    moe = make_moe(cfg)
    x_btd = random_x()
    y_btd, _ = moe(x_btd)
    with torch.no_grad():
        expected = hf_block(moe, cfg)(torch.from_numpy(np.array(x_btd))).numpy()
    np.testing.assert_allclose(np.asarray(y_btd), expected, atol=2e-6, rtol=1e-5)


@skip_if_not_enough_devices(8)
def test_grouped_matmuls_equal_per_group_matmuls():
    rows_rd = random_x((40, 32))
    weights_edf = random_x((8, 32, 16), seed=2)
    group_sizes_e = jnp.array([0, 9, 1, 0, 17, 3, 10, 0], jnp.int32)  # empty groups too
    groups = np.split(np.asarray(rows_rd), np.cumsum(group_sizes_e)[:-1])
    expected = np.concatenate([rows @ np.asarray(weights_edf[e]) for e, rows in enumerate(groups)])
    mesh = make_mesh(MeshConfig(1, 1, 8), jax.devices()[:8])
    experts_sharded = named_sharding(mesh, weights_edf.shape, ("expert", "embed", "expert_mlp"))
    for matmul in (grouped_matmul_blocked, grouped_matmul_ragged):
        actual = jax.jit(matmul)(rows_rd, weights_edf, group_sizes_e)
        np.testing.assert_allclose(np.asarray(actual), expected, atol=1e-5, rtol=1e-5)
        with jax.set_mesh(mesh):  # one expert per device
            actual = jax.jit(matmul)(
                rows_rd, jax.device_put(weights_edf, experts_sharded), group_sizes_e
            )
        np.testing.assert_allclose(np.asarray(actual), expected, atol=1e-5, rtol=1e-5)


def layer_logits_and_stats(num_layers: int, mask_bt=None):
    """Per layer: (the router logits (B*T, E) as torch, the layer's RouterStats)."""
    logits, stats = [], []
    for layer in range(num_layers):
        moe = make_moe(seed=layer)
        x_btd = random_x(seed=10 + layer)
        logits_me = x_btd.reshape(-1, 32) @ moe.w_router_de[...]
        logits.append(torch.from_numpy(np.array(logits_me)))
        stats.append(moe(x_btd, mask_bt)[1])
    return logits, stats


@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_equals_transformers(masked):
    mask_bt = None
    if masked:
        mask_bt = jnp.ones((3, 7), bool).at[0, :3].set(False).at[2, 5:].set(False)
    logits, stats = layer_logits_and_stats(3, mask_bt)
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *stats)  # as a layer scan
    expected = load_balancing_loss_func(
        tuple(logits),
        CFG.num_experts,
        CFG.experts_per_token,
        None if mask_bt is None else torch.from_numpy(np.array(mask_bt)).long(),
    )
    actual = load_balancing_loss(stacked, CFG.num_experts)
    np.testing.assert_allclose(float(actual), float(expected), rtol=1e-6)


def test_load_balancing_loss_of_even_routing_is_k():
    stats = RouterStats(
        expert_counts_e=jnp.full((4,), 2.0),  # 4 tokens x k=2 spread evenly over 4 experts
        router_prob_sum_e=jnp.full((4,), 1.0),
        token_count=jnp.array(4.0),
    )
    assert float(load_balancing_loss(stats, 4)) == pytest.approx(2.0)


def test_masked_tokens_leave_stats_unchanged():
    moe = make_moe()
    x_btd = random_x()
    mask_bt = jnp.ones((3, 7), bool).at[1, 4:].set(False)
    _, masked = moe(x_btd, mask_bt)
    _, kept = moe(x_btd[:, :4], None)
    _, others = moe(x_btd[jnp.array([0, 2]), 4:], None)
    total = jax.tree.map(jnp.add, kept, others)
    for name in ("expert_counts_e", "router_prob_sum_e", "token_count"):
        np.testing.assert_allclose(getattr(masked, name), getattr(total, name), rtol=1e-6)
    assert float(masked.token_count) == 18.0


def test_sampling_path_equals_full_path():
    module = make_moe()
    moe = jax.jit(lambda x_btd, sampling=False: module(x_btd, sampling=sampling), static_argnums=1)
    x_btd = random_x((4, 1, 32))  # a decode step: B x 1 tokens
    full, full_stats = moe(x_btd)
    sampled, sampled_stats = moe(x_btd, True)
    np.testing.assert_allclose(np.asarray(sampled), np.asarray(full), atol=1e-6)
    np.testing.assert_array_equal(sampled_stats.expert_counts_e, full_stats.expert_counts_e)
    # decode one token at a time gives each token's full-sequence output
    sequence = random_x((4, 5, 32))
    whole, _ = moe(sequence)
    steps = [moe(sequence[:, i : i + 1], True)[0] for i in range(5)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), np.asarray(whole), atol=1e-6)


def sharded_forward(moe: MoE, mesh_shape: tuple[int, int, int], x_btd, mask_bt):
    """The layer jitted on a (data, fsdp, tensor) mesh, params sharded by their logical axes."""
    graphdef, state = nnx.split(moe)
    params = nnx.to_pure_dict(state)
    logical = jax.tree.map(
        tuple,
        nnx.to_pure_dict(nnx.get_partition_spec(state)),
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
    )
    mesh = make_mesh(MeshConfig(*mesh_shape), jax.devices()[: np.prod(mesh_shape)])
    param_shardings = tree_shardings(mesh, params, logical)
    x_sharding = named_sharding(mesh, x_btd.shape, ("batch", "act_seq", "act_embed"))
    mask_sharding = named_sharding(mesh, mask_bt.shape, ("batch", "act_seq"))

    def forward(params, x_btd, mask_bt):
        module = nnx.merge(graphdef, nnx.State(params))
        return module(x_btd, mask_bt)

    with jax.set_mesh(mesh):
        forward = jax.jit(forward, in_shardings=(param_shardings, x_sharding, mask_sharding))
        placed = jax.device_put(params, param_shardings)
        experts_per_device = placed["w_gate_edf"].addressable_shards[0].data.shape[0]
        assert experts_per_device == moe.w_gate_edf.shape[0] // mesh_shape[2]
        return forward(placed, x_btd, mask_bt)


@skip_if_not_enough_devices(8)
@pytest.mark.parametrize("ragged_dot", [False, True])  # the CPU path, the GPU/TPU path
def test_sharded_experts_equal_unsharded(ragged_dot, monkeypatch):
    monkeypatch.setattr(jaxllm.moe, "has_grouped_matmul", lambda: ragged_dot)
    moe = make_moe()
    x_btd = random_x((4, 6, 32))
    mask_bt = jnp.ones((4, 6), bool).at[3, 2:].set(False)
    expected_y, expected_stats = sharded_forward(moe, (1, 1, 1), x_btd, mask_bt)
    for mesh_shape in [(4, 1, 1), (2, 1, 4), (1, 2, 4), (1, 1, 8)]:
        y, stats = sharded_forward(moe, mesh_shape, x_btd, mask_bt)
        np.testing.assert_allclose(np.asarray(y), np.asarray(expected_y), atol=1e-6)
        for name in ("expert_counts_e", "router_prob_sum_e", "token_count"):
            np.testing.assert_allclose(
                getattr(stats, name), getattr(expected_stats, name), rtol=1e-6
            )


def test_gradients_reach_router_and_experts():
    moe = make_moe()
    graphdef, state = nnx.split(moe)
    x_btd = random_x()
    target_btd = random_x(seed=5)

    def loss(params):
        y_btd, stats = nnx.merge(graphdef, nnx.State(params))(x_btd)
        return jnp.mean((y_btd - target_btd) ** 2) + 0.01 * load_balancing_loss(stats, 8)

    grads = jax.grad(loss)(nnx.to_pure_dict(state))
    for name, grad in grads.items():
        grad = np.asarray(grad)
        assert np.all(np.isfinite(grad)), name
        assert np.abs(grad).max() > 1e-6, name
    # each expert some token reached has its own non-zero gradient
    assert np.all(np.abs(grads["w_down_efd"]).max(axis=(1, 2)) > 0)


def test_config_refuses_bad_expert_counts():
    too_many = dataclasses.replace(CFG, experts_per_token=9).problems()
    assert any("model.experts_per_token=9 must be in 1..8" in line for line in too_many)
    no_width = dataclasses.replace(CFG, expert_mlp_dim=0).problems()
    assert any("model.expert_mlp_dim must be positive" in line for line in no_width)
    assert CFG.problems() == []
    assert ModelConfig().problems() == []  # dense: the expert fields unused


def hf_moe_config(**overrides) -> dict:
    """A tiny Qwen3-MoE config.json as transformers 5 writes it (`num_local_experts`)."""
    from transformers import Qwen3MoeConfig

    fields = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        norm_topk_prob=True,
        router_aux_loss_coef=0.02,
        max_position_embeddings=64,
    )
    return Qwen3MoeConfig(**{**fields, **overrides}).to_dict()


def test_qwen3_moe_config_both_ways():
    from transformers import Qwen3MoeConfig

    from jaxllm.models import family_of_architecture

    hf = hf_moe_config()
    assert hf["num_local_experts"] == 4 and "num_experts" not in hf
    qwen3_moe = family_of_architecture("Qwen3MoeForCausalLM")
    cfg, _ = qwen3_moe.config_from_hf(hf)
    assert (cfg.num_experts, cfg.experts_per_token, cfg.expert_mlp_dim) == (4, 2, 16)
    assert cfg.norm_topk_prob and cfg.router_aux_loss_coef == 0.02 and cfg.qk_norm
    exported = Qwen3MoeConfig(**qwen3_moe.config_to_hf(cfg))
    for field in (
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "norm_topk_prob",
        "router_aux_loss_coef",
        "decoder_sparse_step",
        "mlp_only_layers",
        "hidden_size",
        "head_dim",
    ):
        assert getattr(exported, field) == getattr(Qwen3MoeConfig(**hf), field), field
    # an earlier config's `num_experts`, and transformers' defaults for absent fields
    earlier = {k: v for k, v in hf.items() if k not in ("num_local_experts", "norm_topk_prob")}
    cfg, _ = qwen3_moe.config_from_hf({**earlier, "num_experts": 8})
    assert cfg.num_experts == 8 and cfg.norm_topk_prob is False


@pytest.mark.parametrize(("field", "value"), [("mlp_only_layers", [1]), ("decoder_sparse_step", 2)])
def test_qwen3_moe_refuses_dense_layers(field, value):
    from jaxllm.hf.convert import HFConversionError
    from jaxllm.models import family

    with pytest.raises(HFConversionError, match=f"config.json {field}="):
        family("qwen3_moe").config_from_hf(hf_moe_config(**{field: value}))


def test_qwen3_moe_tensor_names_are_save_pretrained_names(tmp_path):
    from safetensors import safe_open
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from jaxllm.models import family

    hf = hf_moe_config()
    Qwen3MoeForCausalLM(Qwen3MoeConfig(**hf)).save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "np") as saved:
        saved_names = set(saved.keys())
    qwen3_moe = family("qwen3_moe")
    cfg, _ = qwen3_moe.config_from_hf(hf)
    stacked_shape = (cfg.num_layers, cfg.num_experts)  # the axes the names count
    names = {name for m in qwen3_moe.tensor_maps(cfg) for name in m.hf_names(stacked_shape)}
    assert names == saved_names
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in names
