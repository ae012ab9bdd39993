"""Multi-turn episodes: the model writes a turn, the tools it calls answer, it goes on.

An episode starts from a rendered prompt and alternates, up to `max_turns` assistant turns:
1. the model writes until its stop token (`<|im_end|>`), or until the episode's budget of
   N tokens after the prompt is spent;
2. the `<tool_call>` blocks of that turn (`jaxllm.tools.parse_tool_calls`) run, each
   returning a string (an error string when the call is malformed, names a tool the
   prompt does not offer, raises or times out: counted in `tool_errors`, never fatal);
3. their results are appended as `tool` messages in the chat template
   (`chat.render_tool_results`), followed by the opening of the next assistant turn.
An episode ends at a turn without calls (its final answer), or *truncated*: its budget
ran out, the template text of the results did not fit, or turn `max_turns` still called
tools.

Every turn of every live episode is sampled in one batched `Generator` call (each row
with what its episode has left of N), so a batch keeps running while its episodes wait on
tools; an episode's turn t draws with fold_in(key_i, t), so its tokens do not depend on
its batch-mates (the same as running it alone).

`episode_completion` lays the episodes out as the sampler's `Completion`: the episode's
tokens after the prompt, `mask` on the tokens the model wrote (the only ones with
log-probs, trained), `inserted` on the tool results and template text between turns
(context the model reads, never trained).

`roll_out` is what RL stages and `jaxllm eval` call: one reply per row, or with
`max_turns` above 1 an episode per row, as a timed `Rollout`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import numpy as np

from jaxllm.chat import render_tool_results
from jaxllm.generate import Completion, Generator
from jaxllm.model import Params
from jaxllm.tokenizer import Tokenizer
from jaxllm.tools import parse_tool_calls, run_tool_call, tool_schemas


@dataclasses.dataclass
class Episode:
    """One multi-turn episode after its prompt (host lists, grown turn by turn)."""

    prompt: list[dict]  # the prompt's messages
    tools: list[str]  # the tools this episode may call
    ids: list[int] = dataclasses.field(default_factory=list)  # every token after the prompt
    written: list[bool] = dataclasses.field(default_factory=list)  # by the model (trained)
    logprobs: list[float] = dataclasses.field(default_factory=list)  # 0 where not written
    messages: list[dict] = dataclasses.field(default_factory=list)  # assistant and tool turns
    last_turn: list[int] = dataclasses.field(default_factory=list)  # its stop token included
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    truncated: bool = False
    done: bool = False


def run_episodes(
    generator: Generator,
    params: Params,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    prompts: Sequence[Sequence[dict]],
    tools: Sequence[Sequence[str]],
    keys: jax.Array,
    *,
    max_turns: int,
    stop_ids: Sequence[int],
    tool_timeout_s: float = 5.0,
    **sampling,
) -> list[Episode]:
    """Run one episode per row: `prompt_ids[i]` (the rendered `prompts[i]`), offering
    `tools[i]`, with key `keys[i]` (shape (B,)), each at most N = the generator's
    `max_new_tokens` tokens after its prompt. `sampling`: temperature, top_k, top_p."""
    budget = generator.max_new_tokens
    stops = set(stop_ids)
    episodes = [Episode(list(p), list(t)) for p, t in zip(prompts, tools, strict=True)]
    for turn in range(max_turns):
        live = [i for i, episode in enumerate(episodes) if not episode.done]
        if not live:
            break
        turn_keys = jax.vmap(jax.random.fold_in, (0, None))(keys[np.asarray(live)], turn)
        completion = generator(
            params,
            [list(prompt_ids[i]) + episodes[i].ids for i in live],
            turn_keys,
            stop_ids=stop_ids,
            budgets=[budget - len(episodes[i].ids) for i in live],
            **sampling,
        )
        for row, i in enumerate(live):
            _take_turn(
                episodes[i],
                completion,
                row,
                tokenizer,
                stops,
                budget,
                last=turn == max_turns - 1,
                timeout_s=tool_timeout_s,
            )
    return episodes


def _take_turn(
    episode: Episode,
    completion: Completion,
    row: int,
    tokenizer: Tokenizer,
    stops: set[int],
    budget: int,
    last: bool,
    timeout_s: float,
) -> None:
    """Append row `row` of `completion` to `episode` as its next assistant turn; run the
    turn's tool calls and append their results, or end the episode."""
    ids = completion.row(row)
    episode.ids += ids
    episode.written += [True] * len(ids)
    episode.logprobs += completion.logprobs[row][completion.mask[row]].tolist()
    episode.last_turn = ids
    episode.turns += 1
    text = tokenizer.decode([t for t in ids if t not in stops])
    episode.messages.append({"role": "assistant", "content": text})
    calls = parse_tool_calls(text)
    ended = bool(ids) and ids[-1] in stops
    if not ended or not calls or last:
        episode.done = True
        episode.truncated = not ended or bool(calls)
        return
    results = [run_tool_call(call, episode.tools, timeout_s) for call in calls]
    episode.tool_calls += len(calls)
    episode.tool_errors += sum(result.error for result in results)
    messages = [
        {"role": "tool", "name": call.name or "", "content": result.content}
        for call, result in zip(calls, results, strict=True)
    ]
    schemas = tool_schemas(episode.tools) if episode.tools else None
    between = render_tool_results(
        tokenizer, [*episode.prompt, *episode.messages], messages, schemas
    )
    episode.messages += messages
    if len(episode.ids) + len(between) >= budget:  # no room left to write a token
        episode.done = episode.truncated = True
        return
    episode.ids += between
    episode.written += [False] * len(between)
    episode.logprobs += [0.0] * len(between)


def episode_completion(episodes: Sequence[Episode], max_new_tokens: int, pad_id: int):
    """The episodes as a `Completion` of N = `max_new_tokens` columns: tokens, log-probs and
    `mask` of what the model wrote, `inserted` on the tokens between its turns, and
    `num_steps` the longest episode (how many columns a batch keeps)."""
    b = len(episodes)
    tokens = np.full((b, max_new_tokens), pad_id, np.int32)
    logprobs = np.zeros((b, max_new_tokens), np.float32)
    written = np.zeros((b, max_new_tokens), bool)
    inserted = np.zeros((b, max_new_tokens), bool)
    for row, episode in enumerate(episodes):
        length = len(episode.ids)
        tokens[row, :length] = episode.ids
        logprobs[row, :length] = episode.logprobs
        written[row, :length] = episode.written
        inserted[row, :length] = ~np.asarray(episode.written, bool)
    longest = max((len(e.ids) for e in episodes), default=0)
    return Completion(tokens, logprobs, written, longest, inserted=inserted)


def episode_figures(episodes: Sequence[Episode]) -> dict[str, np.ndarray]:
    """(B,) float32 per-episode figures: assistant `turns`, `tool_calls`, `tool_errors`,
    and whether it was `truncated`."""
    return {
        name: np.array([float(getattr(e, name)) for e in episodes], np.float32)
        for name in ("turns", "tool_calls", "tool_errors", "truncated")
    }


@dataclasses.dataclass(frozen=True)
class Rollout:
    """One batch of rollouts: the rows' completion (of multi-turn episodes: every token
    after the prompt, `mask` on those the model wrote), the episodes when `max_turns` > 1,
    and the seconds sampling took (tools included)."""

    completion: Completion
    episodes: list[Episode] | None
    elapsed_s: float

    def replies(self) -> list[list[int]]:
        """Each row's reply ids, stop token included: of an episode, its last turn."""
        if self.episodes is not None:
            return [episode.last_turn for episode in self.episodes]
        return [self.completion.row(i) for i in range(len(self.completion.tokens))]


def roll_out(
    generator: Generator,
    params: Params,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    keys: jax.Array,
    *,
    stop_ids: Sequence[int],
    max_turns: int = 1,
    messages: Sequence[Sequence[dict]] = (),
    tools: Sequence[Sequence[str]] = (),
    max_rows: int | None = None,
    **sampling,
) -> Rollout:
    """The replies to `prompt_ids` (one key per row, or one for all, row i then drawing
    with fold_in(key, i)), timed after the params are ready (the time is the rollout's
    alone). With `max_turns` > 1, one episode per row (`messages[i]` the prompt rendered as
    `prompt_ids[i]`, offering `tools[i]`), run in calls of at most `max_rows` rows (default:
    one call). `sampling`: temperature, top_k, top_p."""
    jax.block_until_ready(params)
    start = time.perf_counter()
    if max_turns == 1:
        completion = generator(params, prompt_ids, keys, stop_ids=stop_ids, **sampling)
        return Rollout(completion, None, time.perf_counter() - start)
    if keys.ndim == 0:
        keys = jax.vmap(jax.random.fold_in, (None, 0))(keys, np.arange(len(prompt_ids)))
    step = max_rows or len(prompt_ids)
    episodes = []
    for first in range(0, len(prompt_ids), step):
        rows = slice(first, first + step)
        episodes += run_episodes(
            generator,
            params,
            tokenizer,
            prompt_ids[rows],
            messages[rows],
            tools[rows],
            keys[rows],
            max_turns=max_turns,
            stop_ids=stop_ids,
            **sampling,
        )
    completion = episode_completion(episodes, generator.max_new_tokens, tokenizer.pad_id)
    return Rollout(completion, episodes, time.perf_counter() - start)
