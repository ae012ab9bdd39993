"""Chat data for SFT: reading and checking conversations, rendering, and packing rows.

A `.jsonl` line is `{"messages": [{"role": ..., "content": ...}, ...]}` or
`{"prompt": ..., "completion": ...}` (a user turn and an assistant turn). Conversations
without an assistant turn are skipped and counted. Every other problem is a `DataError`
naming the file and line.

Tool use (`jaxllm.tools`): an assistant message may call tools in its text
(`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`) or in OpenAI's
`tool_calls` field (its `content` may then be empty or null), and each result is a
`{"role": "tool", "name": ..., "content": ...}` message after it. SFT trains the calls
(they are the assistant's) and never the results. A `tool` message before any assistant
turn answers no call: a DataError.

Packing puts several rendered conversations in one row of `seq_len + 1` tokens, each with
its own segment id (so positions restart and attention never crosses conversations); the
rest of a row is padding (segment 0, never trained). Rows are filled best-fit decreasing:
longest conversation first, each into the fullest row it still fits (the built-in chat
data: 91% of a 129-token row filled, against 80% in arrival order). A conversation longer
than a row is dropped or truncated (`sft.truncation`), and counted.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxllm.chat import ROLES, render_conversation
from jaxllm.data.corpus import corpus_files
from jaxllm.data.jsonl import json_lines, read_utf8
from jaxllm.errors import DataError
from jaxllm.tokenizer import Tokenizer
from jaxllm.tools import hermes_blocks

Conversation = list[dict[str, str]]


@dataclass
class ChatDataReport:
    """Counts a run reports about its chat data."""

    conversations: int = 0
    skipped_without_assistant: int = 0
    dropped_too_long: int = 0
    truncated_too_long: int = 0
    rows: int = 0
    trained_tokens: int = 0

    def summary(self) -> str:
        return (
            f"{self.conversations} conversations in {self.rows} rows "
            f"({self.trained_tokens:,} trained tokens); skipped {self.skipped_without_assistant} "
            f"without an assistant turn; too long: {self.dropped_too_long} dropped, "
            f"{self.truncated_too_long} truncated"
        )


def checked_messages(messages: object, where: str, field: str = "messages") -> Conversation:
    """`messages` as a list of {role, content} (other keys, such as `tool_calls` or
    `reasoning_content`, passed on to a Jinja template as they are), or a DataError naming
    `where` and `field`."""
    if not isinstance(messages, list) or not messages:
        text = "a string or " if field != "messages" else ""  # only 'messages' is never text
        raise DataError(
            f"{where}: '{field}' must be {text}a non-empty list of {{role, content}} messages"
        )
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: message {index} is not an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(
                f"{where}: message {index} has unknown role {role!r}; use one of {', '.join(ROLES)}"
            )
        if message.get("tool_calls") is not None:
            try:
                hermes_blocks(message["tool_calls"])
            except ValueError as error:
                raise DataError(f"{where}: message {index} ({role}): {error}") from None
            content = "" if content is None else content  # OpenAI writes null beside calls
        if role == "tool" and not any(m["role"] == "assistant" for m in checked):
            raise DataError(
                f"{where}: message {index} (tool) comes before any assistant turn; a tool "
                "result answers an assistant's call"
            )
        if not isinstance(content, str):
            raise DataError(f"{where}: message {index} ({role}) has no string 'content'")
        if role != "system" and not content.strip() and not message.get("tool_calls"):
            raise DataError(f"{where}: message {index} ({role}) has empty content")
        checked.append({**message, "role": role, "content": content})  # tool_calls, name kept
    return checked


def _conversation_of(record: object, where: str) -> Conversation:
    if not isinstance(record, dict):
        raise DataError(
            f"{where}: a line must be a JSON object with 'messages' or 'prompt'/'completion'"
        )
    if "messages" in record:
        return checked_messages(record["messages"], where)
    if "prompt" in record and "completion" in record:
        for field in ("prompt", "completion"):
            if not isinstance(record[field], str):
                raise DataError(f"{where}: '{field}' must be a string")
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]},
        ]
        return checked_messages(messages, where)
    raise DataError(f"{where}: no 'messages' list and no 'prompt'/'completion' pair")


def read_jsonl_records(path: str | Path, what: str) -> Iterator[tuple[str, object]]:
    """(where, record) of every non-empty line of the .jsonl files under `path`; `where` is
    `file:line`. `what` names the data in the error for a file that is not .jsonl."""
    for file in corpus_files(path, (".jsonl",)):
        if file.suffix != ".jsonl":
            raise DataError(f"{file}: {what} must be .jsonl")
        yield from json_lines(file, read_utf8(file))


def read_conversations(path: str | Path) -> Iterator[tuple[str, Conversation]]:
    """Yield (where, messages) of every conversation under `path` (a file or folder)."""
    for where, record in read_jsonl_records(path, "chat data (messages or prompt/completion)"):
        yield where, _conversation_of(record, where)


def render_all(
    conversations: Iterable[Conversation],
    tokenizer: Tokenizer,
    train_on: str,
    report: ChatDataReport,
) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) per conversation that has an assistant turn."""
    rendered = []
    for messages in conversations:
        if not any(m["role"] == "assistant" for m in messages):
            report.skipped_without_assistant += 1
            continue
        rendered.append(render_conversation(tokenizer, messages, train_on))
    report.conversations = len(rendered)
    return rendered


@dataclass(frozen=True)
class PackedRows:
    """Packed rows of seq_len + 1 tokens: ids, segment ids (0 = padding), loss mask."""

    tokens: np.ndarray  # (R, seq_len + 1) int32
    segment_ids: np.ndarray  # (R, seq_len + 1) int32
    loss_mask: np.ndarray  # (R, seq_len + 1) float32

    def num_rows(self, seq_len: int) -> int:
        if self.tokens.shape[1] != seq_len + 1:
            raise ValueError(f"rows hold {self.tokens.shape[1]} tokens, not {seq_len + 1}")
        return len(self.tokens)

    def rows(self, row_ids: Iterable[int], seq_len: int):
        index = np.asarray(list(row_ids), np.int64)
        return self.tokens[index], self.segment_ids[index], self.loss_mask[index]


def pack(
    rendered: Sequence[tuple[list[int], list[int]]],
    row_len: int,
    pad_id: int,
    truncation: str,
    report: ChatDataReport,
) -> PackedRows:
    """Pack conversations into rows of `row_len` tokens, best-fit decreasing: in order of
    length (longest first; equal lengths keep their given order), each goes into the row
    with the least free space that still holds it, or starts a row. Deterministic in the
    order given; the rows' order is the order they were started in."""
    kept: list[tuple[list[int], list[int]]] = []
    for ids, loss_mask in rendered:
        if len(ids) > row_len:
            if truncation == "drop":
                report.dropped_too_long += 1
                continue
            report.truncated_too_long += 1
            ids, loss_mask = ids[:row_len], loss_mask[:row_len]
        kept.append((ids, loss_mask))
    if not kept:
        raise DataError(
            "no conversation fits in a row; raise train.seq_len or set sft.truncation=truncate"
        )
    rows: list[list[tuple[list[int], list[int]]]] = []
    # Rows by their free space, and the sorted distinct free spaces that have a row: a
    # lookup costs a bisection, an update at most row_len moves, however many rows.
    rows_with_free: dict[int, list[int]] = {}
    free_spaces: list[int] = []
    for ids, loss_mask in sorted(kept, key=lambda conversation: -len(conversation[0])):
        where = bisect.bisect_left(free_spaces, len(ids))
        if where == len(free_spaces):
            row, free = len(rows), row_len
            rows.append([])
        else:
            free = free_spaces[where]
            row = rows_with_free[free].pop()
            if not rows_with_free[free]:
                del rows_with_free[free], free_spaces[where]
        rows[row].append((ids, loss_mask))
        free -= len(ids)
        if free not in rows_with_free:
            rows_with_free[free] = []
            bisect.insort(free_spaces, free)
        rows_with_free[free].append(row)
    shape = (len(rows), row_len)
    packed = PackedRows(
        np.full(shape, pad_id, np.int32), np.zeros(shape, np.int32), np.zeros(shape, np.float32)
    )
    for index, row in enumerate(rows):
        at = 0
        for segment, (ids, loss_mask) in enumerate(row, start=1):
            packed.tokens[index, at : at + len(ids)] = ids
            packed.segment_ids[index, at : at + len(ids)] = segment
            packed.loss_mask[index, at : at + len(ids)] = loss_mask
            at += len(ids)
    report.rows = len(rows)
    report.trained_tokens = int(packed.loss_mask.sum())
    return packed
