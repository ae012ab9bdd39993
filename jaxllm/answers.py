"""Final answers: where a text states one, and whether two answers agree.

`extract_answer(text, how)` reads the answer a text states, by one of `ANSWER_FORMATS`:
- `plain`: the whole text, stripped;
- `gsm8k`: what follows the last `####` up to the end of its line (GSM8K's format), with
  thousands commas of numbers removed (`#### 1,000` -> `1000`);
- `boxed`: the contents of the last `\\boxed{...}` or `\\fbox{...}` (braces balanced; MATH's
  solutions);
- `last_number`: the last number (sign, digits with thousands commas, decimals), commas
  removed;
- `auto`: `boxed` when the text holds a `\\boxed`/`\\fbox`, else `gsm8k` when it holds
  `####`, else `plain`.
A format that finds nothing gives "" (never an error).

`answers_match(answer, expected)` is True when, in this order:
1. the stripped strings are equal;
2. both read as math and Hugging Face's `math-verify` says `answer` equals the gold
   `expected` (`verify(parse(gold), parse(answer))`): fractions, decimals, LaTeX,
   `\\boxed{}`, intervals, sets, percentages (`50\\%` equals `50` and `0.5`), units in
   `\\text{...}`, and an equation's right-hand side (`x=3` equals `3`). Each side is parsed
   as one LaTeX math expression (`$...$`, as math-verify advises for a gold answer), so a
   bare `(1, 2]` is an interval. Two kinds of side do not read as math: one with a word of
   two or more letters outside a LaTeX command or `\\text{}` (`Paris`, `5 cm`), which
   math-verify would turn into a product of one-letter symbols (`Paris` = `paris`); and a
   bare list of numbers (`40, 55, 78`, `1 2`), which it would compare as a set or add up
   (`3` = `1 2`), where the built-in `sort` task's answers are ordered;
3. both parse as numbers (thousands commas removed) that are equal.
math-verify bounds its work with `signal.alarm`, which only the main thread may set; in any
other thread step 2 is skipped, so a comparison there never hangs and never raises.
"""

from __future__ import annotations

import math
import re
import threading

ANSWER_FORMATS = ("auto", "plain", "gsm8k", "boxed", "last_number")
GSM8K_MARK = "####"
BOX_COMMANDS = ("\\boxed", "\\fbox")
VERIFY_TIMEOUT_S = 2  # math-verify's bound on each parse and each comparison (whole seconds)

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TEXT_GROUP = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{[^{}]*\}")
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")
_SIGNED = r"[-+]?\d+(?:\.\d+)?"
_NUMBER_LIST = re.compile(rf"{_SIGNED}(?:(?:\s*,\s*|\s+){_SIGNED})+")


def _last_box(text: str) -> str:
    """The contents of the last `\\boxed{...}`/`\\fbox{...}` whose braces close, or ""."""
    start = max(text.rfind(command + "{") for command in BOX_COMMANDS)
    if start < 0:
        return ""
    opened = text.index("{", start)
    depth = 0
    for index in range(opened, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[opened + 1 : index].strip()
    return ""


def extract_answer(text: str, how: str) -> str:
    """The answer `text` states, read by `how` (one of `ANSWER_FORMATS`); "" when it states
    none in that format."""
    if how == "auto":
        if any(command in text for command in BOX_COMMANDS):
            how = "boxed"
        else:
            how = "gsm8k" if GSM8K_MARK in text else "plain"
    if how == "plain":
        return text.strip()
    if how == "gsm8k":
        _, mark, after = text.rpartition(GSM8K_MARK)
        return _THOUSANDS_COMMA.sub("", after.strip().split("\n")[0].strip()) if mark else ""
    if how == "boxed":
        return _last_box(text)
    if how == "last_number":
        numbers = _NUMBER.findall(text)
        return numbers[-1].replace(",", "") if numbers else ""
    raise ValueError(f"unknown answer format '{how}'; use one of {', '.join(ANSWER_FORMATS)}")


def _number(text: str) -> float | None:
    try:
        value = float(_THOUSANDS_COMMA.sub("", text))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _reads_as_math(text: str) -> bool:
    if not text or _NUMBER_LIST.fullmatch(text):
        return False
    return not _WORD.search(_TEXT_GROUP.sub("", text))


def _math_equal(answer: str, expected: str) -> bool:
    """math-verify's verdict on two answers that read as math (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if not (_reads_as_math(answer) and _reads_as_math(expected)):
        return False
    from math_verify import parse, verify

    gold, target = (
        parse(f"${text}$", parsing_timeout=VERIFY_TIMEOUT_S) for text in (expected, answer)
    )
    return bool(gold and target) and verify(gold, target, timeout_seconds=VERIFY_TIMEOUT_S)


def answers_match(answer: str, expected: object) -> bool:
    """Whether `answer` states the gold `expected` (a string, or a number): equal strings,
    math-verify's equality, or equal numbers (see the module docstring)."""
    answer, expected = answer.strip(), str(expected).strip()
    if answer == expected:
        return True
    if _math_equal(answer, expected):
        return True
    a, e = _number(answer), _number(expected)
    return a is not None and e is not None and abs(a - e) <= 1e-9 * max(1.0, abs(e))
