"""A jit-compiled KV-cache sampler for evaluation, chat and RL rollouts.

`Generator` prefills a batch of prompts once, then decodes inside a compiled
`lax.while_loop` over a preallocated KV cache, updated in place. Prompts are left-padded
into a bucket of lengths, and the batch into a bucket of sizes, so new prompts reuse a
compiled function. Each row stops at its first stop token (that token is kept, later ones
are masked). When at most half the rows are still going, the loop hands back, the live
rows are gathered into a batch half the size (never under `min_rows`, 16), and decoding
goes on there: rows that have stopped stop costing. The loop ends when every row has
stopped or `max_new_tokens` are out.

Sampling: greedy (temperature 0), or temperature with optional top-k and top-p. Which of
the three runs is chosen on the host, so greedy and plain temperature never sort the
vocabulary. Prompt i's t-th token is drawn with key fold_in(fold_in(key, i), t) (or
fold_in(key_i, t) given one key per prompt): a prompt's completion does not depend on its
row, its batch-mates or when the batch was compacted.
The returned log-probability of each token is `losses.token_logprobs` (log_softmax(logits /
temperature) over the real vocabulary; temperature 0 reads as 1), before any top-k/top-p
truncation, which is what PPO/GRPO importance ratios compare against the trainer's.

`stream` decodes one prompt with the same compiled pieces, yielding each token as it is
sampled (for interactive chat).

Shape letters: B rows of the current batch, R rows of the first batch (prompts plus batch
padding), P prompt bucket, N max_new_tokens, V vocab, S cache slots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, PartitionSpec

from jaxllm.errors import UserError
from jaxllm.losses import scaled_vocab_logits, token_logprobs
from jaxllm.model import CACHE_AXES, KVCache, LanguageModel, Params
from jaxllm.sharding import constrain

PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SAMPLING_MODES = ("greedy", "sample", "filtered")  # filtered: top-k and/or top-p on


class GenerationError(UserError, ValueError):
    """A request the sampler cannot serve: empty or too-long prompt, bad sampling values."""


@dataclasses.dataclass(frozen=True)
class Completion:
    """What `Generator.__call__` returns, one row per prompt, `max_new_tokens` columns."""

    tokens: np.ndarray  # (B, N) int32; pad_id after a row's stop
    logprobs: np.ndarray  # (B, N) float32; 0 where masked
    mask: np.ndarray  # (B, N) bool: True for the tokens of the completion (stop token incl.)
    num_steps: int  # decode iterations run (<= N; fewer when every row stopped early)
    # (B, N) bool, multi-turn episodes only (`rl.episodes`): tokens between the model's
    # turns (tool results, template text) that it reads but did not write; None: no such.
    inserted: np.ndarray | None = None

    def row(self, index: int) -> list[int]:
        """Completion tokens of one row that the model wrote, its stop token included."""
        return self.tokens[index][self.mask[index]].tolist()


def _bucket(size: int, buckets: Sequence[int], limit: int) -> int:
    """The smallest bucket that holds `size`, never more than `limit` (>= size)."""
    return min([b for b in buckets if b >= size] + [limit])


def sampling_mode(temperature: float, top_k: int, top_p: float) -> str:
    """Check the sampling values (a `GenerationError` of one line if bad) and name the mode
    in `SAMPLING_MODES` that serves them."""
    if not math.isfinite(temperature) or temperature < 0:
        raise GenerationError(
            f"temperature={temperature} must be a finite number >= 0 (0 is greedy)"
        )
    if not 0.0 < top_p <= 1.0:
        raise GenerationError(f"top_p={top_p} must lie in (0, 1]")
    if top_k < 0:
        raise GenerationError(f"top_k={top_k} must be >= 0 (0 turns it off)")
    if temperature == 0:
        return "greedy"
    return "filtered" if top_k > 0 or top_p < 1.0 else "sample"


def _top_k_top_p(scaled_bv, top_k, top_p):
    """Scaled logits (B, V) with every token outside the top-k and top-p sets at -inf."""
    sorted_bv = jnp.sort(scaled_bv, axis=-1)[:, ::-1]
    kth_b1 = sorted_bv[:, jnp.clip(top_k - 1, 0, sorted_bv.shape[-1] - 1)][:, None]
    keep_bv = jnp.where(top_k > 0, scaled_bv >= kth_b1, True)
    # top-p: the smallest set of most likely tokens whose probability reaches top_p.
    cumulative_bv = jnp.cumsum(jax.nn.softmax(sorted_bv, axis=-1), axis=-1)
    cutoff_index_b = jnp.sum(cumulative_bv < top_p, axis=-1)
    cutoff_b1 = jnp.take_along_axis(
        sorted_bv, jnp.clip(cutoff_index_b, 0, sorted_bv.shape[-1] - 1)[:, None], axis=-1
    )
    keep_bv &= jnp.where(top_p < 1.0, scaled_bv >= cutoff_b1, True)
    return jnp.where(keep_bv, scaled_bv, -jnp.inf)


def first_argmax(x_bv: jax.Array) -> jax.Array:
    """`jnp.argmax(x_bv, axis=-1)` (the first index of each row's maximum), as two plain
    reductions: XLA:CPU runs argmax's (value, index) reduction element by element (88 us
    per decode step at batch 128 x 320 ids, against a few us for these). A row of NaNs
    gives its last index."""
    v = x_bv.shape[-1]
    max_b1 = jnp.max(x_bv, axis=-1, keepdims=True)
    first_b = jnp.min(jnp.where(x_bv == max_b1, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
    return jnp.minimum(first_b, v - 1)


def sample_logits(logits_bv, keys_b, temperature, top_k, top_p, vocab_size, mode):
    """One token per row (B,) int32 and its log-probability (B,) float32 (`token_logprobs`).

    `keys_b` holds one key per row; `mode` (static, from `sampling_mode`) picks greedy,
    plain temperature sampling, or sampling after top-k/top-p filters (the only mode that
    sorts the vocabulary)."""
    scaled_bv = scaled_vocab_logits(logits_bv, temperature, vocab_size)
    if mode == "greedy":
        token_b = first_argmax(scaled_bv)
    else:
        if mode == "filtered":
            scaled_bv = _top_k_top_p(scaled_bv, top_k, top_p)
        token_b = jax.vmap(jax.random.categorical)(keys_b, scaled_bv)
    token_b = token_b.astype(jnp.int32)
    logprob_b = token_logprobs(
        logits_bv[:, None], token_b[:, None], temperature=temperature, vocab_size=vocab_size
    )[:, 0]
    return token_b, logprob_b


@struct.dataclass
class _Rollout:
    """The decode loop's carry. Rows of the current batch (B) map to rows of the results
    (R); compacting the batch keeps the results where they are."""

    cache: KVCache  # L x (B, K, S, H) keys and values
    logits_bv: jax.Array  # (B, V) float32 logits of each row's next token
    key_b: jax.Array  # (B,) fold_in(key, prompt index) of each row
    result_row_b: jax.Array  # (B,) int32 the row of the results this row writes
    position_b: jax.Array  # (B,) int32 position of the next token (prompt length + step)
    budget_b: jax.Array  # (B,) int32 tokens the row may write (<= N)
    done_b: jax.Array  # (B,) bool: stopped, out of budget, or batch padding
    step: jax.Array  # int32 scalar: tokens sampled so far
    tokens_rn: jax.Array  # (R, N) int32; pad_id after a row's stop
    logprobs_rn: jax.Array  # (R, N) float32; 0 where masked
    mask_rn: jax.Array  # (R, N) bool: the completion's tokens, stop token included


class Generator:
    """Compiled prefill + decode for one model; reuse it across calls.

    Args:
        model: the model whose params are passed to each call. A model with adapters
            samples as its base model with the adapters merged into its weights, merged
            once per call (`LanguageModel.sampling_params`).
        vocab_size: ids at or above this (the model's padding rows) are never sampled.
        pad_id: written after a row's stop.
        max_new_tokens: the decode budget of every call (a static shape).
        mesh: when given, activations and the KV cache are sharded over it like the model
            (rows over the data-parallel axes, kv heads over `tensor`); params are used
            where they lie, and every output is replicated (readable on every process).
        unroll_layers: decode with the layers unrolled (the same params): a decode step is
            bound by launching small kernels, and unrolled layers launch fewer (llama_1b on
            an H200: 2.88 instead of 3.98 ms per step at batch 1).
        decode_chunk: cache slots a decode step's attention reads at a time, stopping at the
            last filled slot (longer caches are rounded up to whole chunks). A cache of at
            most this many slots is read in one pass with no loop, which on the 2-core CPU
            is faster at 80 slots than chunks of 16-48 (29k vs 16k tokens/s at batch 128).
        decode_phases: the decode budget runs in this many phases, each with a cache just
            wide enough for it (the prompt plus 1/4, 1/2, ... of the new tokens), grown by
            a copy between phases: a decode step never reads the empty end of a cache
            sized for the whole budget (at 4 phases, p + 5n/8 of p + n slots on average),
            and each width is compiled once. 1: one cache of every slot from the start.
            Default: 4 on CPU for a budget of more than 64 new tokens, else 1 (0.83M model,
            32-token prompts, batch 128, 2-core CPU: 96 new tokens decode 34% faster in
            4 phases, 48 within 7% either way, for 4 times the compiles).
        min_rows: the batch is never halved below this many rows. Each smaller batch is
            one more compilation of the decode loop (for each phase and sampling mode),
            while a decode step of a few rows costs about what one of 16 does: halving
            from 256 rows down to 1 compiles the loop 9 times per phase, down to 16, 5.
    """

    def __init__(
        self,
        model: LanguageModel,
        vocab_size: int,
        pad_id: int,
        max_new_tokens: int,
        mesh: Mesh | None = None,
        unroll_layers: bool = True,
        decode_chunk: int = 256,
        decode_phases: int | None = None,
        min_rows: int = 16,
    ):
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens={max_new_tokens} must be >= 1")
        if min_rows < 1:
            raise GenerationError(f"min_rows={min_rows} must be >= 1")
        # Merges a model's adapters into its weights, once per call (None: no adapters).
        self._merge = jax.jit(model.sampling_params) if model.lora is not None else None
        model = model.base
        if unroll_layers and model.cfg.scan_layers:
            model = LanguageModel(dataclasses.replace(model.cfg, scan_layers=False), model.rules)
        self.model, self.vocab_size, self.pad_id = model, vocab_size, pad_id
        self.max_new_tokens = max_new_tokens
        self.mesh = mesh
        self.decode_chunk = decode_chunk
        self.min_rows = min_rows
        # Measured on CPU, where reading the cache bounds a large batch's step (batch 128,
        # 0.83M model: 30k -> 40k tokens/s); on GPUs up to 256 slots the step is bound by
        # kernel launches instead, and each phase is one more compilation.
        long_cpu_decode = jax.default_backend() == "cpu" and max_new_tokens > 64
        default_phases = 4 if long_cpu_decode else 1
        self.decode_phases = decode_phases or default_phases
        self.row_shards = (
            1
            if mesh is None
            else math.prod(mesh.shape[axis] for axis in model.rules.mesh_axes("batch"))
        )
        self.compilations = 0  # traces of the batched prefill (one per new bucket)
        self._prefill = jax.jit(self._prefill_padded, static_argnums=3)
        self._decode_step = jax.jit(self._decode_one, donate_argnums=1)
        self._start = jax.jit(self._start_rollout, static_argnums=7)
        self._grow = jax.jit(self._grown_cache, static_argnums=1)
        self._decode = jax.jit(self._decode_loop, static_argnums=6, donate_argnums=1)
        self._step = jax.jit(self._stream_step, static_argnums=5, donate_argnums=1)
        self._compact = jax.jit(self._compact_rows)
        self._results = jax.jit(self._replicated_results)

    # --- the pure, compiled parts ------------------------------------------------------

    def _replicated(self, x):
        """`x` replicated on every device of the mesh (so any process can read it whole)."""
        if self.mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, PartitionSpec())

    def _prefill_padded(self, params, prompt_bp, prompt_lengths_b, num_slots):
        """Fill a cache of at least `num_slots` slots (rounded up to whole decode chunks) with
        left-padded prompts; logits (B, V) of each last prompt token, and the cache."""
        b, p = prompt_bp.shape
        chunk = min(self.decode_chunk, num_slots)
        num_slots = -(-num_slots // chunk) * chunk
        pad_b = p - prompt_lengths_b
        slots_p = jnp.arange(p)
        segment_ids_bp = (slots_p[None, :] >= pad_b[:, None]).astype(jnp.int32)
        positions_bp = jnp.maximum(slots_p[None, :] - pad_b[:, None], 0)
        cache = self.model.init_cache(b, num_slots, chunk)
        hidden_bpd, cache = self.model.hidden_with_cache(
            params, prompt_bp, positions_bp, segment_ids_bp, cache
        )
        return self.model.logits_from_hidden(params, hidden_bpd[:, -1:])[:, 0], cache

    def _decode_one(self, params, cache: KVCache, token_b, position_b, layers=None):
        """Append one token per row; logits (B, V) for the next. `layers`: the model's
        `layer_params`, when the caller sliced them (once, outside its loop)."""
        ones_b1 = jnp.ones_like(token_b)[:, None]
        logits_b1v, cache = self.model.logits_with_cache(
            params, token_b[:, None], position_b[:, None], ones_b1, cache, layers
        )
        return logits_b1v[:, 0], cache

    def _start_rollout(
        self, params, prompt_up, prompt_lengths_u, source_b, budget_b, live_b, key, num_slots
    ) -> _Rollout:
        """Prefill the U distinct prompts once, then give row b the logits and cache rows
        of prompt `source_b[b]` (U = B and `source_b` None: row b's own)."""
        self.compilations += 1  # runs only while tracing
        logits_bv, cache = self._prefill_padded(params, prompt_up, prompt_lengths_u, num_slots)
        prompt_lengths_b = prompt_lengths_u
        if source_b is not None:  # a copy of each prompt's cache per row (once per call)
            logits_bv, prompt_lengths_b = logits_bv[source_b], prompt_lengths_u[source_b]

            def rows(x_bksh):
                return constrain(x_bksh[source_b], CACHE_AXES, self.model.rules)

            cache = cache.replace(
                keys=tuple(map(rows, cache.keys)),
                values=tuple(map(rows, cache.values)),
                segment_ids_bs=cache.segment_ids_bs[source_b],
            )
        r, n = budget_b.shape[0], self.max_new_tokens
        rows_r = jnp.arange(r, dtype=jnp.int32)
        if key.ndim == 0:
            key_b = jax.vmap(jax.random.fold_in, (None, 0))(key, rows_r)
        else:  # one key per prompt; batch padding rows reuse the last
            key_b = key[jnp.minimum(rows_r, key.shape[0] - 1)]
        return _Rollout(
            cache=cache,
            logits_bv=logits_bv,
            key_b=key_b,
            result_row_b=rows_r,
            position_b=prompt_lengths_b,
            budget_b=budget_b,
            done_b=~live_b,
            step=jnp.zeros((), jnp.int32),
            tokens_rn=jnp.full((r, n), self.pad_id, jnp.int32),
            logprobs_rn=jnp.zeros((r, n), jnp.float32),
            mask_rn=jnp.zeros((r, n), bool),
        )

    def _advance(
        self, params, state: _Rollout, temperature, top_k, top_p, stop_ids, mode, layers=None
    ):
        """Sample one token per row, record it, and run it through the model."""
        keys_b = jax.vmap(jax.random.fold_in, (0, None))(state.key_b, state.step)
        token_b, logprob_b = sample_logits(
            state.logits_bv, keys_b, temperature, top_k, top_p, self.vocab_size, mode
        )
        active_b = ~state.done_b
        token_b = jnp.where(active_b, token_b, self.pad_id)
        rows_b, step = state.result_row_b, state.step
        logits_bv, cache = self._decode_one(params, state.cache, token_b, state.position_b, layers)
        state = state.replace(
            cache=cache,
            logits_bv=logits_bv,
            position_b=state.position_b + 1,
            done_b=state.done_b | jnp.isin(token_b, stop_ids) | (step + 1 >= state.budget_b),
            step=step + 1,
            tokens_rn=state.tokens_rn.at[rows_b, step].set(token_b),
            logprobs_rn=state.logprobs_rn.at[rows_b, step].set(jnp.where(active_b, logprob_b, 0)),
            mask_rn=state.mask_rn.at[rows_b, step].set(active_b),
        )
        return state, token_b

    def _decode_loop(self, params, state, temperature, top_k, top_p, stop_ids, mode):
        """Decode until the budget is out, every row has stopped, the cache (of this phase's
        width) is full, or (when the batch can be halved evenly over the mesh into at least
        `min_rows` rows) at most half the rows are live. Returns the state and whether
        generation is over (replicated)."""
        b = state.done_b.shape[0]
        can_halve = b % (2 * self.row_shards) == 0 and b // 2 >= self.min_rows

        slots = state.cache.segment_ids_bs.shape[1]

        def keep_going(state):
            live = jnp.sum(~state.done_b)
            in_window = state.cache.index < slots  # a free slot for this step's token
            halve = can_halve & (2 * live <= b)
            return (state.step < self.max_new_tokens) & (live > 0) & in_window & ~halve

        params = self.model.compute_params(params)  # once, not at every step
        layers = None if self.model.cfg.scan_layers else self.model.layer_params(params)

        def decode(state):
            sampling = (temperature, top_k, top_p, stop_ids, mode)
            return self._advance(params, state, *sampling, layers)[0]

        state = jax.lax.while_loop(keep_going, decode, state)
        over = (state.step >= self.max_new_tokens) | jnp.all(state.done_b)
        return state, self._replicated(over)

    def _compact_rows(self, state: _Rollout) -> _Rollout:
        """The same rollout in half the rows: the live ones (all of them), in order."""
        b = state.done_b.shape[0]
        keep_b = jnp.argsort(state.done_b, stable=True)[: b // 2]
        cache = state.cache
        return state.replace(
            cache=cache.replace(
                keys=tuple(k_bksh[keep_b] for k_bksh in cache.keys),
                values=tuple(v_bksh[keep_b] for v_bksh in cache.values),
                segment_ids_bs=cache.segment_ids_bs[keep_b],
            ),
            logits_bv=state.logits_bv[keep_b],
            key_b=state.key_b[keep_b],
            result_row_b=state.result_row_b[keep_b],
            position_b=state.position_b[keep_b],
            budget_b=state.budget_b[keep_b],
            done_b=state.done_b[keep_b],
        )

    def _phase_slots(self, prompt_len: int, filled_slots: int) -> int:
        """Cache slots of the decode phase after `filled_slots` are filled: the smallest
        prompt + i/phases of the new tokens above that, rounded up to 8 slots (to whole
        decode chunks when wider than one), at most prompt + all new tokens (rounded)."""
        n = self.max_new_tokens
        phases = self.decode_phases
        widths = [prompt_len + -(-n * i // phases) for i in range(1, phases + 1)]
        width = next(w for w in widths if w > filled_slots)
        quantum = self.decode_chunk if width > self.decode_chunk else 8
        return -(-width // quantum) * quantum

    def _grown_cache(self, cache: KVCache, num_slots: int) -> KVCache:
        """`cache` with empty slots appended up to `num_slots` (a copy, once per phase)."""

        extra = num_slots - cache.segment_ids_bs.shape[1]

        def grow(x_bksh):
            return jnp.pad(x_bksh, ((0, 0), (0, 0), (0, extra), (0, 0)))

        return cache.replace(
            keys=tuple(grow(k_bksh) for k_bksh in cache.keys),
            values=tuple(grow(v_bksh) for v_bksh in cache.values),
            segment_ids_bs=jnp.pad(cache.segment_ids_bs, ((0, 0), (0, extra))),
            chunk_slots=min(self.decode_chunk, num_slots),
        )

    def _replicated_results(self, state: _Rollout):
        return self._replicated((state.tokens_rn, state.logprobs_rn, state.mask_rn, state.step))

    def _stream_step(self, params, state, temperature, top_k, top_p, mode):
        """One token of a streamed row (row 0), replicated, and the advanced state."""
        stop_ids = jnp.full((1,), -1, jnp.int32)  # the host watches for stops
        state, token_b = self._advance(params, state, temperature, top_k, top_p, stop_ids, mode)
        return state, self._replicated(token_b[0])

    # --- the host-side API -------------------------------------------------------------

    def _budgets(self, prompts: Sequence[Sequence[int]], budgets) -> np.ndarray:
        """(len(prompts),) int32 new tokens each row may write: `budgets`, or N for all.
        GenerationError (one line) for an empty prompt, a budget outside 1..N, or a prompt
        whose budget does not fit model.max_seq_len."""
        if not prompts:
            raise GenerationError("no prompts given; pass at least one prompt")
        n, context = self.max_new_tokens, self.model.cfg.max_seq_len
        budget_b = np.full(len(prompts), n, np.int32) if budgets is None else np.asarray(budgets)
        if budget_b.shape != (len(prompts),):
            raise GenerationError(f"pass one budget per prompt ({len(prompts)}), not {budgets}")
        for index, (prompt, budget) in enumerate(zip(prompts, budget_b.tolist(), strict=True)):
            if len(prompt) == 0:
                raise GenerationError(f"prompt {index} is empty; give it at least one token")
            if not 1 <= budget <= n:
                raise GenerationError(f"prompt {index}'s budget {budget} is outside 1..{n}")
            if len(prompt) + budget > context:
                raise GenerationError(
                    f"prompt {index} has {len(prompt)} tokens but the context allows "
                    f"{context - budget} (model.max_seq_len={context} minus "
                    f"{'max_new_tokens=' if budgets is None else 'its budget of '}{budget}); "
                    "shorten the prompt or max_new_tokens"
                )
        return budget_b.astype(np.int32)

    def _rows(self, num_prompts: int) -> int:
        """Rows of a call's batch: a bucket of at least `num_prompts`, split evenly over the
        mesh."""
        batch = _bucket(num_prompts, BATCH_BUCKETS, num_prompts)
        return -(-batch // self.row_shards) * self.row_shards

    def _on_mesh(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _left_pad(self, prompts: Sequence[Sequence[int]], batch: int, budgeted: bool = False):
        """(batch, bucket) ids with each prompt ending at the last column, and lengths.

        The bucket never exceeds what the context leaves for a prompt: max_seq_len -
        max_new_tokens, or with per-row budgets max_seq_len - 1 (a bound that does not move
        with the budgets, so the turns of an episode reuse a few compiled shapes). Rows past
        the prompts (batch padding) hold one pad token."""
        limit = self.model.cfg.max_seq_len - (1 if budgeted else self.max_new_tokens)
        prompt_len = _bucket(max(map(len, prompts)), PROMPT_BUCKETS, limit)
        prompt_bp = np.full((batch, prompt_len), self.pad_id, np.int32)
        lengths_b = np.ones(batch, np.int32)
        for row, prompt in enumerate(prompts):
            prompt_bp[row, prompt_len - len(prompt) :] = prompt
            lengths_b[row] = len(prompt)
        return prompt_bp, lengths_b

    def _sampling_args(self, temperature: float, top_k: int, top_p: float):
        return np.float32(temperature), np.int32(top_k), np.float32(top_p)

    def _sampling_params(self, params: Params) -> Params:
        """The params a call samples with: a model's adapters merged in (under the mesh)."""
        if self._merge is None:
            return params
        with self._on_mesh():
            return self._merge(params)

    def __call__(
        self,
        params: Params,
        prompts: Sequence[Sequence[int]],
        key: jax.Array,
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop_ids: Sequence[int] = (),
        budgets: Sequence[int] | None = None,
    ) -> Completion:
        """Complete every prompt (a list of token ids) by up to `max_new_tokens` tokens, or
        prompt i by up to `budgets[i]` (<= max_new_tokens; a multi-turn episode's turn
        gets what its episode has left). A row cut off by its budget simply ends there.

        `key` is one key (prompt i draws with fold_in(key, i)) or one key per prompt, shape
        (len(prompts),): a prompt with the key fold_in(key, i) alone completes exactly as
        prompt i of the batch."""
        mode = sampling_mode(temperature, top_k, top_p)
        budget_b = self._budgets(prompts, budgets)
        params = self._sampling_params(params)
        if key.ndim and key.shape != (len(prompts),):
            raise GenerationError(
                f"key has shape {key.shape}; pass one key, or one per prompt ({len(prompts)},)"
            )
        num_rows = len(prompts)
        batch = self._rows(num_rows)
        # Each distinct prompt is prefilled once (GRPO's G replies share theirs).
        distinct = list(dict.fromkeys(map(tuple, prompts)))
        source_b = None
        if len(distinct) < num_rows:
            index = {prompt: i for i, prompt in enumerate(distinct)}
            source_b = np.zeros(batch, np.int32)  # batch padding rows read prompt 0
            source_b[:num_rows] = [index[tuple(prompt)] for prompt in prompts]
            prompts = distinct
        prefill_rows = batch if source_b is None else self._rows(len(prompts))
        prompt_bp, lengths_b = self._left_pad(prompts, prefill_rows, budgeted=budgets is not None)
        budget_r = np.full(batch, self.max_new_tokens, np.int32)
        budget_r[:num_rows] = budget_b
        live_b = np.arange(batch) < num_rows
        stops = np.asarray(list(stop_ids) or [-1], np.int32)
        sampling = self._sampling_args(temperature, top_k, top_p)
        with self._on_mesh():
            prompt_len = prompt_bp.shape[1]
            slots = self._phase_slots(prompt_len, prompt_len)
            state = self._start(
                params, prompt_bp, lengths_b, source_b, budget_r, live_b, key, slots
            )
            while True:
                state, over = self._decode(params, state, *sampling, stops, mode)
                if bool(over):
                    break
                if int(state.cache.index) >= slots:  # the next phase: a wider cache
                    slots = self._phase_slots(prompt_len, slots)
                    state = state.replace(cache=self._grow(state.cache, slots))
                else:
                    state = self._compact(state)
            tokens, logprobs, mask, steps = jax.device_get(self._results(state))
        return Completion(tokens[:num_rows], logprobs[:num_rows], mask[:num_rows], int(steps))

    def stream(
        self,
        params: Params,
        prompt: Sequence[int],
        key: jax.Array,
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop_ids: Sequence[int] = (),
    ) -> Iterator[int]:
        """Yield the tokens of one prompt's completion as they are sampled (stop included);
        the same tokens as row 0 of `__call__` with the same key."""
        mode = sampling_mode(temperature, top_k, top_p)
        self._budgets([prompt], None)
        batch = self.row_shards  # one live row, the batch split evenly over the mesh
        prompt_bp, lengths_b = self._left_pad([prompt], batch)
        live_b = np.arange(batch) < 1
        sampling = self._sampling_args(temperature, top_k, top_p)
        params = self.model.compute_params(self._sampling_params(params))  # once, not per token
        with self._on_mesh():
            slots = prompt_bp.shape[1] + self.max_new_tokens
            budget_r = np.full(batch, self.max_new_tokens, np.int32)
            state = self._start(params, prompt_bp, lengths_b, None, budget_r, live_b, key, slots)
        for _ in range(self.max_new_tokens):
            with self._on_mesh():
                state, token = self._step(params, state, *sampling, mode)
            token = int(token)
            yield token
            if token in stop_ids:
                return
