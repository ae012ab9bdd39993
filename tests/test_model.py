"""Model numerics: packing isolation, rotary positions, remat, dtype policy, FLOPs."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_config

from jaxllm.attention import (
    KeyBounds,
    rotary_embedding,
    rotary_inverse_frequencies,
    rotary_tables,
    segment_mask,
)
from jaxllm.losses import lm_batch_from_rows, token_cross_entropy
from jaxllm.model import Block, LanguageModel, LayerCache
from jaxllm.sharding import DEFAULT_RULES
from jaxllm.steps import causal_lm_loss


@pytest.fixture(scope="module")
def tiny():
    model = LanguageModel(tiny_config().model)
    return model, model.init(jax.random.key(0))


def per_token_losses(model, params, rows, segments=None):
    batch = lm_batch_from_rows(rows, segments)
    logits = model.logits(params, batch["tokens"], batch["positions"], batch["segment_ids"])
    return np.asarray(token_cross_entropy(logits, batch["targets"])), batch["loss_mask"]


def test_packed_documents_give_the_losses_of_each_document_alone(tiny):
    model, params = tiny
    rng = np.random.default_rng(1)
    doc_a, doc_b = rng.integers(0, 264, 10), rng.integers(0, 264, 14)
    packed = np.concatenate([doc_a, doc_b, [263]])[None]
    segments = np.array([[1] * 10 + [2] * 14 + [0]])

    packed_losses, mask = per_token_losses(model, params, packed, segments)
    alone_a, _ = per_token_losses(model, params, doc_a[None])
    alone_b, _ = per_token_losses(model, params, doc_b[None])

    np.testing.assert_allclose(packed_losses[0, :9], alone_a[0], rtol=1e-5)
    np.testing.assert_allclose(packed_losses[0, 10:23], alone_b[0], rtol=1e-5)
    assert mask[0].tolist() == [1.0] * 9 + [0.0] + [1.0] * 13 + [0.0]

    # Control: without segment ids document B sees A, and its losses change.
    unsegmented, _ = per_token_losses(model, params, packed)
    assert not np.allclose(unsegmented[0, 10:23], alone_b[0], rtol=1e-3)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_the_gated_core_has_autodiffs_gradient(activation):
    """`gated`'s own backward (the gate's act and act' recomputed) against autodiff's, in
    float32 and bfloat16, and under remat: the same gradients to rounding."""
    from jaxllm.activations import MLP_ACTIVATIONS, gated

    gate, up, weights = (jax.random.normal(jax.random.key(i), (6, 40)) * 3 for i in range(3))

    def loss(fn, gate, up):
        return jnp.sum(jnp.sin(fn(gate, up)) * weights)

    def autodiff(gate, up):
        return MLP_ACTIVATIONS[activation](gate) * up

    ours = functools.partial(gated, activation)
    for dtype, rtol in ((jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)):
        args = (gate.astype(dtype), up.astype(dtype))
        want = jax.grad(functools.partial(loss, autodiff), argnums=(0, 1))(*args)
        for fn in (ours, jax.checkpoint(ours)):
            got = jax.grad(functools.partial(loss, fn), argnums=(0, 1))(*args)
            for g, w in zip(got, want, strict=True):
                assert g.dtype == w.dtype
                np.testing.assert_allclose(
                    np.float32(g), np.float32(w), rtol=rtol, atol=rtol * np.abs(np.float32(w)).max()
                )
    np.testing.assert_array_equal(ours(gate, up), autodiff(gate, up))


def test_rotary_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)

    def score(query_position, key_position):
        rq = rotary_embedding(q, jnp.array([[query_position]]), 10_000.0)
        rk = rotary_embedding(k, jnp.array([[key_position]]), 10_000.0)
        return float(jnp.sum(rq * rk))

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 5), rel=1e-2)
    rotated = rotary_embedding(q, jnp.array([[37]]), 10_000.0)
    assert float(jnp.linalg.norm(rotated)) == pytest.approx(float(jnp.linalg.norm(q)), rel=1e-6)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch", "attention_out"])
def test_remat_policies_leave_gradients_unchanged(tiny, policy):
    model, params = tiny
    remat_model = LanguageModel(dataclasses.replace(model.cfg, remat=policy))
    batch = lm_batch_from_rows(np.random.default_rng(2).integers(0, 264, (2, 17)))
    grads = jax.grad(lambda p, m: causal_lm_loss(m, p, batch)[0])
    expected = grads(params, model)
    actual = grads(params, remat_model)
    jax.tree.map(
        lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-7), actual, expected
    )


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32(tiny):
    model, params = tiny
    bf16 = LanguageModel(dataclasses.replace(model.cfg, dtype="bfloat16"))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(bf16.init(jax.random.key(0))))
    tokens = np.random.default_rng(3).integers(0, 264, (2, 16))
    full, half = model.logits(params, tokens), bf16.logits(params, tokens)
    assert half.dtype == jnp.float32  # logits are upcast for the loss
    np.testing.assert_allclose(half, full, atol=0.05)


def test_untied_head_and_scalar_heads_live_in_params():
    cfg = dataclasses.replace(
        tiny_config().model, tie_embeddings=False, scalar_heads=["value", "reward"]
    )
    model = LanguageModel(cfg)
    params = model.init(jax.random.key(0))
    assert params["lm_head_dv"].shape == (64, 320)
    assert model.logical_axes["lm_head_dv"] == ("embed", "vocab")
    hidden = model.hidden(params, jnp.zeros((2, 5), jnp.int32))
    values = model.scalar_head(params, "value", hidden)
    w, b = params["heads"]["value"]["w_d"], params["heads"]["value"]["bias"]
    np.testing.assert_allclose(values, np.einsum("btd,d->bt", hidden, w) + b, rtol=1e-6)


def test_param_count_and_flops_follow_the_formula():
    cfg = tiny_config().model
    model = LanguageModel(cfg)
    d, f, n, k, h, layers, v = 64, 192, 4, 2, 16, 2, 320
    per_layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f + 2 * d
    expected = v * d + layers * per_layer + d
    assert model.param_count() == expected
    assert model.flops_per_token(64) == 6 * expected + 12 * layers * n * h * 64
    untied = LanguageModel(dataclasses.replace(cfg, tie_embeddings=False))
    assert untied.param_count() == expected + d * v
    # The untied input table is a lookup, not a matmul: the head replaces the tied table
    # in N, so the FLOPs are those of the tied model.
    assert untied.flops_per_token(64) == model.flops_per_token(64)


def test_unrolled_layers_equal_scanned_layers(tiny):
    model, params = tiny
    unrolled = LanguageModel(dataclasses.replace(model.cfg, scan_layers=False))
    tokens = np.random.default_rng(4).integers(0, 264, (2, 16))
    np.testing.assert_allclose(
        unrolled.logits(params, tokens), model.logits(params, tokens), rtol=1e-5, atol=1e-6
    )


def test_block_and_attention_return_the_same_type_with_and_without_a_cache():
    cfg = tiny_config().model
    block = Block(cfg, DEFAULT_RULES, nnx.Rngs(0))
    x_btd = jnp.ones((2, 3, cfg.embed_dim))
    positions_bt = jnp.broadcast_to(jnp.arange(3), (2, 3))
    sin_cos = rotary_tables(
        positions_bt, rotary_inverse_frequencies(cfg.resolved_head_dim, cfg.rope_theta)
    )
    mask_b1ts = segment_mask(jnp.ones((2, 3), jnp.int32), jnp.ones((2, 3), jnp.int32))
    out, no_cache, router_stats = block(x_btd, sin_cos, mask_b1ts)
    assert out.shape == (2, 3, cfg.embed_dim) and no_cache is None and router_stats is None
    shape = (2, cfg.num_kv_heads, 4, cfg.resolved_head_dim)
    view = LayerCache(jnp.zeros(shape), jnp.zeros(shape), jnp.zeros((), jnp.int32), 4)
    cached_mask_b1ts = jnp.pad(mask_b1ts, ((0, 0), (0, 0), (0, 0), (0, 1)))
    for module in (block, block.attention):
        out, cache, *_ = module(x_btd, sin_cos, cached_mask_b1ts, view)  # Block: stats too
        assert out.shape == (2, 3, cfg.embed_dim) and isinstance(cache, LayerCache)
        assert cache.k_bksh.shape == shape and float(jnp.abs(cache.k_bksh[:, :, 3]).max()) == 0.0


def gemma_style(**changes):
    """tiny's shapes with Gemma 3's block: a local, a global and a local layer (window 4)."""
    gemma = dict(
        num_layers=3,
        norm="rms_one_plus",
        sandwich_norms=True,
        mlp_activation="gelu_tanh",
        qk_norm=True,
        embed_scale=True,
        query_pre_attn_scalar=24.0,
        final_logit_softcap=5.0,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_local_theta=100.0,
        init_std=0.2,
    )
    return dataclasses.replace(tiny_config().model, **{**gemma, **changes})


def test_mixed_window_layers_scanned_unrolled_and_cached_agree():
    """Local and global layers scan with a per-layer flag; unrolled layers choose in
    Python. Both, and a decode through the unrolled layers' `layer_params`, give the same
    logits; without the window (all global) they differ."""
    model = LanguageModel(gemma_style())
    params = model.init(jax.random.key(5))
    assert params["blocks"]["attention_norm"]["scale_d"].max() == 0.0  # (1 + w) starts at 1
    tokens_bt = jnp.asarray(np.random.default_rng(6).integers(0, 264, (2, 12)))
    scanned = np.asarray(jax.jit(model.logits)(params, tokens_bt))
    unrolled = LanguageModel(gemma_style(scan_layers=False))
    unrolled_logits = jax.jit(unrolled.logits)(params, tokens_bt)
    np.testing.assert_allclose(unrolled_logits, scanned, rtol=0, atol=1e-5)
    positions_bt = jnp.broadcast_to(jnp.arange(12), (2, 12))
    ones_bt = jnp.ones((2, 12), jnp.int32)

    @jax.jit
    def prefill_then_decode(params):
        cache = unrolled.init_cache(2, 12)
        _, cache = unrolled.logits_with_cache(
            params, tokens_bt[:, :11], positions_bt[:, :11], ones_bt[:, :11], cache
        )
        layers = unrolled.layer_params(params)
        return unrolled.logits_with_cache(
            params, tokens_bt[:, 11:], positions_bt[:, 11:], ones_bt[:, 11:], cache, layers
        )[0]

    last = prefill_then_decode(params)
    np.testing.assert_allclose(last[:, 0], scanned[:, 11], rtol=0, atol=1e-5)
    unwindowed = LanguageModel(gemma_style(layer_types=[]))
    unwindowed_logits = np.asarray(jax.jit(unwindowed.logits)(params, tokens_bt))
    assert np.abs(unwindowed_logits - scanned).max() > 1e-2


def test_flops_count_a_sliding_layers_keys_up_to_its_window():
    cfg = gemma_style()
    model = LanguageModel(cfg)
    n, h = cfg.num_heads, cfg.resolved_head_dim
    full = LanguageModel(dataclasses.replace(cfg, layer_types=[]))
    # Local layers attend to 4 keys, not 64; the params are the same.
    assert full.flops_per_token(64) - model.flops_per_token(64) == 12 * n * h * 2 * (64 - 4)
    assert model.flops_per_token(3) == full.flops_per_token(3)  # shorter than the window


GEMMA_LIKE = {  # sandwich norms, q/k norms, a sliding layer with its own rope, softcap
    "sandwich_norms": True,
    "qk_norm": True,
    "norm": "rms_one_plus",
    "mlp_activation": "gelu_tanh",
    "embed_scale": True,
    "sliding_window": 5,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    "num_layers": 3,
    "rope_local_theta": 500.0,
}


def shared_prompt_packs() -> dict[str, np.ndarray]:
    """Three rows of 40 columns as `group_rows` packs groups: a prompt (at most 8 tokens),
    then its replies (at most 4 tokens each) end to end, each attending to the prompt, then
    the next group's prompt and replies, then padding. Rows 0 and 1 hold one group; row 2
    three, whose prompts start mid-block and span blocks of 4."""
    rng = np.random.default_rng(3)
    rows = {name: np.zeros((3, 40), np.int32) for name in ("segments", "prefixes", "positions")}
    packs = [
        [(6, [4, 2, 4, 1, 3, 4, 2])],
        [(8, [3, 4, 4, 4, 1])],
        [(5, [3, 2]), (8, [4, 4, 1]), (3, [4, 2])],
    ]
    for row, groups in enumerate(packs):
        start, segment = 0, 1
        for prompt, replies in groups:
            columns = slice(start, start + prompt)
            rows["segments"][row, columns] = prompt_segment = segment
            rows["positions"][row, columns] = np.arange(prompt)
            start += prompt
            for length in replies:
                columns = slice(start, start + length)
                segment += 1
                rows["segments"][row, columns] = segment
                rows["prefixes"][row, columns] = prompt_segment
                rows["positions"][row, columns] = prompt + np.arange(length)
                start += length
            segment += 1
    rows["tokens"] = rng.integers(3, 264, (3, 40)).astype(np.int32)
    return rows


@pytest.mark.parametrize(
    ("changes", "lora_rank"),
    [
        ({}, 0),
        ({"scan_layers": False, "num_kv_heads": 4}, 0),
        ({"remat": "full", "qkv_bias": True}, 0),
        (GEMMA_LIKE, 0),  # sliding windows measured in positions
        ({"num_experts": 4, "experts_per_token": 2, "expert_mlp_dim": 32}, 0),
        ({}, 4),
    ],
    ids=["scan-gqa", "unrolled-mha", "remat-bias", "gemma-like", "moe", "lora"],
)
def test_rows_within_their_key_bounds_attend_block_by_block_as_the_whole_row(changes, lora_rank):
    """`hidden(..., key_bounds=KeyBounds(P, C))` (each block of C queries against the first
    P keys and the 2C keys ending with its block) gives the whole row's attention at every
    real column, and the same gradient, for shared-prompt packs that keep the bounds; a
    bound that the rows break (replies longer than C) changes the result."""
    from jaxllm.config import LoraConfig

    cfg = dataclasses.replace(tiny_config().model, **changes)
    model = LanguageModel(cfg, lora=LoraConfig(rank=lora_rank) if lora_rank else None)
    params = model.init(jax.random.key(0))
    params = jax.tree.map(lambda x: x + 0.05 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), params)
    rows = shared_prompt_packs()
    bounds = KeyBounds(prefix_columns=8, recent_columns=4)
    assert bounds.pays(40)  # 10 blocks x 4 queries x 16 keys, against 40 x 40
    real = rows["segments"][..., None] > 0  # padding's hidden states are never read

    def hidden(params, key_bounds):
        args = (rows["tokens"], rows["positions"], rows["segments"], rows["prefixes"])
        return model.hidden(params, *args, key_bounds=key_bounds)

    def loss(params, key_bounds):
        return jnp.sum(jnp.where(real, jnp.sin(3.0 * hidden(params, key_bounds)), 0.0))

    whole, banded = hidden(params, None), hidden(params, bounds)
    np.testing.assert_allclose(
        np.where(real, banded, 0), np.where(real, whole, 0), rtol=5e-5, atol=5e-5
    )
    grads, banded_grads = (jax.grad(loss)(params, b) for b in (None, bounds))
    for leaf, banded_leaf in zip(
        jax.tree.leaves(grads), jax.tree.leaves(banded_grads), strict=True
    ):
        # float32 sums in another order: within 3e-4 of the leaf's largest entry, as the
        # scanned and unrolled layers' gradients of the Gemma-like model differ (1.5e-4)
        np.testing.assert_allclose(banded_leaf, leaf, atol=3e-4 * np.abs(leaf).max())
    too_short = hidden(params, KeyBounds(prefix_columns=8, recent_columns=2))
    assert np.abs(np.where(real, too_short - whole, 0)).max() > 1e-3


@pytest.mark.parametrize(
    ("changes", "lora_rank"),
    [
        ({}, 0),  # scanned layers read the full forward's last layer
        ({"scan_layers": False}, 0),  # unrolled ones run the last at the read columns only
        ({"num_layers": 1, "scan_layers": False}, 0),
        ({"remat": "full", "qkv_bias": True, "scan_layers": False}, 0),
        (GEMMA_LIKE, 0),
        ({**GEMMA_LIKE, "scan_layers": False}, 0),
        ({"num_experts": 4, "experts_per_token": 2, "expert_mlp_dim": 32, "scan_layers": False}, 0),
        ({"scan_layers": False}, 4),
    ],
    ids=[
        "scan",
        "unrolled",
        "one-layer",
        "remat-bias",
        "gemma-like",
        "gemma-unrolled",
        "moe",
        "lora",
    ],
)
def test_a_head_read_at_a_few_columns_equals_the_full_forward_there(changes, lora_rank):
    """`hidden(..., query_index_bq)` with unrolled layers runs the last layer at the read
    columns only: its hidden states and a scalar head's gradient equal those of the whole
    row's forward at those columns, in packed rows with a shared prefix, with padding, at
    any layer kind (scanned layers: the full forward's, read there)."""
    from jaxllm.config import REWARD_HEAD, LoraConfig
    from jaxllm.losses import sequence_scores

    cfg = dataclasses.replace(tiny_config().model, scalar_heads=[REWARD_HEAD], **changes)
    lora = LoraConfig(rank=lora_rank) if lora_rank else None
    model = LanguageModel(cfg, lora=lora)
    params = model.init(jax.random.key(0))
    # Away from init (LoRA's B and the heads start at zero) so every path carries signal.
    params = jax.tree.map(lambda x: x + 0.05 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), params)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 264, (2, 24)).astype(np.int32)
    # Row 0: prompt of 8, replies of 7 and 6, 3 padding; row 1: one sequence of 24.
    segments = np.array([[1] * 8 + [2] * 7 + [3] * 6 + [0] * 3, [1] * 24], np.int32)
    prefixes = np.array([[0] * 8 + [1] * 13 + [0] * 3, [0] * 24], np.int32)
    positions = np.array([list(range(15)) + list(range(8, 14)) + [0] * 3, list(range(24))])
    index = np.array([[14, 20, 22], [23, 5, 0]], np.int32)  # reply ends, a pad, anywhere

    full = model.hidden(params, tokens, positions, segments, prefixes)
    read = model.hidden(params, tokens, positions, segments, prefixes, jnp.asarray(index))
    assert read.shape == (2, 3, cfg.embed_dim)
    np.testing.assert_allclose(
        read, np.take_along_axis(full, index[..., None], 1), rtol=2e-5, atol=2e-6
    )

    def full_scores(params):
        hidden = model.hidden(params, tokens, positions, segments, prefixes)
        return jnp.take_along_axis(model.scalar_head(params, REWARD_HEAD, hidden), index, 1)

    def loss(score_fn, params):
        return jnp.sum(jnp.sin(score_fn(params)))

    read_scores = functools.partial(
        sequence_scores, model, head=REWARD_HEAD, tokens_bt=tokens, positions_bt=positions,
        segment_ids_bt=segments, index_b=index, prefix_segment_ids_bt=prefixes,
    )  # fmt: skip
    grads = jax.grad(functools.partial(loss, full_scores))(params)
    read_grads = jax.grad(functools.partial(loss, read_scores))(params)
    for leaf, read_leaf in zip(jax.tree.leaves(grads), jax.tree.leaves(read_grads), strict=True):
        # float32 sums in another order: equal to 1e-5 of the leaf's largest entry
        np.testing.assert_allclose(read_leaf, leaf, rtol=1e-4, atol=1e-5 * np.abs(leaf).max())
