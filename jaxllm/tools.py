"""Tools a model calls while it replies: a registry, the call format, and running a call.

A call is a Hermes/Qwen block inside an assistant turn (one or several per turn):

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "12*34"}}
    </tool_call>

and its result comes back as the next message, `{"role": "tool", "name": "calculator",
"content": "408"}`. Chat data may also hold calls in OpenAI's `tool_calls` field of an
assistant message (`[{"type": "function", "function": {"name": ..., "arguments": {...} or
a JSON string}}]`); `hermes_blocks` writes them as the blocks above, so jaxllm's templates
train the same text from either form.

A tool is `fn(arguments: dict) -> str`, registered by name with `register_tool` (a script
does so before the stage starts), with a description and a JSON schema of its arguments
(what a model's own Jinja template lists as `tools`). Tools must be deterministic: a
resumed run calls them again. `run_tool_call` never raises: every failure (malformed call,
unknown or disallowed tool, the tool raising, running past its time, not returning text)
becomes an `error: ...` result the model reads. A tool that runs past its time is left to
finish in its daemon thread (Python cannot stop a thread); its result is dropped.

Built in: `calculator`, exact arithmetic on numbers written in decimal.
"""

from __future__ import annotations

import ast
import decimal
import json
import operator
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from jaxllm.errors import ConfigError

ToolFn = Callable[[dict], str]

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
_CALL_BLOCK = re.compile(re.escape(CALL_START) + r"(.*?)(" + re.escape(CALL_END) + r"|\Z)", re.S)


@dataclass(frozen=True)
class Tool:
    name: str
    fn: ToolFn
    description: str
    parameters: dict  # a JSON schema of the arguments object


@dataclass(frozen=True)
class ToolCall:
    """One `<tool_call>` block: its name and arguments, or the problem that kept them out."""

    name: str | None
    arguments: dict | None
    problem: str | None = None


@dataclass(frozen=True)
class ToolResult:
    """What goes back to the model as a `tool` message; `error` when the call failed."""

    content: str
    error: bool


_TOOLS: dict[str, Tool] = {}
BUILTIN = ("calculator",)


def register_tool(
    name: str, fn: ToolFn, description: str = "", parameters: dict | None = None
) -> None:
    """Make `fn` (arguments dict -> str) callable by the model as `name`; `parameters` is
    a JSON schema of its arguments (default: an object with no declared properties)."""
    if name in BUILTIN:
        raise ValueError(f"'{name}' is a built-in tool; choose another name")
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"tool name {name!r} must be letters, digits, '_' or '-'")
    _add(name, fn, description, parameters)


def _add(name: str, fn: ToolFn, description: str, parameters: dict | None) -> None:
    schema = parameters if parameters is not None else {"type": "object", "properties": {}}
    _TOOLS[name] = Tool(name, fn, description, schema)


def tool_names() -> list[str]:
    """Every registered tool, built-in ones first."""
    return list(_TOOLS)


def check_tools(names: Sequence[str], where: str) -> None:
    """ConfigError naming `where` when `names` holds a tool nobody registered."""
    unknown = [name for name in names if name not in _TOOLS]
    if unknown:
        raise ConfigError(
            f"{where} names unknown tool(s) {', '.join(unknown)}; use "
            f"{', '.join(_TOOLS)} or register_tool(name, fn) in your script"
        )


def tool_schemas(names: Sequence[str]) -> list[dict]:
    """The tools' OpenAI/transformers descriptions, `{"type": "function", "function":
    {"name", "description", "parameters"}}`, in the order of `names` (what a Jinja chat
    template reads as `tools`)."""
    check_tools(names, "tool_schemas")
    return [
        {
            "type": "function",
            "function": {
                "name": name,
                "description": _TOOLS[name].description,
                "parameters": _TOOLS[name].parameters,
            },
        }
        for name in names
    ]


def tool_call_block(name: str, arguments: Mapping) -> str:
    """One call as the model writes it, in three lines: `<tool_call>`, `{"name": ...,
    "arguments": {...}}` (JSON, non-ASCII kept), `</tool_call>`."""
    call = json.dumps({"name": name, "arguments": dict(arguments)}, ensure_ascii=False)
    return f"{CALL_START}\n{call}\n{CALL_END}"


def hermes_blocks(tool_calls: object) -> list[str]:
    """OpenAI-style `tool_calls` (a list of `{"type": "function", "function": {"name",
    "arguments"}}`, `arguments` an object or its JSON text) as `<tool_call>` blocks;
    ValueError saying which entry is malformed."""
    if not isinstance(tool_calls, list):
        raise ValueError("'tool_calls' must be a list of {type, function} objects")
    blocks = []
    for index, entry in enumerate(tool_calls):
        function = entry.get("function", entry) if isinstance(entry, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f"tool call {index} has no function name")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                raise ValueError(f"tool call {index}'s arguments are not valid JSON") from None
        if not isinstance(arguments, dict):
            raise ValueError(f"tool call {index}'s arguments must be a JSON object")
        blocks.append(tool_call_block(function["name"], arguments))
    return blocks


def _parsed_call(body: str, closed: bool) -> ToolCall:
    if not closed:
        return ToolCall(None, None, f"the {CALL_START} block has no {CALL_END}")
    try:
        call = json.loads(body)
    except json.JSONDecodeError as error:
        return ToolCall(None, None, f"the call is not valid JSON ({error.msg})")
    if not isinstance(call, dict):
        return ToolCall(None, None, 'write the call as {"name": ..., "arguments": {...}}')
    name, arguments = call.get("name"), call.get("arguments", {})
    if not isinstance(name, str) or not name:
        return ToolCall(None, None, "the call has no 'name'")
    if not isinstance(arguments, dict):
        return ToolCall(name, None, "the call's 'arguments' must be a JSON object")
    return ToolCall(name, arguments)


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every `<tool_call>...</tool_call>` block of `text`, in order (a last block left open,
    as in a reply cut short, is a call with a problem)."""
    return [
        _parsed_call(match.group(1), closed=bool(match.group(2)))
        for match in _CALL_BLOCK.finditer(text)
    ]


def _error(message: str) -> ToolResult:
    return ToolResult(f"error: {message}", error=True)


def run_tool_call(call: ToolCall, allowed: Sequence[str], timeout_s: float = 5.0) -> ToolResult:
    """Run `call` if its tool is registered and `allowed`, giving it `timeout_s` seconds.
    Never raises: each failure is an `error: ...` result (a tool reports a bad argument by
    raising ValueError, whose message the model reads)."""
    if call.problem is not None:
        return _error(call.problem)
    if call.name not in _TOOLS:
        return _error(f"unknown tool '{call.name}'; the tools are {', '.join(allowed) or 'none'}")
    if call.name not in allowed:
        return _error(f"tool '{call.name}' is not available; use {', '.join(allowed) or 'none'}")
    outcome: list = []

    def work() -> None:
        try:
            outcome.append(_TOOLS[call.name].fn(dict(call.arguments)))
        except ValueError as error:
            outcome.append(_error(str(error)))
        except Exception as error:  # any bug in a tool is the model's error message, not ours
            outcome.append(_error(f"the tool failed ({type(error).__name__}: {error})"))

    worker = threading.Thread(target=work, name=f"tool-{call.name}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not outcome:
        return _error(f"tool '{call.name}' took longer than {timeout_s:g} s")
    result = outcome[0]
    if isinstance(result, ToolResult):
        return result
    if not isinstance(result, str):
        return _error(f"tool '{call.name}' returned {type(result).__name__}, not text")
    return ToolResult(result, error=False)


MAX_EXPRESSION_CHARS = 200
MAX_NUMBER_DIGITS = 100  # of every number along the way, numerator and denominator
_MAX_BITS = int(MAX_NUMBER_DIGITS * 3.3219280948873626)  # log2(10)
_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: lambda a, b: Fraction(a // b),
    ast.Mod: operator.mod,
}


def _bounded(value: Fraction) -> Fraction:
    if max(value.numerator.bit_length(), value.denominator.bit_length()) > _MAX_BITS:
        raise ValueError(f"a number along the way has more than {MAX_NUMBER_DIGITS} digits")
    return value


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator == 1:
        base_bits = max(base.numerator.bit_length(), base.denominator.bit_length())
        if abs(exponent.numerator) * max(base_bits - 1, 0) > _MAX_BITS:  # 1 and 0: any power
            raise ValueError(f"the power has more than {MAX_NUMBER_DIGITS} digits")
        return base**exponent.numerator
    if base < 0:
        raise ValueError("a negative number has no real fractional power")
    try:
        return Fraction(float(base) ** float(exponent))
    except OverflowError:
        raise ValueError(f"the power has more than {MAX_NUMBER_DIGITS} digits") from None


def _value(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if isinstance(node.value, float) and node.value in (float("inf"), float("-inf")):
            raise ValueError(f"a number has more than {MAX_NUMBER_DIGITS} digits")
        return _bounded(Fraction(repr(node.value)))  # 0.1 as written, not its binary float
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _value(node.operand)
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
        raise ValueError("'^' is not a power here; write ** (2**10)")
    if isinstance(node, ast.BinOp) and (type(node.op) in _BINARY or isinstance(node.op, ast.Pow)):
        left, right = _value(node.left), _value(node.right)
        try:
            if isinstance(node.op, ast.Pow):
                return _bounded(_power(left, right))
            return _bounded(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
    raise ValueError("use only numbers, + - * / // % ** and parentheses")


def _decimal_text(value: Fraction) -> str:
    """An integer exactly ("19124907"); any other number to 12 significant digits."""
    if value.denominator == 1:
        return str(value.numerator)
    with decimal.localcontext() as context:
        context.prec = 12
        quotient = decimal.Decimal(value.numerator) / decimal.Decimal(value.denominator)
        return format(quotient.normalize(), "g")


def calculator(arguments: dict) -> str:
    """`{"expression": "482 * 39"}` -> "18798": + - * / // % ** on integers and decimals,
    parsed with `ast` and computed exactly on fractions by walking the tree (never eval).
    Bounded so any input returns at once: the expression's length, and the digits of every
    number along the way (a power's size is known before it is computed). ValueError for
    anything else."""
    expression = arguments.get("expression")
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError('give the arithmetic as {"expression": "12 * 34"}')
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ValueError(f"not an arithmetic expression: {expression}") from None
    return _decimal_text(_value(tree.body))


_add(
    "calculator",
    calculator,
    "Evaluate an arithmetic expression exactly: + - * / // % ** and parentheses.",
    {
        "type": "object",
        "properties": {
            "expression": {"type": "string", "description": "for example 482 * 39"},
        },
        "required": ["expression"],
    },
)
