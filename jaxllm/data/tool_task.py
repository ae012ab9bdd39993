"""A built-in task that needs a tool: multiply two numbers of two or three digits.

A small model cannot multiply 482 by 39 in its head, but the `calculator` tool can
(`jaxllm.tools`), so the reward moves from guessing to calling. Everything is
deterministic in its seed.

- `prompts` rows are what GRPO reads from a prompts .jsonl line:
  `{"prompt": "What is 482 * 39?", "answer": "18798", "tools": ["calculator"],
  "family": "multiply"}`.
- `demonstrations` are SFT lines `{"messages": [...]}`, a `tool_fraction` of them the
  tool path: user, assistant `<tool_call>\\n{"name": "calculator", "arguments":
  {"expression": "482 * 39"}}\\n</tool_call>`, tool "18798", assistant "18798"; the rest
  answer at once with the true product (which a small model cannot learn: RL has to move
  it to the tool).
- `write_files` writes sft.jsonl, prompts.jsonl and eval.jsonl for a recipe's commands.
- `data.path=calculator` (`NAME`) makes the same rows in memory: SFT demonstrations
  (`sft.builtin_examples` of them, `sft.tool_fraction` the tool path), GRPO's training
  prompts and held-out prompts (`train_and_eval`), and `jaxllm eval --data calculator`'s.

Held-out questions are a fixed tenth of all of them (`is_held_out`, a hash of the factors,
either order), and training rows never draw one, so a held-out product is new to every run
trained on this task, whatever its seeds and counts.
"""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

from jaxllm.tools import tool_call_block

NAME = "calculator"  # the data.path that names this task
FAMILY = "multiply"
TOOL = "calculator"
LOWEST, HIGHEST = 10, 999  # each factor has two or three digits


def is_held_out(a: int, b: int) -> bool:
    """Whether "What is a * b?" (and so "What is b * a?") is a held-out question: a tenth
    of the products, by a hash of the two factors in order of size."""
    return zlib.crc32(f"{min(a, b)} * {max(a, b)}".encode()) % 10 == 0


def _question(rng: random.Random, held_out: bool = False) -> tuple[str, int, int]:
    """A question of the training part (or of the held-out part) and its factors."""
    while True:
        a, b = rng.randint(LOWEST, HIGHEST), rng.randint(LOWEST, HIGHEST)
        if is_held_out(a, b) == held_out:
            return f"What is {a} * {b}?", a, b


def _row(prompt: str, a: int, b: int) -> dict:
    return {"prompt": prompt, "answer": str(a * b), "tools": [TOOL], "family": FAMILY}


def _distinct_rows(count: int, seed: int, held_out: bool) -> list[dict]:
    seen, rows = set(), []
    rng = random.Random(seed)
    while len(rows) < count:
        prompt, a, b = _question(rng, held_out)
        if prompt not in seen:
            seen.add(prompt)
            rows.append(_row(prompt, a, b))
    return rows


def prompts(count: int, seed: int) -> list[dict]:
    """`count` distinct training prompt rows (see the module docstring), deterministic in
    `seed`."""
    return _distinct_rows(count, seed, held_out=False)


def held_out(count: int, seed: int) -> list[dict]:
    """`count` distinct held-out prompt rows (`is_held_out`), deterministic in `seed`."""
    return _distinct_rows(count, seed, held_out=True)


def train_and_eval(count: int, eval_count: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(`count` training, `eval_count` held-out) prompt rows for `data.path=calculator`."""
    return prompts(count, seed + 1), held_out(eval_count, seed + 2)


def demonstrations(count: int, seed: int, tool_fraction: float = 0.5) -> list[dict]:
    """`count` SFT lines `{"messages": [...]}` of training questions, each the tool path
    with probability `tool_fraction`, else a direct answer (see the module docstring)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        prompt, a, b = _question(rng)
        answer = str(a * b)
        messages = [{"role": "user", "content": prompt}]
        if rng.random() < tool_fraction:
            call = tool_call_block(TOOL, {"expression": f"{a} * {b}"})
            messages += [
                {"role": "assistant", "content": call},
                {"role": "tool", "name": TOOL, "content": answer},
            ]
        lines.append({"messages": [*messages, {"role": "assistant", "content": answer}]})
    return lines


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def write_files(
    folder: str | Path,
    train_demos: int,
    train_prompts: int,
    eval_prompts: int,
    seed: int,
    tool_fraction: float = 0.5,
) -> dict[str, Path]:
    """Write `train_demos` SFT lines (sft.jsonl, a `tool_fraction` of them the tool path),
    `train_prompts` RL prompts (prompts.jsonl) and `eval_prompts` held-out prompts
    (eval.jsonl) into `folder`; their paths by name ("sft", "prompts", "eval")."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train, evaluation = train_and_eval(train_prompts, eval_prompts, seed)
    return {
        "sft": _write_jsonl(folder / "sft.jsonl", demonstrations(train_demos, seed, tool_fraction)),
        "prompts": _write_jsonl(folder / "prompts.jsonl", train),
        "eval": _write_jsonl(folder / "eval.jsonl", evaluation),
    }
