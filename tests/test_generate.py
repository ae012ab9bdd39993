"""The KV-cache sampler: parity with the full forward pass, padding, log-probs, stops,
compaction of stopped rows, compilation reuse, sharding, and bad requests."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import skip_if_not_enough_devices
from helpers import tiny_config

from jaxllm.config import MeshConfig
from jaxllm.generate import GenerationError, Generator, first_argmax
from jaxllm.losses import token_logprobs
from jaxllm.model import LanguageModel
from jaxllm.sharding import make_mesh, tree_shardings

VOCAB, PAD = 264, 263


@pytest.fixture(scope="module")
def tiny():
    # A larger init scale makes the untrained model's distributions far from uniform, so
    # greedy choices are well separated and a wrong cache would show.
    cfg = dataclasses.replace(tiny_config().model, init_std=0.2)
    model = LanguageModel(cfg)
    return model, model.init(jax.random.key(0))


def prompts_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n).tolist() for n in lengths]


def full_logits(model, params, ids):
    """Logits of one unpadded sequence by the plain forward pass, (T, V)."""
    return np.asarray(model.logits(params, jnp.asarray([ids], jnp.int32))[0])


@pytest.mark.parametrize("decode_chunk", [256, 8])  # one pass; chunks up to the filled slot
def test_cached_decoding_gives_full_forward_logits_at_every_position(tiny, decode_chunk):
    model, params = tiny
    sequences = prompts_of([7, 3, 12], seed=1)
    total = 20
    continuation = np.random.default_rng(2).integers(0, 256, (3, total)).tolist()
    generator = Generator(model, VOCAB, PAD, max_new_tokens=total, decode_chunk=decode_chunk)
    prompt_bp, lengths_b = generator._left_pad(sequences, batch=3)
    p = prompt_bp.shape[1]
    logits_bv, cache = generator._prefill(params, prompt_bp, lengths_b, p + total)
    cached = [np.asarray(logits_bv)]
    for step in range(total - 1):
        token_b = jnp.asarray([row[step] for row in continuation], jnp.int32)
        logits_bv, cache = generator._decode_step(params, cache, token_b, lengths_b + step)
        cached.append(np.asarray(logits_bv))
    cached = np.stack(cached, axis=1)  # (B, total, V): logits after prompt + step tokens

    for row, (prompt, extra) in enumerate(zip(sequences, continuation, strict=True)):
        reference = full_logits(model, params, prompt + extra[: total - 1])
        np.testing.assert_allclose(cached[row], reference[len(prompt) - 1 :], rtol=1e-5, atol=1e-5)


def test_padded_batch_matches_each_prompt_alone(tiny):
    model, params = tiny
    prompts = prompts_of([5, 17, 9, 1], seed=3)
    generator = Generator(model, VOCAB, PAD, max_new_tokens=12)
    batch = generator(params, prompts, jax.random.key(0), temperature=0.0)
    for row, prompt in enumerate(prompts):
        alone = generator(params, [prompt], jax.random.key(0), temperature=0.0)
        assert batch.tokens[row].tolist() == alone.tokens[0].tolist()
        np.testing.assert_allclose(batch.logprobs[row], alone.logprobs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(0.7, 0, 1.0), (1.3, 5, 0.9), (0.0, 0, 1.0)]
)
def test_logprobs_are_log_softmax_of_full_forward_logits_over_temperature(
    tiny, temperature, top_k, top_p
):
    model, params = tiny
    prompts = prompts_of([4, 11], seed=4)
    generator = Generator(model, VOCAB, PAD, max_new_tokens=10)
    out = generator(
        params, prompts, jax.random.key(7), temperature=temperature, top_k=top_k, top_p=top_p
    )
    for row, prompt in enumerate(prompts):
        completion = out.row(row)
        logits = full_logits(model, params, prompt + completion)[len(prompt) - 1 : -1, :VOCAB]
        scale = temperature if temperature > 0 else 1.0
        shifted = logits.astype(np.float64) / scale
        shifted -= shifted.max(axis=-1, keepdims=True)
        expected = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        expected = expected[np.arange(len(completion)), completion]
        np.testing.assert_allclose(
            out.logprobs[row][: len(completion)], expected, rtol=1e-4, atol=1e-5
        )
        if temperature == 0:
            assert completion == np.argmax(logits, axis=-1).tolist()


def test_first_argmax_is_argmax_with_ties_to_the_first():
    x_bv = jnp.asarray(
        [[0.0, 3.0, 3.0, -1.0], [5.0, 5.0, 5.0, 5.0], [-jnp.inf, -2.0, -jnp.inf, -3.0]]
    )
    x_bv = jnp.concatenate([x_bv, jax.random.normal(jax.random.key(0), (64, 4))])
    np.testing.assert_array_equal(first_argmax(x_bv), jnp.argmax(x_bv, axis=-1))
    assert first_argmax(x_bv)[:3].tolist() == [1, 0, 1]


def test_top_k_one_is_greedy_and_fixed_key_reproduces(tiny):
    model, params = tiny
    prompts = prompts_of([6, 6], seed=5)
    generator = Generator(model, VOCAB, PAD, max_new_tokens=8)
    greedy = generator(params, prompts, jax.random.key(1), temperature=0.0)
    top1 = generator(params, prompts, jax.random.key(2), temperature=1.5, top_k=1)
    assert top1.tokens.tolist() == greedy.tokens.tolist()
    first = generator(params, prompts, jax.random.key(3), temperature=1.0, top_p=0.95)
    again = generator(params, prompts, jax.random.key(3), temperature=1.0, top_p=0.95)
    other = generator(params, prompts, jax.random.key(4), temperature=1.0, top_p=0.95)
    assert first.tokens.tolist() == again.tokens.tolist()
    assert first.tokens.tolist() != other.tokens.tolist()


def test_rows_stop_at_their_stop_token_and_the_loop_ends_early(tiny):
    model, params = tiny
    prompts = prompts_of([3, 8], seed=6)
    generator = Generator(model, VOCAB, PAD, max_new_tokens=16)
    free = generator(params, prompts, jax.random.key(0), temperature=0.0)
    assert free.num_steps == 16 and free.mask.all()

    # Stop row 0 at a token it first emits at position >= 3 and that row 1 never emits.
    row0, row1 = free.tokens[0].tolist(), free.tokens[1].tolist()
    stop = next(t for i, t in enumerate(row0) if i >= 3 and t not in row0[:i] and t not in row1)
    stop_at = row0.index(stop)
    stopped = generator(params, prompts, jax.random.key(0), temperature=0.0, stop_ids=[stop])
    assert stopped.tokens[0, : stop_at + 1].tolist() == row0[: stop_at + 1]
    assert stopped.mask[0].tolist() == [True] * (stop_at + 1) + [False] * (15 - stop_at)
    assert (stopped.tokens[0, stop_at + 1 :] == PAD).all()
    assert (stopped.logprobs[0, stop_at + 1 :] == 0).all()
    # Row 1 never stops: it runs to the maximum, all of it kept, and so does the loop.
    assert stopped.mask[1].all() and stopped.tokens[1].tolist() == row1
    assert stopped.num_steps == 16

    # When every row has stopped the loop ends there.
    both = [stop, row1[2]]
    everyone = generator(params, prompts, jax.random.key(0), temperature=0.0, stop_ids=both)
    last_stop = max(int(np.argmax(np.isin(free.tokens[r], both))) for r in range(2))
    assert everyone.num_steps == last_stop + 1 < 16


def test_prompts_within_one_bucket_compile_once(tiny):
    model, params = tiny
    generator = Generator(model, VOCAB, PAD, max_new_tokens=4)
    for index, length in enumerate(range(7, 17)):  # ten lengths, one 16-token bucket
        generator(
            params,
            prompts_of([length, 20 - length], seed=index)[:2],
            jax.random.key(0),
            temperature=0.5,
        )
    assert generator.compilations == 1
    generator(params, prompts_of([17]), jax.random.key(0))  # the 32-token bucket
    assert generator.compilations == 2


def test_streaming_yields_the_batched_greedy_tokens(tiny):
    model, params = tiny
    prompt = prompts_of([9], seed=8)[0]
    generator = Generator(model, VOCAB, PAD, max_new_tokens=10)
    batched = generator(params, [prompt], jax.random.key(0), temperature=0.0)
    streamed = list(generator.stream(params, prompt, jax.random.key(0), temperature=0.0))
    assert streamed == batched.row(0)


@pytest.mark.parametrize(
    ("prompts", "options", "message"),
    [
        ([[]], {}, "prompt 0 is empty"),
        ([[1] * 60], {}, "prompt 0 has 60 tokens but the context allows 56"),
        ([[1]], {"top_p": 0.0}, r"top_p=0.0 must lie in \(0, 1\]"),
        ([[1]], {"top_p": 1.5}, r"top_p=1.5 must lie in \(0, 1\]"),
        ([[1]], {"temperature": -0.1}, "temperature=-0.1 must be a finite number >= 0"),
        ([[1]], {"temperature": float("nan")}, "temperature=nan must be a finite number"),
        ([[1]], {"temperature": float("inf")}, "temperature=inf must be a finite number"),
        ([[1]], {"top_p": float("nan")}, r"top_p=nan must lie in \(0, 1\]"),
        ([[1]], {"top_k": -1}, "top_k=-1 must be >= 0"),
    ],
)
def test_bad_requests_fail_with_one_clear_error(tiny, prompts, options, message):
    model, params = tiny
    generator = Generator(model, VOCAB, PAD, max_new_tokens=8)
    with pytest.raises(GenerationError, match=message) as batched:
        generator(params, prompts, jax.random.key(0), **options)
    with pytest.raises(GenerationError, match=message) as streamed:
        next(generator.stream(params, prompts[0], jax.random.key(0), **options))
    assert len(str(batched.value).splitlines()) == len(str(streamed.value).splitlines()) == 1


def test_a_budget_below_one_token_fails_clearly(tiny):
    with pytest.raises(GenerationError, match="max_new_tokens=0 must be >= 1"):
        Generator(tiny[0], VOCAB, PAD, max_new_tokens=0)


def test_prompt_bucket_never_exceeds_the_context(tiny):
    generator = Generator(tiny[0], VOCAB, PAD, max_new_tokens=8)  # max_seq_len 64: 56 left
    prompt_bp, _ = generator._left_pad([[1] * 50], batch=1)
    assert prompt_bp.shape == (1, 56)  # not the 64-token bucket


def test_the_decode_step_donates_the_cache(tiny):
    model, params = tiny
    generator = Generator(model, VOCAB, PAD, max_new_tokens=4)
    prompt_bp, lengths_b = generator._left_pad(prompts_of([5, 3]), batch=2)
    _, cache = generator._prefill(params, prompt_bp, lengths_b, prompt_bp.shape[1] + 4)
    token_b = jnp.asarray([1, 2], jnp.int32)
    _, new_cache = generator._decode_step(params, cache, token_b, lengths_b)
    assert all(k.is_deleted() for k in cache.keys)
    assert not any(k.is_deleted() for k in new_cache.keys)


def test_the_decode_loop_casts_params_once_outside_its_body(tiny):
    """A bfloat16 model keeps float32 params; the decode loop's body must read them cast
    (a cast inside the body reran at every step: for llama_1b, 1 GB of embedding table
    read and 0.5 GB written per token)."""
    model = LanguageModel(dataclasses.replace(tiny[0].cfg, dtype="bfloat16"))
    params = tiny[1]
    generator = Generator(model, VOCAB, PAD, max_new_tokens=4, decode_phases=1)
    prompt_bp, lengths_b = generator._left_pad(prompts_of([5, 3]), batch=2)
    live_b = np.ones(2, bool)
    budget_b = np.full(2, 4, np.int32)
    state = generator._start(
        params, prompt_bp, lengths_b, None, budget_b, live_b, jax.random.key(0), 16
    )
    sampling = generator._sampling_args(0.0, 0, 1.0)
    stops = np.asarray([-1], np.int32)
    hlo = generator._decode.lower(params, state, *sampling, stops, "greedy").compile().as_text()
    param_shapes = {",".join(map(str, p.shape)) for p in jax.tree.leaves(params) if p.ndim >= 2}
    body_casts = [
        line
        for line in hlo.splitlines()
        if " convert(" in line and "while/body" in line and "bf16[" in line.split("=")[1]
    ]
    assert body_casts, "no cast in the body at all: the check would not see one"
    cast_params = [
        line for line in body_casts if line.split("bf16[")[1].split("]")[0] in param_shapes
    ]
    assert not cast_params, cast_params


def test_stopped_and_compacted_rows_match_each_prompt_alone(tiny, monkeypatch):
    model, params = tiny
    prompts = prompts_of([5, 17, 9, 1, 12, 3, 7, 20], seed=11)
    generator = Generator(model, VOCAB, PAD, max_new_tokens=12, min_rows=1)
    batch_sizes = []
    compact = generator._compact

    def counting_compact(state):
        batch_sizes.append(state.done_b.shape[0])
        return compact(state)

    monkeypatch.setattr(generator, "_compact", counting_compact)
    key, stops = jax.random.key(5), list(range(0, 256, 8))  # one id in 8 stops a row
    options = {"temperature": 1.0, "stop_ids": stops}
    batch = generator(params, prompts, key, **options)
    # Rows stop at different steps; once 4 of 8 had stopped the other 4 went on in 4 rows.
    assert batch.mask.sum(axis=1).tolist() == [3, 7, 12, 2, 12, 9, 2, 12]
    assert batch_sizes == [8]
    # Halving down to exactly min_rows is allowed; below it, never (one decode loop fewer
    # to compile), with the same tokens.
    floored = Generator(model, VOCAB, PAD, max_new_tokens=12, min_rows=4)
    monkeypatch.setattr(floored, "_compact", counting_compact)
    batch_sizes.clear()
    assert floored(params, prompts, key, **options).tokens.tolist() == batch.tokens.tolist()
    assert batch_sizes == [8]
    whole = Generator(model, VOCAB, PAD, max_new_tokens=12, min_rows=8)
    monkeypatch.setattr(whole, "_compact", lambda state: pytest.fail("compacted"))
    unhalved = whole(params, prompts, key, **options)
    assert unhalved.tokens.tolist() == batch.tokens.tolist()
    np.testing.assert_allclose(unhalved.logprobs, batch.logprobs, rtol=0, atol=1e-5)

    for index, prompt in enumerate(prompts):
        alone = generator(params, [prompt], jax.random.fold_in(key, index)[None], **options)
        assert batch.tokens[index].tolist() == alone.tokens[0].tolist()
        assert batch.mask[index].tolist() == alone.mask[0].tolist()
        np.testing.assert_allclose(batch.logprobs[index], alone.logprobs[0], rtol=0, atol=1e-5)


def test_each_distinct_prompt_is_prefilled_once_and_its_rows_sample_as_alone(tiny, monkeypatch):
    """GRPO's groups repeat each prompt G times: the prefill runs on the distinct prompts
    (in a batch of their own) and each row starts from its prompt's cache, sampling with its
    own key exactly what that prompt alone samples."""
    model, params = tiny
    first, second, third = prompts_of([5, 17, 9], seed=3)
    prompts = [first, second, first, third, first, second]
    generator = Generator(model, VOCAB, PAD, max_new_tokens=8, min_rows=1)
    prefilled = []
    prefill = generator._prefill_padded

    def counting_prefill(params, prompt_bp, *args):
        prefilled.append(prompt_bp.shape[0])
        return prefill(params, prompt_bp, *args)

    monkeypatch.setattr(generator, "_prefill_padded", counting_prefill)
    keys = jax.random.split(jax.random.key(7), len(prompts))
    options = {"temperature": 1.0, "stop_ids": list(range(0, 256, 8))}
    batch = generator(params, prompts, keys, **options)
    assert prefilled == [3]  # the 3 distinct prompts, for 6 rows
    assert batch.tokens.shape == (6, 8)
    assert len({tuple(row) for row in batch.tokens.tolist()}) == 6  # each its own draw
    for index, prompt in enumerate(prompts):
        alone = generator(params, [prompt], keys[index : index + 1], **options)
        assert batch.tokens[index].tolist() == alone.tokens[0].tolist()
        assert batch.mask[index].tolist() == alone.mask[0].tolist()
        np.testing.assert_allclose(batch.logprobs[index], alone.logprobs[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_logprobs_equal_token_logprobs_of_a_full_forward(tiny, temperature):
    model, params = tiny
    # Padding rows of the vocabulary (ids >= VOCAB) get large logits: they must be neither
    # sampled nor counted in the normaliser.
    table_vd = params["token_embedding_vd"]
    params = {**params, "token_embedding_vd": table_vd.at[VOCAB:].multiply(30.0)}
    assert float(model.logits(params, jnp.asarray([[1, 2]]))[0, -1, VOCAB:].max()) > 5.0
    prompts = prompts_of([3, 11, 6], seed=12)  # left-padded to 11
    generator = Generator(model, VOCAB, PAD, max_new_tokens=9)
    out = generator(params, prompts, jax.random.key(3), temperature=temperature)
    for row, prompt in enumerate(prompts):
        completion = out.row(row)
        assert len(completion) == 9 and max(completion) < VOCAB
        logits_btv = model.logits(params, jnp.asarray([prompt + completion], jnp.int32))
        expected = token_logprobs(
            logits_btv[:, len(prompt) - 1 : -1],
            jnp.asarray([completion], jnp.int32),
            temperature=temperature,
            vocab_size=VOCAB,
        )[0]
        np.testing.assert_allclose(out.logprobs[row], np.asarray(expected), rtol=0, atol=1e-5)


@skip_if_not_enough_devices(8)
def test_sharded_generation_matches_one_device(tiny):
    model, params = tiny
    mesh = make_mesh(MeshConfig(2, 2, 2), jax.devices()[:8])
    shardings = tree_shardings(mesh, model.abstract_params, model.logical_axes, model.rules)
    sharded_params = jax.device_put(params, shardings)
    # 3 distinct prompts, two of them twice: their prefill padded to 4 rows to split over
    # data x fsdp, then copied to the 5 rows (padded to 8)
    prompts = prompts_of([5, 12, 3], seed=9)
    prompts += prompts[:2]
    sharded = Generator(model, VOCAB, PAD, max_new_tokens=10, mesh=mesh)
    alone = Generator(model, VOCAB, PAD, max_new_tokens=10)
    expected = alone(params, prompts, jax.random.key(0), temperature=0.0)
    actual = sharded(sharded_params, prompts, jax.random.key(0), temperature=0.0)
    assert actual.tokens.tolist() == expected.tokens.tolist()
    np.testing.assert_allclose(actual.logprobs, expected.logprobs, rtol=1e-5, atol=1e-6)


@skip_if_not_enough_devices(8)
def test_outputs_are_replicated_and_stream_runs_on_the_mesh(tiny, monkeypatch):
    model, params = tiny
    mesh = make_mesh(MeshConfig(2, 2, 2), jax.devices()[:8])
    shardings = tree_shardings(mesh, model.abstract_params, model.logical_axes, model.rules)
    sharded_params = jax.device_put(params, shardings)
    generator = Generator(model, VOCAB, PAD, max_new_tokens=6, mesh=mesh)
    prompt_bp, lengths_b = generator._left_pad(prompts_of([5, 12, 3, 8]), batch=4)
    with jax.set_mesh(mesh):
        state = generator._start(
            sharded_params,
            prompt_bp,
            lengths_b,
            None,
            np.full(4, 6, np.int32),
            np.ones(4, bool),
            jax.random.key(0),
            24,
        )
        outputs = generator._results(state)
    assert all(output.sharding.is_fully_replicated for output in outputs)

    meshes_seen = []
    hidden_with_cache = generator.model.hidden_with_cache

    def spy(*args):
        meshes_seen.append(jax.sharding.get_abstract_mesh().shape_tuple)
        return hidden_with_cache(*args)

    monkeypatch.setattr(generator.model, "hidden_with_cache", spy)
    prompt = prompts_of([9], seed=13)[0]
    streamed = list(generator.stream(sharded_params, prompt, jax.random.key(4), temperature=1.0))
    batched = generator(sharded_params, [prompt], jax.random.key(4), temperature=1.0)
    assert streamed == batched.row(0)
    mesh_shape = {"data": 2, "fsdp": 2, "tensor": 2}
    assert meshes_seen and all(dict(shape) == mesh_shape for shape in meshes_seen)


def test_decode_phases_grow_the_cache_and_change_no_token_or_logprob(tiny, monkeypatch):
    model, params = tiny
    prompts = prompts_of([5, 17, 9, 12], seed=3)  # a 32-slot prompt bucket
    whole = Generator(model, VOCAB, PAD, max_new_tokens=24, decode_phases=1)
    phased = Generator(model, VOCAB, PAD, max_new_tokens=24, decode_phases=4)
    widths = []
    grow = phased._grow
    monkeypatch.setattr(
        phased, "_grow", lambda cache, slots: widths.append(slots) or grow(cache, slots)
    )
    for temperature in (0.0, 1.0):
        widths.clear()
        expected = whole(params, prompts, jax.random.key(2), temperature=temperature)
        got = phased(params, prompts, jax.random.key(2), temperature=temperature)
        assert widths == [48, 56]  # 32 + 6 -> 40 slots first, then 44 -> 48, then 56
        assert got.tokens.tolist() == expected.tokens.tolist()
        np.testing.assert_allclose(got.logprobs, expected.logprobs, rtol=0, atol=1e-5)
