"""Prompts for sampling: what the labelers, PPO and GRPO roll out from.

A `.jsonl` line is `{"prompt": P, ...}` (P a string, one user turn, or a message list) or
`{"messages": [...], ...}` (a conversation; a trailing assistant turn is dropped, so a
chat file for SFT serves as prompts). A line with neither holds P in the field that
`PromptFields.prompt` names (`data.prompt_field`, e.g. GSM8K's `question` or MATH's
`problem`). Any other field (`answer`, `family`, a gold rule's parameters, `tools`: the
names of the tools a multi-turn episode may call, `answer_format`: how the `correct`
reward reads this prompt's replies) rides along in `Prompt.fields` for the reward
functions. `fields["answer"]` is the answer that `PromptFields.answer`'s field states, read
by `PromptFields.answer_format` (`jaxllm.answers.extract_answer`): GSM8K's `#### N` of its
`answer`, or the `\\boxed{}` of MATH's `solution`; a string read `plain` is stripped, and
another value read `plain` is kept as it is.

`data.path` may also be a Hugging Face dataset, `hf:NAME/CONFIG[:SPLIT]` and the other
forms of `jaxllm.data.corpus.hf_dataset` (SPLIT defaults to `data.hf_split`), its rows read
like lines; name the held-out split in `data.eval_path`, e.g. `data.path=hf:openai/gsm8k/main`
and `data.eval_path=hf:openai/gsm8k/main:test`. `builtin` gives the SFT stage's verifiable
task families (see `jaxllm.data.builtin_chat`) with their answers, and `calculator` the
multiplication task that needs the calculator tool (`jaxllm.data.tool_task`; its held-out
prompts are a fixed part of the task that no training row draws). Every problem is a
`DataError` naming the file and line (a dataset's row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from jaxllm.answers import ANSWER_FORMATS, extract_answer
from jaxllm.chat import render_for_generation
from jaxllm.data import builtin_chat, tool_task
from jaxllm.data.conversations import Conversation, checked_messages, read_jsonl_records
from jaxllm.data.corpus import hf_records
from jaxllm.errors import ConfigError, DataError
from jaxllm.tokenizer import Tokenizer
from jaxllm.tools import check_tools, tool_schemas

if TYPE_CHECKING:
    from jaxllm.config import DataConfig


@dataclass(frozen=True)
class Prompt:
    """The messages a reply continues, and the record's other fields."""

    messages: Conversation
    fields: dict = field(default_factory=dict)
    where: str = field(default="", compare=False)  # file:line it was read from ("": built in)

    @property
    def text(self) -> str:
        """The last user turn (what a reward rule or a sample line shows)."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


@dataclass(frozen=True)
class PromptFields:
    """Where a record keeps its prompt when it has no `prompt` or `messages`, where it
    keeps its answer, and how that field states the answer (one of `ANSWER_FORMATS`): the
    config's `data.prompt_field`, `data.answer_field` and `data.answer_format`."""

    prompt: str = "prompt"
    answer: str = "answer"
    answer_format: str = "plain"

    @classmethod
    def of(cls, data: DataConfig) -> PromptFields:
        """The fields a `DataConfig` names."""
        return cls(data.prompt_field, data.answer_field, data.answer_format)


def _answer_fields(record: dict, where: str, fields: PromptFields) -> dict:
    """`record`'s `answer` (read from `fields.answer`) and `answer_format`, checked."""
    found = {}
    value = record.get(fields.answer)
    if value is not None:
        if isinstance(value, str) or fields.answer_format != "plain":
            found["answer"] = extract_answer(str(value), fields.answer_format)
            if not found["answer"]:
                raise DataError(
                    f"{where}: '{fields.answer}' states no answer in the "
                    f"{fields.answer_format} format ({str(value)[-60:]!r}); fix the line or "
                    "set data.answer_field and data.answer_format"
                )
        else:
            found["answer"] = value
    if "answer_format" in record and record["answer_format"] not in ANSWER_FORMATS:
        raise DataError(
            f"{where}: 'answer_format' {record['answer_format']!r} is unknown; use one of "
            f"{', '.join(ANSWER_FORMATS)}"
        )
    return found


def prompt_of(record: object, where: str, fields: PromptFields = PromptFields()) -> Prompt:
    """One prompt line as a `Prompt`, or a DataError naming `where`."""
    names = list(dict.fromkeys(("prompt", "messages", fields.prompt)))
    if not isinstance(record, dict):
        raise DataError(
            f"{where}: a line must be a JSON object with "
            + " or ".join(f"'{name}'" for name in names)
        )
    if "prompt" in record or ("messages" not in record and fields.prompt in record):
        key = "prompt" if "prompt" in record else fields.prompt
        value = record[key]
        if isinstance(value, str):
            value = [{"role": "user", "content": value}]
        messages = checked_messages(value, where, key)
    elif "messages" in record:
        key = "messages"
        messages = checked_messages(record["messages"], where)
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
    else:
        raise DataError(f"{where}: no " + " and no ".join(f"'{name}'" for name in names))
    if not any(m["role"] == "user" for m in messages):
        raise DataError(f"{where}: the prompt has no user turn to reply to")
    others = {k: v for k, v in record.items() if k not in ("prompt", "messages", key)}
    return Prompt(messages, {**others, **_answer_fields(record, where, fields)}, where)


def _builtin(examples: list[builtin_chat.Example]) -> list[Prompt]:
    return [
        Prompt([{"role": "user", "content": e.prompt}], {"answer": e.answer, "family": e.family})
        for e in examples
    ]


def _calculator(rows: list[dict]) -> list[Prompt]:
    return [prompt_of(row, "") for row in rows]


def builtin_prompts(
    count: int, seed: int, families: tuple[str, ...] = builtin_chat.FAMILIES
) -> list[Prompt]:
    """`count` built-in task prompts (`families` in turn), with `answer` and `family`."""
    return _builtin(builtin_chat.examples(count, seed, families))


def builtin_split(
    count: int, held_out: int, seed: int, families: tuple[str, ...] = builtin_chat.FAMILIES
) -> tuple[list[Prompt], list[Prompt]]:
    """`count` built-in training prompts of `families` and `held_out` others none of them
    repeats."""
    train = builtin_chat.examples(count, seed, families)
    return _builtin(train), _builtin(builtin_chat.held_out(held_out, seed + 1, train, families))


def read_prompts(
    path: str | Path,
    count: int | None = None,
    seed: int = 0,
    fields: PromptFields = PromptFields(),
    hf_split: str = "train",
) -> list[Prompt]:
    """The prompts of the .jsonl files under `path`, or of the Hugging Face dataset
    `hf:...` (`hf_split` unless it names its split), read through `fields` (all of them,
    or the first `count`); or `count` built-in ones drawn with `seed` when `path` is
    `builtin`; or `count` held-out ones of the calculator task (the ones its GRPO stage
    evaluates on with the same seed) when `path` is `calculator`."""
    if str(path) in (builtin_chat.NAME, tool_task.NAME) and count is None:
        raise DataError(f"{path} prompts need a count")
    if str(path) == builtin_chat.NAME:
        return builtin_prompts(count, seed)
    if str(path) == tool_task.NAME:
        return _calculator(tool_task.train_and_eval(0, count, seed)[1])
    if str(path).startswith("hf:"):
        records = (
            (f"{path} row {row}", record)
            for row, record in enumerate(hf_records(str(path), hf_split, count), start=1)
        )
    else:
        records = read_jsonl_records(path, "prompts ('prompt' or 'messages' lines)")
    prompts = []
    for where, record in records:
        prompts.append(prompt_of(record, where, fields))
        if count is not None and len(prompts) == count:
            break
    if not prompts:
        raise DataError(
            f"{path} holds no prompts; add .jsonl lines with 'prompt' or 'messages' (or set "
            "data.prompt_field)"
        )
    return prompts


def offered_tools(prompt: Prompt, default: Sequence[str]) -> list[str]:
    """The tools `prompt` may call: its record's `tools` (a list of registered tool names),
    else `default` (the stage's). DataError naming the line for a malformed or unknown one."""
    names = prompt.fields.get("tools")
    if names is None:
        return list(default)
    where = prompt.where or "a prompt"
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{where}: 'tools' must be a list of tool names, like [\"calculator\"]")
    try:
        check_tools(names, f"{where}: 'tools'")
    except ConfigError as error:
        raise DataError(str(error)) from None
    return names


def shuffled_answers(prompts: Sequence[Prompt], seed: int) -> list[Prompt]:
    """`prompts` with their `answer` fields permuted among them (a control's training
    data: each answer belongs to another prompt, most often); the other fields stay."""
    order = np.random.default_rng(seed).permutation(len(prompts))
    return [
        Prompt(q.messages, {**q.fields, "answer": prompts[i].fields.get("answer")}, q.where)
        for q, i in zip(prompts, order.tolist(), strict=True)
    ]


def rendered_prompts(
    tokenizer: Tokenizer,
    prompts: Sequence[Prompt],
    room: int,
    where: str,
    tools: Sequence[str] | None = None,
) -> list[list[int]]:
    """Each prompt's ids under the chat template, ending with the assistant's header; a
    DataError when one is longer than `room` tokens (`where` names the limit's setting).
    With `tools` (the stage's default; None: no tools offered), the tools each prompt may
    call reach a model's own template (`offered_tools`)."""
    rendered = [
        render_for_generation(
            tokenizer, p.messages, None if tools is None else tool_schemas(offered_tools(p, tools))
        )
        for p in prompts
    ]
    for index, ids in enumerate(rendered):
        if len(ids) > room:
            raise DataError(
                f"{prompts[index].where or f'prompt {index}'}: the prompt "
                f"({prompts[index].text[:40]!r}...) has {len(ids)} tokens, more than the "
                f"{room} that {where} leaves; shorten it or raise the limit"
            )
    return rendered


def train_and_eval_prompts(
    path: str | None,
    eval_path: str | None,
    val_fraction: float,
    builtin: int,
    held_out: int,
    seed: int,
    fields: PromptFields = PromptFields(),
    hf_split: str = "train",
    families: tuple[str, ...] = builtin_chat.FAMILIES,
) -> tuple[list[Prompt], list[Prompt]]:
    """(training, held-out) prompts: `builtin` and `held_out` built-in ones of `families`
    when `path` is `builtin` (or of the calculator task when it is `calculator`); else the
    prompts of `path`, and of `eval_path` (its first `held_out`) or the last `val_fraction`
    of `path`'s (at most `held_out`), read through `fields` (a Hugging Face dataset's split
    `hf_split` unless its spec names one)."""
    if not path:
        raise DataError(
            "data.path is not set; pass a prompts .jsonl file or folder, builtin or calculator"
        )
    if path == builtin_chat.NAME:
        return builtin_split(builtin, held_out, seed, families)
    if path == tool_task.NAME:
        train, evaluation = tool_task.train_and_eval(builtin, held_out, seed)
        return _calculator(train), _calculator(evaluation)
    prompts = read_prompts(path, fields=fields, hf_split=hf_split)
    if eval_path:
        return prompts, read_prompts(eval_path, held_out, seed, fields, hf_split)
    split = int(round(len(prompts) * (1 - val_fraction)))
    if not 0 < split < len(prompts):
        raise DataError(
            f"{path}: {len(prompts)} prompts leave "
            + ("no training prompts" if split <= 0 else "no held-out prompts")
            + f" at data.val_fraction={val_fraction}; add prompts, change data.val_fraction "
            "or give the held-out prompts as data.eval_path"
        )
    return prompts[:split], prompts[split:][:held_out]
