"""Tools (`jaxllm.tools`): the calculator's exact values and refusals, parsing `<tool_call>`
blocks, running calls that fail in every way without raising, the registry; SFT data with
tool calls and results (masks token by token, the `tool_calls` field, a result before any
call); the built-in multiplication task; `jaxllm chat` running the model's calls."""

import io
import json
import threading
import time
from types import SimpleNamespace

import pytest

from jaxllm import tools
from jaxllm.chat import render_conversation, render_for_generation
from jaxllm.cli import _forget_oldest_turn
from jaxllm.cli import main as cli_main
from jaxllm.data import tool_task
from jaxllm.data.conversations import read_conversations
from jaxllm.errors import ConfigError, DataError
from jaxllm.tokenizer import load_tokenizer
from jaxllm.tools import (
    ToolCall,
    ToolResult,
    calculator,
    check_tools,
    parse_tool_calls,
    register_tool,
    run_tool_call,
    tool_call_block,
    tool_names,
    tool_schemas,
)

BYTES = load_tokenizer("bytes")
CHATML = load_tokenizer("bytes", chat_template="chatml")
S = BYTES.special_ids
IM_START, IM_SEP, IM_END = S["<|im_start|>"], S["<|im_sep|>"], S["<|im_end|>"]

CALL_12_34 = (
    '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*34"}}\n</tool_call>'
)


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("482 * 39", "18798"),
        ("4373 * 4373", "19123129"),
        ("(2 + 3) * -4", "-20"),
        ("7 // 2", "3"),
        ("-7 // 2", "-4"),
        ("17 % 5", "2"),
        ("2 ** 10", "1024"),
        ("2 ** -2", "0.25"),
        ("0.1 + 0.2", "0.3"),  # exact on decimals, not 0.30000000000000004
        ("1 / 3", "0.333333333333"),
        ("10 / 4", "2.5"),
        ("6 / 3", "2"),
        ("2 ** 0.5", "1.41421356237"),
        ("10 ** 99", "1" + "0" * 99),
    ],
)
def test_calculator_is_exact(expression, value):
    assert calculator({"expression": expression}) == value


@pytest.mark.parametrize(
    ("expression", "problem"),
    [
        ("__import__('os').system('true')", "use only numbers"),
        ("(1).__class__", "use only numbers"),
        ("x + 1", "use only numbers"),
        ("True + 1", "use only numbers"),
        ("2j * 2", "use only numbers"),
        ("9**9**9", "the power has more than 100 digits"),
        ("10 ** 100", "more than 100 digits"),
        ("(10 ** 60) * (10 ** 60)", "a number along the way has more than 100 digits"),
        ("1e999", "more than 100 digits"),
        ("1 / 0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("(-8) ** 0.5", "no real fractional power"),
        ("2 ^ 3", r"write \*\*"),
        ("1 +", "not an arithmetic expression"),
        ("1" + "+1" * 100, "longer than 200 characters"),
        ("", "give the arithmetic as"),
    ],
)
def test_calculator_refuses_what_is_not_bounded_arithmetic(expression, problem):
    started = time.perf_counter()
    with pytest.raises(ValueError, match=problem):
        calculator({"expression": expression})
    assert time.perf_counter() - started < 0.05


def test_calculator_wants_an_expression_string():
    with pytest.raises(ValueError, match="give the arithmetic as"):
        calculator({"expr": "1+1"})
    with pytest.raises(ValueError, match="give the arithmetic as"):
        calculator({"expression": 12})


def test_parse_tool_calls_reads_every_block_in_order_and_names_problems():
    text = (
        f"Let me compute.\n{CALL_12_34}\n"
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "5*6"}}\n</tool_call>'
        "<tool_call>{name: calculator}</tool_call>"
        '<tool_call>["calculator"]</tool_call>'
        '<tool_call>{"arguments": {"expression": "1"}}</tool_call>'
        '<tool_call>{"name": "calculator", "arguments": "1+1"}</tool_call>'
        '<tool_call>{"name": "now"}</tool_call>'
        '<tool_call>\n{"name": "calculator", "arg'
    )
    assert parse_tool_calls(text) == [
        ToolCall("calculator", {"expression": "12*34"}),
        ToolCall("calculator", {"expression": "5*6"}),
        ToolCall(
            None,
            None,
            "the call is not valid JSON (Expecting property name enclosed in double quotes)",
        ),
        ToolCall(None, None, 'write the call as {"name": ..., "arguments": {...}}'),
        ToolCall(None, None, "the call has no 'name'"),
        ToolCall("calculator", None, "the call's 'arguments' must be a JSON object"),
        ToolCall("now", {}),  # no arguments: an empty object
        ToolCall(None, None, "the <tool_call> block has no </tool_call>"),
    ]
    assert parse_tool_calls("408, no call here") == []


def test_a_call_written_by_tool_call_block_parses_back():
    block = tool_call_block("calculator", {"expression": "2 × 3"})
    assert (
        block
        == '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2 × 3"}}\n</tool_call>'
    )
    assert parse_tool_calls(block) == [ToolCall("calculator", {"expression": "2 × 3"})]


@pytest.fixture
def registry(monkeypatch):
    """A registry that forgets the tools a test registers."""
    monkeypatch.setattr(tools, "_TOOLS", dict(tools._TOOLS))


def test_run_tool_call_returns_the_result_or_an_error_and_never_raises(registry):
    def broken(arguments):
        return arguments["missing"]

    register_tool("broken", broken)
    register_tool("number", lambda arguments: 42)
    allowed = ["calculator", "broken", "number"]
    assert run_tool_call(ToolCall("calculator", {"expression": "12*34"}), allowed) == ToolResult(
        "408", error=False
    )
    assert run_tool_call(ToolCall("calculator", {"expression": "1/0"}), allowed) == ToolResult(
        "error: division by zero", error=True
    )
    assert run_tool_call(ToolCall("weather", {}), allowed) == ToolResult(
        "error: unknown tool 'weather'; the tools are calculator, broken, number", error=True
    )
    assert run_tool_call(ToolCall("broken", {}), ["calculator"]) == ToolResult(
        "error: tool 'broken' is not available; use calculator", error=True
    )
    assert run_tool_call(ToolCall("broken", {}), allowed) == ToolResult(
        "error: the tool failed (KeyError: 'missing')", error=True
    )
    assert run_tool_call(ToolCall("number", {}), allowed) == ToolResult(
        "error: tool 'number' returned int, not text", error=True
    )
    malformed = ToolCall(None, None, "the call has no 'name'")
    assert run_tool_call(malformed, allowed) == ToolResult(
        "error: the call has no 'name'", error=True
    )


def test_a_tool_past_its_time_is_an_error_result_at_the_timeout(registry):
    release = threading.Event()
    register_tool("slow", lambda arguments: "late" if release.wait(10) else "never")
    started = time.perf_counter()
    result = run_tool_call(ToolCall("slow", {}), ["slow"], timeout_s=0.2)
    waited_s = time.perf_counter() - started
    release.set()  # let the abandoned worker thread end
    assert result == ToolResult("error: tool 'slow' took longer than 0.2 s", error=True)
    assert 0.2 <= waited_s < 0.6


def test_registry_lists_checks_and_describes_tools(registry):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    register_tool("weather", lambda arguments: "sunny", "The weather in a city.", schema)
    assert tool_names() == ["calculator", "weather"]
    assert tool_schemas(["weather"]) == [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "description": "The weather in a city.",
                "parameters": schema,
            },
        }
    ]
    assert tool_schemas(["calculator"])[0]["function"]["parameters"]["required"] == ["expression"]
    check_tools(["calculator", "weather"], "grpo.tools")
    with pytest.raises(ConfigError) as error:
        check_tools(["calculator", "search", "shell"], "grpo.tools")
    assert str(error.value) == (
        "grpo.tools names unknown tool(s) search, shell; use calculator, weather or "
        "register_tool(name, fn) in your script"
    )
    with pytest.raises(ValueError, match="'calculator' is a built-in tool"):
        register_tool("calculator", lambda arguments: "0")
    with pytest.raises(ValueError, match="must be letters, digits"):
        register_tool("two words", lambda arguments: "0")


# Two calls in two turns, then the answer: the calls are trained, the results never.
CALL_5_6 = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "5*6"}}\n</tool_call>'
WITH_TOOLS = [
    {"role": "user", "content": "12*34 and 5*6?"},
    {"role": "assistant", "content": CALL_12_34},
    {"role": "tool", "name": "calculator", "content": "408"},
    {"role": "assistant", "content": CALL_5_6},
    {"role": "tool", "name": "calculator", "content": "30"},
    {"role": "assistant", "content": "408 and 30"},
]


def expected_tokens(tokenizer, messages) -> list[tuple[int, int]]:
    """(token, trained) of a conversation in jaxllm's byte-level templates, built by hand."""
    tokens = []
    for message in messages:
        trained = int(message["role"] == "assistant")
        if tokenizer.chat_template == "chatml":
            head = [(IM_START, 0), *[(b, 0) for b in f"{message['role']}\n".encode()]]
        else:
            head = [(IM_START, 0), *[(b, 0) for b in message["role"].encode()], (IM_SEP, 0)]
        body = [(b, trained) for b in message["content"].encode()] + [(IM_END, trained)]
        tail = [(ord("\n"), 0)] if tokenizer.chat_template == "chatml" else []
        tokens += head + body + tail
    return tokens


@pytest.mark.parametrize("tokenizer", [BYTES, CHATML], ids=["jaxllm", "chatml"])
def test_sft_trains_the_calls_and_never_the_tool_results(tokenizer):
    ids, mask = render_conversation(tokenizer, WITH_TOOLS)
    assert list(zip(ids, mask, strict=True)) == expected_tokens(tokenizer, WITH_TOOLS)
    trained = [token for token, on in zip(ids, mask, strict=True) if on]
    assert trained == [
        *CALL_12_34.encode(),
        IM_END,
        *CALL_5_6.encode(),
        IM_END,
        *b"408 and 30",
        IM_END,
    ]


def test_a_tool_result_before_any_assistant_turn_names_file_and_line(tmp_path):
    lines = [
        {"messages": WITH_TOOLS},
        {
            "messages": [
                {"role": "user", "content": "12*34?"},
                {"role": "tool", "name": "calculator", "content": "408"},
                {"role": "assistant", "content": "408"},
            ]
        },
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(DataError) as error:
        list(read_conversations(path))
    assert str(error.value) == (
        f"{path}:2: message 1 (tool) comes before any assistant turn; a tool result answers "
        "an assistant's call"
    )


def field_form(content: str | None, arguments) -> dict:
    call = {"type": "function", "function": {"name": "calculator", "arguments": arguments}}
    return {"role": "assistant", "content": content, "tool_calls": [call, call]}


@pytest.mark.parametrize("tokenizer", [BYTES, CHATML], ids=["jaxllm", "chatml"])
def test_openai_tool_calls_train_the_same_tokens_as_the_hermes_text(tokenizer, tmp_path):
    """A `tool_calls` field (arguments an object or JSON text, content empty, null or not)
    renders as the content followed by the Hermes blocks, joined by newlines."""
    user = {"role": "user", "content": "12*34 twice?"}
    result = {"role": "tool", "name": "calculator", "content": "408"}
    answer = {"role": "assistant", "content": "408"}
    cases = [
        (field_form("", {"expression": "12*34"}), f"{CALL_12_34}\n{CALL_12_34}"),
        (field_form(None, '{"expression": "12*34"}'), f"{CALL_12_34}\n{CALL_12_34}"),
        (field_form("Calling.", {"expression": "12*34"}), f"Calling.\n{CALL_12_34}\n{CALL_12_34}"),
    ]
    path = tmp_path / "chat.jsonl"
    records = [{"messages": [user, call, result, result, answer]} for call, _ in cases]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    conversations = [messages for _, messages in read_conversations(path)]
    for messages, (_, text) in zip(conversations, cases, strict=True):
        as_text = [user, {"role": "assistant", "content": text}, result, result, answer]
        assert render_conversation(tokenizer, messages) == render_conversation(tokenizer, as_text)


@pytest.mark.parametrize(
    ("tool_calls", "problem"),
    [
        (
            {"name": "calculator"},
            "'tool_calls' must be a list of {type, function} objects",
        ),
        ([{"type": "function", "function": {"arguments": {}}}], "tool call 0 has no function name"),
        (
            [{"function": {"name": "calculator", "arguments": "{1+1"}}],
            "tool call 0's arguments are not valid JSON",
        ),
        (
            [{"function": {"name": "calculator", "arguments": "[1]"}}],
            "tool call 0's arguments must be a JSON object",
        ),
    ],
)
def test_malformed_tool_calls_fields_name_file_and_line(tmp_path, tool_calls, problem):
    messages = [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "", "tool_calls": tool_calls},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    with pytest.raises(DataError) as error:
        list(read_conversations(path))
    assert str(error.value) == f"{path}:1: message 1 (assistant): {problem}"


def test_multiplication_task_is_deterministic_and_held_out_prompts_are_new(tmp_path):
    rows = tool_task.prompts(200, seed=3)
    assert rows == tool_task.prompts(200, seed=3) and rows != tool_task.prompts(200, seed=4)
    assert len({row["prompt"] for row in rows}) == 200
    for row in rows:
        a, b = map(int, row["prompt"].removeprefix("What is ").removesuffix("?").split(" * "))
        assert 10 <= a <= 999 and 10 <= b <= 999
        assert row == {
            "prompt": f"What is {a} * {b}?",
            "answer": str(a * b),
            "tools": ["calculator"],
            "family": "multiply",
        }
    held = tool_task.held_out(300, seed=3)
    assert len({r["prompt"] for r in held}) == 300 and held == tool_task.held_out(300, seed=3)
    assert not {r["prompt"] for r in held} & {r["prompt"] for r in rows}

    demos = tool_task.demonstrations(400, seed=5, tool_fraction=0.5)
    assert demos == tool_task.demonstrations(400, seed=5, tool_fraction=0.5)
    with_tool = [d["messages"] for d in demos if len(d["messages"]) == 4]
    assert 160 < len(with_tool) < 240  # about half
    user, call, result, answer = with_tool[0]
    a, b = map(int, user["content"].removeprefix("What is ").removesuffix("?").split(" * "))
    assert call == {
        "role": "assistant",
        "content": tool_call_block("calculator", {"expression": f"{a} * {b}"}),
    }
    assert result == {"role": "tool", "name": "calculator", "content": str(a * b)}
    assert answer == {"role": "assistant", "content": str(a * b)}
    assert parse_tool_calls(call["content"]) == [
        ToolCall("calculator", {"expression": f"{a} * {b}"})
    ]
    assert calculator(parse_tool_calls(call["content"])[0].arguments) == str(a * b)
    direct = next(d["messages"] for d in demos if len(d["messages"]) == 2)
    a, b = map(int, direct[0]["content"].removeprefix("What is ").removesuffix("?").split(" * "))
    assert direct[1] == {"role": "assistant", "content": str(a * b)}
    assert all(len(d["messages"]) == 2 for d in tool_task.demonstrations(20, 5, tool_fraction=0))

    paths = tool_task.write_files(tmp_path / "task", 50, 40, 30, seed=7)
    assert {name: path.name for name, path in paths.items()} == {
        "sft": "sft.jsonl",
        "prompts": "prompts.jsonl",
        "eval": "eval.jsonl",
    }
    read = {
        name: [json.loads(line) for line in path.read_text().splitlines()]
        for name, path in paths.items()
    }
    assert [len(read[name]) for name in ("sft", "prompts", "eval")] == [50, 40, 30]
    assert read["sft"] == tool_task.demonstrations(50, 7)
    seen = {line["messages"][0]["content"] for line in read["sft"]} | {
        row["prompt"] for row in read["prompts"]
    }
    assert not seen & {row["prompt"] for row in read["eval"]}
    assert (read["prompts"], read["eval"]) == tool_task.train_and_eval(40, 30, 7)
    assert len(list(read_conversations(paths["sft"]))) == 50  # valid chat data


def factors(prompt: str) -> tuple[int, int]:
    a, b = prompt.removeprefix("What is ").removesuffix("?").split(" * ")
    return int(a), int(b)


def test_the_calculator_tasks_held_out_questions_are_a_fixed_tenth_no_training_row_draws():
    """Held out by the question, not by the run: whatever the seeds and counts of the SFT
    and GRPO stages, no training prompt or demonstration asks a held-out question."""
    grid = [(a, b) for a in range(10, 1000, 7) for b in range(10, 1000, 11)]
    share = sum(tool_task.is_held_out(a, b) for a, b in grid) / len(grid)
    assert abs(share - 0.1) < 0.01, share
    assert all(tool_task.is_held_out(a, b) == tool_task.is_held_out(b, a) for a, b in grid)
    train, held = tool_task.train_and_eval(3000, 500, seed=0)
    demos = tool_task.demonstrations(3000, seed=0, tool_fraction=0.5)
    assert all(tool_task.is_held_out(*factors(r["prompt"])) for r in held)
    assert not any(tool_task.is_held_out(*factors(r["prompt"])) for r in train)
    assert not any(tool_task.is_held_out(*factors(d["messages"][0]["content"])) for d in demos)


def test_data_path_calculator_gives_grpo_and_eval_the_tasks_rows():
    """`data.path=calculator` needs no file: GRPO's training and held-out prompts, with
    their answers and tools, and `jaxllm eval --data calculator` asks the held-out ones its
    GRPO stage evaluates with the same seed."""
    from jaxllm.data.prompts import read_prompts, train_and_eval_prompts

    train, held = train_and_eval_prompts("calculator", None, 0.1, 40, 12, seed=3)
    rows, held_rows = tool_task.train_and_eval(40, 12, seed=3)
    for prompts, expected in ((train, rows), (held, held_rows)):
        assert [p.text for p in prompts] == [row["prompt"] for row in expected]
        assert [p.fields for p in prompts] == [
            {"answer": row["answer"], "tools": ["calculator"], "family": "multiply"}
            for row in expected
        ]
    assert read_prompts("calculator", 12, seed=3) == held
    with pytest.raises(DataError, match="calculator prompts need a count"):
        read_prompts("calculator")


class ScriptedGenerator:
    """Stands in for `Generator`: each `stream` call yields the next scripted reply and its
    stop token, and records the prompt it was given."""

    def __init__(self, replies: list[str]):
        self.replies = list(replies)
        self.prompts: list[list[int]] = []

    def stream(self, params, prompt, key, stop_ids, **sampling):
        self.prompts.append(list(prompt))
        yield from [*BYTES.encode(self.replies.pop(0)), IM_END]


@pytest.fixture
def scripted_chat(monkeypatch):
    """Run `jaxllm chat` on the byte tokenizer with scripted replies; (stdout, stderr,
    generator) of the session."""

    def run(stdin: str, replies: list[str], *options: str):
        generator = ScriptedGenerator(replies)
        model = SimpleNamespace(cfg=SimpleNamespace(max_seq_len=1024))
        monkeypatch.setattr("jaxllm.cli._load_for_generation", lambda args: (BYTES, model, None))
        monkeypatch.setattr("jaxllm.cli._generator", lambda tokenizer, model, budget: generator)
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        return cli_main(["chat", "--checkpoint", "unused", *options]), generator

    return run


def test_chat_runs_the_models_tool_calls_and_lets_it_go_on(scripted_chat, capsys):
    call = tool_call_block("calculator", {"expression": "482 * 39"})
    status, generator = scripted_chat("What is 482 * 39?\n", [call, "18798"])
    captured = capsys.readouterr()
    assert status == 0
    assert captured.out == f"assistant> {call}\n[tool calculator] 18798\nassistant> 18798\n"
    user = {"role": "user", "content": "What is 482 * 39?"}
    assert generator.prompts == [
        render_for_generation(BYTES, [user]),
        render_for_generation(
            BYTES,
            [
                user,
                {"role": "assistant", "content": call},
                {"role": "tool", "name": "calculator", "content": "18798"},
            ],
        ),
    ]


def test_chat_stops_after_max_turns_and_runs_only_allowed_tools(scripted_chat, capsys):
    call = tool_call_block("calculator", {"expression": "1/0"})
    status, generator = scripted_chat("1/0?\n", [call, call, "never asked"], "--max-turns", "2")
    captured = capsys.readouterr()
    assert status == 0 and generator.replies == ["never asked"]
    assert captured.out == (f"assistant> {call}\n[tool calculator] error: division by zero\n" * 2)
    assert "note: --max-turns 2 replies reached" in captured.err

    status, generator = scripted_chat("1/0?\n", [call, "never asked"], "--tools", "")
    assert status == 0 and capsys.readouterr().out == f"assistant> {call}\n"

    assert scripted_chat("hi\n", [], "--tools", "calculator,search")[0] == 2
    assert capsys.readouterr().err == (
        "error: --tools names unknown tool(s) search; use calculator or "
        "register_tool(name, fn) in your script\n"
    )


def test_chat_forgets_whole_exchanges_oldest_first():
    system = {"role": "system", "content": "s"}
    first = [
        {"role": "user", "content": "1"},
        {"role": "assistant", "content": CALL_12_34},
        {"role": "tool", "name": "calculator", "content": "408"},
        {"role": "assistant", "content": "408"},
    ]
    second = [{"role": "user", "content": "2"}, {"role": "assistant", "content": CALL_5_6}]
    history = [system, *first, *second]
    assert _forget_oldest_turn(history, first=1) and history == [system, *second]
    assert not _forget_oldest_turn(history, first=1) and history == [system, *second]
