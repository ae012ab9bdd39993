"""Multi-turn episodes with tools (`jaxllm.rl.episodes`): token-by-token masks of two- and
three-turn episodes, tool errors, budgets and turn limits (a scripted sampler); then a
tiny model taught to call the calculator: batched episodes equal each run alone, the
trainer's log-probs equal the sampler's across turn boundaries, tool results are never
trained, and `jaxllm grpo` with tools resumes exactly after kill -9."""

import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    TWO_STEPS,
    cpu_environment,
    finished_checkpoints,
    kill_9_after_first_checkpoint,
)

from jaxllm.chat import render_for_generation, render_tool_results
from jaxllm.cli import main as cli_main
from jaxllm.config import GRPOConfig, check_for_stage, load_config
from jaxllm.data import tool_task
from jaxllm.errors import ConfigError
from jaxllm.generate import Completion, Generator
from jaxllm.metrics import read_metrics
from jaxllm.rl.episodes import episode_completion, episode_figures, run_episodes
from jaxllm.rl.rollouts import completion_outputs, rollout_rows
from jaxllm.stages.common import load_run
from jaxllm.stages.grpo import Settings, grpo_loss
from jaxllm.tokenizer import load_tokenizer
from jaxllm.tools import tool_call_block

BYTES = load_tokenizer("bytes")
S = BYTES.special_ids
IM_START, IM_SEP, IM_END = S["<|im_start|>"], S["<|im_sep|>"], S["<|im_end|>"]
PAD = BYTES.pad_id
STOPS = list(BYTES.stop_ids)
PROMPT = [{"role": "user", "content": "What is 12 * 34?"}]
CALL = tool_call_block("calculator", {"expression": "12 * 34"})


class ScriptedSampler:
    """A stand-in for `Generator`: the turn-th call writes `turns[turn]` (ids, stop token
    included) in every row, cut at the row's budget; log-probs -0.5 on each token."""

    def __init__(self, turns: list[str], max_new_tokens: int):
        self.turns = [BYTES.encode(text) + [IM_END] for text in turns]
        self.max_new_tokens = max_new_tokens
        self.calls = []

    def __call__(self, params, prompts, keys, *, stop_ids, budgets, **sampling):
        self.calls.append((prompts, budgets))
        ids = self.turns[len(self.calls) - 1]
        b, n = len(prompts), self.max_new_tokens
        tokens = np.full((b, n), PAD, np.int32)
        mask = np.zeros((b, n), bool)
        for row, budget in enumerate(budgets):
            written = ids[:budget]
            tokens[row, : len(written)] = written
            mask[row, : len(written)] = True
        return Completion(tokens, np.where(mask, -0.5, 0.0).astype(np.float32), mask, n)


def episodes_of(turns, max_turns=3, max_new_tokens=200, tools=("calculator",), rows=1):
    sampler = ScriptedSampler(turns, max_new_tokens)
    prompt_ids = render_for_generation(BYTES, PROMPT)
    episodes = run_episodes(
        sampler,
        None,
        BYTES,
        [prompt_ids] * rows,
        [PROMPT] * rows,
        [list(tools)] * rows,
        jax.random.split(jax.random.key(0), rows),
        max_turns=max_turns,
        stop_ids=STOPS,
        temperature=1.0,
    )
    return episodes, sampler, prompt_ids


def tool_message(content: str) -> list[int]:
    return [IM_START, *BYTES.encode("tool"), IM_SEP, *BYTES.encode(content), IM_END]


def tool_turn(content: str) -> list[int]:
    """jaxllm's template between two assistant turns: the tool message, the next header."""
    return tool_message(content) + [IM_START, *BYTES.encode("assistant"), IM_SEP]


def test_a_two_turn_episode_trains_the_call_and_the_answer_and_not_the_result():
    (episode,), sampler, prompt_ids = episodes_of([CALL, "408"])
    call, answer = BYTES.encode(CALL) + [IM_END], BYTES.encode("408") + [IM_END]
    between = tool_turn("408")
    assert episode.ids == call + between + answer
    assert episode.written == [True] * len(call) + [False] * len(between) + [True] * 4
    assert episode.logprobs == [-0.5] * len(call) + [0.0] * len(between) + [-0.5] * 4
    assert episode.messages == [
        {"role": "assistant", "content": CALL},
        {"role": "tool", "name": "calculator", "content": "408"},
        {"role": "assistant", "content": "408"},
    ]
    assert (episode.turns, episode.tool_calls, episode.tool_errors) == (2, 1, 0)
    assert not episode.truncated and episode.last_turn == answer
    # The second turn continues the whole context and gets what the first left of N.
    (second_prompt,), second_budget = sampler.calls[1]
    assert second_prompt == prompt_ids + call + between
    assert second_budget == [200 - len(call) - len(between)]
    # As a rollout row: the result is context (segment 1) but never trained (mask 0).
    completion = episode_completion([episode], 200, PAD)
    rows = rollout_rows([prompt_ids], completion, len(prompt_ids), PAD, STOPS)
    p, length = len(prompt_ids), len(episode.ids)
    assert rows["tokens_bt"][0, p : p + length].tolist() == episode.ids
    assert rows["mask_bn"][0, :length].tolist() == [float(w) for w in episode.written]
    assert rows["segment_ids_bt"][0].tolist() == [1] * (p + length) + [0] * (
        rows["tokens_bt"].shape[1] - p - length
    )
    assert rows["positions_bt"][0, p + length - 1] == p + length - 1


def test_a_three_turn_episode_counts_its_errors_and_masks_every_inserted_token():
    malformed = '<tool_call>\n{"name": "calculator", "arguments": \n</tool_call>'
    unknown = tool_call_block("search", {"query": "x"})
    (episode,), _, _ = episodes_of([malformed, unknown + "\n" + CALL, "408"], max_new_tokens=600)
    assert (episode.turns, episode.tool_calls, episode.tool_errors) == (3, 3, 2)
    results = [m for m in episode.messages if m["role"] == "tool"]
    assert [r["content"].startswith("error:") for r in results] == [True, True, False]
    assert results[2]["content"] == "408"
    pieces = [
        (BYTES.encode(malformed) + [IM_END], True),
        (tool_turn(results[0]["content"]), False),
        (BYTES.encode(unknown + "\n" + CALL) + [IM_END], True),
        (tool_message(results[1]["content"]), False),  # two results, then the header
        (tool_turn("408"), False),
        (BYTES.encode("408") + [IM_END], True),
    ]
    assert episode.ids == [t for ids, _ in pieces for t in ids]
    assert episode.written == [w for ids, w in pieces for _ in ids]
    figures = episode_figures([episode])
    assert {k: v.tolist() for k, v in figures.items()} == {
        "turns": [3.0],
        "tool_calls": [3.0],
        "tool_errors": [2.0],
        "truncated": [0.0],
    }


def test_episodes_end_truncated_at_max_turns_or_their_budget():
    (capped,), _, _ = episodes_of([CALL, CALL, "408"], max_turns=2)
    assert (capped.turns, capped.tool_calls, capped.truncated) == (2, 1, True)
    call = len(BYTES.encode(CALL)) + 1
    (short,), sampler, _ = episodes_of([CALL, "408"], max_new_tokens=call + 5)
    assert short.truncated and short.turns == 1 and len(sampler.calls) == 1  # no room left
    (cut,), _, _ = episodes_of([CALL], max_new_tokens=20)
    assert cut.truncated and cut.ids == BYTES.encode(CALL)[:20] and cut.tool_calls == 0
    (plain,), _, _ = episodes_of(["408"], tools=())
    assert not plain.truncated and plain.turns == 1


def test_a_call_to_a_tool_the_prompt_does_not_offer_is_an_error_result():
    (episode,), _, _ = episodes_of([CALL, "no"], tools=())
    assert episode.tool_errors == 1 and "calculator" in episode.messages[1]["content"]
    assert episode.messages[1]["content"].startswith("error:")


def test_a_model_template_writes_tool_results_as_the_template_does():
    """chatml (Qwen's layout): the newline after the reply's <|im_end|>, then the result."""
    chatml = load_tokenizer("bytes", chat_template="chatml")
    messages = [*PROMPT, {"role": "assistant", "content": CALL}]
    results = [{"role": "tool", "name": "calculator", "content": "408"}]
    ids = render_tool_results(chatml, messages, results)
    assert chatml.decode(ids) == ("\n<|im_start|>tool\n408<|im_end|>\n<|im_start|>assistant\n")


# --- a tiny model that calls the calculator ------------------------------------------------


@pytest.fixture(scope="module")
def caller(tmp_path_factory):
    """A tiny model SFT-trained on demonstrations that all call the calculator."""
    root = tmp_path_factory.mktemp("episodes")
    files = tool_task.write_files(root / "data", 600, 64, 16, seed=0)
    demos = tool_task.demonstrations(600, seed=0, tool_fraction=1.0)
    files["sft"].write_text("".join(json.dumps(d) + "\n" for d in demos))
    argv = [
        "sft",
        "preset=tiny",
        "model.max_seq_len=192",
        f"data.path={files['sft']}",
        f"out_dir={root / 'sft'}",
        "train.steps=150",
        "train.batch_size=16",
        "train.seq_len=160",
        "optimizer.lr=3e-3",
        "optimizer.warmup_steps=10",
        "train.eval_every=150",
        "checkpoint.every=150",
        "sft.eval_prompts=0",
        "train.samples=0",
    ]
    assert cli_main(argv) == 0
    return root, files


def test_batched_episodes_equal_each_alone_and_log_probs_match_across_turns(caller):
    root, files = caller
    loaded = load_run(root / "sft")
    tokenizer, model, params = loaded.tokenizer, loaded.model, loaded.params
    generator = Generator(model, tokenizer.vocab_size, tokenizer.pad_id, 144)
    prompts = [json.loads(line) for line in files["prompts"].read_text().splitlines()[:6]]
    messages = [[{"role": "user", "content": row["prompt"]}] for row in prompts]
    prompt_ids = [render_for_generation(tokenizer, m) for m in messages]
    keys = jax.random.split(jax.random.key(3), len(prompts))
    run = dict(max_turns=3, stop_ids=STOPS, temperature=1.0)
    tools = [["calculator"]] * len(prompts)
    batched = run_episodes(generator, params, tokenizer, prompt_ids, messages, tools, keys, **run)
    assert max(e.turns for e in batched) >= 2, "the model never called the tool"
    for i in range(len(prompts)):
        (alone,) = run_episodes(
            generator, params, tokenizer, prompt_ids[i : i + 1], messages[i : i + 1],
            tools[:1], keys[i : i + 1], **run,
        )  # fmt: skip
        assert alone.ids == batched[i].ids and alone.messages == batched[i].messages

    completion = episode_completion(batched, 144, tokenizer.pad_id)
    p = max(map(len, prompt_ids))
    rows = rollout_rows(prompt_ids, completion, p, tokenizer.pad_id, STOPS)
    rows = {k: jnp.asarray(v) for k, v in rows.items()}
    out = completion_outputs(model, params, rows, 1.0, tokenizer.vocab_size)
    written = np.asarray(rows["mask_bn"]) > 0
    later_turns = written & (np.cumsum(completion.inserted[:, : written.shape[1]], 1) > 0)
    assert later_turns.sum() > 0  # tokens written after a tool result
    gap = np.abs(np.asarray(out.logprobs_bn) - np.asarray(rows["sampler_logprobs_bn"]))
    assert gap[written].max() < 1e-4

    # GRPO's loss on these rows: ratio exactly 1 on the first update, and a tool result's
    # tokens carry no gradient (the loss is the same whatever their advantages say).
    n = rows["mask_bn"].shape[1]
    advantages = jnp.asarray(np.where(written, 1.0, 0.0), jnp.float32)
    train_rows = {
        "tokens_bt": rows["tokens_bt"],
        "positions_bt": rows["positions_bt"],
        "segment_ids_bt": rows["segment_ids_bt"],
        "mask_bn": rows["mask_bn"],
        "old_logprobs_bn": out.logprobs_bn,
        "advantages_bn": advantages,
    }
    # two iterations: the loss reads the old log-probs from the rows
    s = Settings(GRPOConfig(group_size=2, max_new_tokens=n, iterations=2), tokenizer.vocab_size)
    loss, aux = grpo_loss(model, params, train_rows, s=s)
    ratio_sum, tokens = aux.means["ratio"]
    assert float(ratio_sum) == pytest.approx(float(tokens), abs=1e-5)
    poisoned = {**train_rows, "advantages_bn": advantages + 100.0 * completion.inserted[:, :n]}
    assert float(grpo_loss(model, params, poisoned, s=s)[0]) == float(loss)


COMMAND = [sys.executable, "-m", "jaxllm.cli"]


def tool_grpo_argv(root, files, out_dir) -> list[str]:
    return [
        "grpo",
        f"grpo.policy_from={root / 'sft'}",
        f"data.path={files['prompts']}",
        f"data.eval_path={files['eval']}",
        f"out_dir={out_dir}",
        "train.steps=3",
        "train.batch_size=2",
        "train.eval_every=3",
        "train.samples=2",
        "checkpoint.every=2",
        "optimizer.lr=3e-3",
        "optimizer.warmup_steps=0",
        "grpo.group_size=4",
        "grpo.max_prompt_tokens=40",
        "grpo.max_new_tokens=144",
        "grpo.max_turns=3",
        "grpo.tools=[calculator]",
        "grpo.eval_prompts=4",
        "grpo.pass_k=2",
    ]


def test_tool_grpo_resumes_after_kill_9_with_the_same_metrics(caller, tmp_path):
    root, files = caller
    argv = tool_grpo_argv(root, files, tmp_path / "whole")
    subprocess.run([*COMMAND, *argv], env=cpu_environment(1), check=True, capture_output=True)
    lines = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    train = {r["step"]: r for r in lines if r["split"] == "train"}
    assert sorted(train) == [1, 2, 3]
    assert max(r["turns"] for r in train.values()) > 1
    assert all(r["logprob_gap"] < 1e-4 for r in train.values())
    evals = [r for r in lines if r["split"] == "eval"]
    assert {"accuracy", "tool_call_rate", "turns", "tool_calls", "tool_errors"} <= set(evals[-1])
    samples = [json.loads(line) for line in (tmp_path / "whole" / "samples.jsonl").open()]
    assert samples[0]["messages"][0]["role"] == "assistant"

    killed = tmp_path / "killed"
    kill_9_after_first_checkpoint([*COMMAND, *tool_grpo_argv(root, files, killed)], killed)
    assert finished_checkpoints(killed) == [2]
    subprocess.run(
        [*COMMAND, *tool_grpo_argv(root, files, killed)],
        env=cpu_environment(1),
        check=True,
        capture_output=True,
    )
    resumed = {
        r["step"]: r for r in read_metrics(killed / "metrics.jsonl") if r["split"] == "train"
    }
    compared = ("loss", "reward", "turns", "tool_calls", "grad_norm", "response_length")
    for step in (1, 2, 3):
        assert {k: resumed[step][k] for k in compared} == {k: train[step][k] for k in compared}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["grpo.max_turns=0"], "grpo.max_turns must be >= 1, got 0"),
        (["grpo.max_turns=3", "grpo.tools=[abacus]"], "grpo.tools names unknown tool(s) abacus"),
        (["grpo.tools=[calculator]"], "can never be used at grpo.max_turns=1"),
        (["ppo.max_turns=3", "ppo.tools=[abacus]"], "ppo.tools names unknown tool(s) abacus"),
    ],
)
def test_bad_tool_settings_are_one_clear_line(tmp_path, overrides, message):
    stage = overrides[0].split(".")[0]
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_for_stage(load_config(None, overrides), stage)


def test_ppo_rolls_out_tool_episodes_and_scores_each_whole(caller, tmp_path):
    """PPO with tools: the reward model reads each episode to its last token (tool results
    included), GAE skips the tool results, and the eval lines count the calls."""
    root, files = caller
    preferences = tmp_path / "preferences.jsonl"
    pairs = [
        {"prompt": "What is 12 * 30?", "chosen": "360", "rejected": "36"},
        {"prompt": "What is 11 * 11?", "chosen": "121", "rejected": "12"},
    ]
    preferences.write_text("".join(json.dumps(p) + "\n" for p in pairs * 8))
    reward = [
        "reward",
        f"reward.init_from={root / 'sft'}",
        f"data.path={preferences}",
        "reward.max_replies=2",
        "train.batch_size=8",
        "train.seq_len=64",
        f"out_dir={tmp_path / 'rm'}",
        *TWO_STEPS,
    ]
    assert cli_main(reward) == 0
    ppo = [
        "ppo",
        f"ppo.policy_from={root / 'sft'}",
        f"ppo.reward_from={tmp_path / 'rm'}",
        f"data.path={files['prompts']}",
        f"data.eval_path={files['eval']}",
        f"out_dir={tmp_path / 'ppo'}",
        "train.batch_size=8",
        "train.eval_every=2",
        "train.samples=1",
        "ppo.max_prompt_tokens=40",
        "ppo.max_new_tokens=144",
        "ppo.max_turns=3",
        "ppo.tools=[calculator]",
        "ppo.eval_prompts=4",
        "train.steps=2",
        "checkpoint.every=2",
    ]
    assert cli_main(ppo) == 0
    lines = read_metrics(tmp_path / "ppo" / "metrics.jsonl")
    train = [r for r in lines if r["split"] == "train"]
    assert max(r["turns"] for r in train) > 1 and all(np.isfinite(r["loss"]) for r in train)
    assert {"tool_call_rate", "tool_calls_greedy", "turns_greedy"} <= set(lines[-1])
    sample = json.loads((tmp_path / "ppo" / "samples.jsonl").read_text().splitlines()[0])
    # an episode ends on its final answer, or cut off (a tool's results may be its last)
    roles = [m["role"] for m in sample["messages"]]
    assert roles[0] == "assistant" and set(roles) <= {"assistant", "tool"}
    assert roles[-1] == "assistant" or sample["truncated"]
