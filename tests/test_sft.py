"""SFT: the assistant-only mask, packing parity, chat data errors, built-in tasks, and a
short end-to-end run that starts from a pre-training checkpoint."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from helpers import tiny_config

from jaxllm.chat import render_conversation, render_reply
from jaxllm.checkpoint import Checkpointer
from jaxllm.cli import main as cli_main
from jaxllm.data import builtin_chat
from jaxllm.data.conversations import ChatDataReport, pack, read_conversations, render_all
from jaxllm.errors import DataError
from jaxllm.losses import lm_batch_from_rows
from jaxllm.metrics import read_metrics
from jaxllm.model import LanguageModel
from jaxllm.stages.common import params_from_run
from jaxllm.steps import causal_lm_loss
from jaxllm.tokenizer import load_tokenizer

BYTES = load_tokenizer("bytes")
S = BYTES.special_ids
IM_START, IM_SEP, IM_END = S["<|im_start|>"], S["<|im_sep|>"], S["<|im_end|>"]

TWO_TURNS = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Yo"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>2+2=4</think>4"},
]


def test_two_turn_mask_trains_exactly_assistant_content_and_its_im_end():
    ids, mask = render_conversation(BYTES, TWO_TURNS)
    expected = []  # (token, trained) built by hand
    expected += [
        (IM_START, 0),
        *[(b, 0) for b in b"system"],
        (IM_SEP, 0),
        *[(b, 0) for b in b"Be terse."],
        (IM_END, 0),
    ]
    expected += [
        (IM_START, 0),
        *[(b, 0) for b in b"user"],
        (IM_SEP, 0),
        *[(b, 0) for b in b"Hi"],
        (IM_END, 0),
    ]
    expected += [
        (IM_START, 0),
        *[(b, 0) for b in b"assistant"],
        (IM_SEP, 0),
        *[(b, 1) for b in b"Yo"],
        (IM_END, 1),
    ]
    expected += [
        (IM_START, 0),
        *[(b, 0) for b in b"user"],
        (IM_SEP, 0),
        *[(b, 0) for b in b"2+2?"],
        (IM_END, 0),
    ]
    expected += [
        (IM_START, 0),
        *[(b, 0) for b in b"assistant"],
        (IM_SEP, 0),
        (S["<think>"], 1),
        *[(b, 1) for b in b"2+2=4"],
        (S["</think>"], 1),
        (b"4"[0], 1),
        (IM_END, 1),
    ]
    assert list(zip(ids, mask, strict=True)) == expected

    _, last_only = render_conversation(BYTES, TWO_TURNS, train_on="last")
    first_reply = mask.index(1)  # "Yo" and its <|im_end|>: trained no more
    expected_last = mask[:first_reply] + [0, 0, 0] + mask[first_reply + 3 :]
    assert last_only == expected_last and sum(last_only) == 9


def test_chatml_template_writes_qwens_format_and_trains_the_same_tokens():
    """chat.template=chatml: `<|im_start|>{role}\\n{content}<|im_end|>\\n`; the newline
    after `<|im_end|>` is not trained, and the trained tokens are jaxllm's template's."""
    chatml = load_tokenizer("bytes", chat_template="chatml")
    ids, mask = render_conversation(chatml, TWO_TURNS)
    assert chatml.decode(ids) == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nYo<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>2+2=4</think>4<|im_end|>\n"
    )
    assert IM_SEP not in ids
    ours_ids, ours_mask = render_conversation(BYTES, TWO_TURNS)
    trained = [t for t, m in zip(ids, mask, strict=True) if m]
    assert trained == [t for t, m in zip(ours_ids, ours_mask, strict=True) if m]
    assert mask[-1] == 0 and ids[-1] == ord("\n") and mask[-2] == 1 and ids[-2] == IM_END
    # A reply being scored ends at its <|im_end|>, as a sampled one does (no newline).
    reply_ids, reply_mask = render_reply(chatml, TWO_TURNS)
    assert (reply_ids, reply_mask) == (ids[:-1], mask[:-1])


def test_targets_of_the_batch_are_the_assistant_tokens():
    ids, mask = render_conversation(BYTES, TWO_TURNS)
    batch = lm_batch_from_rows(np.array([ids]), None, np.array([mask]))
    trained_targets = batch["targets"][0][batch["loss_mask"][0] == 1].tolist()
    assert trained_targets == [
        *b"Yo",
        IM_END,
        S["<think>"],
        *b"2+2=4",
        S["</think>"],
        *b"4",
        IM_END,
    ]


def test_per_turn_tokenization_equals_whole_conversation_tokenization():
    tokenizer = load_tokenizer("cl100k_base")
    messages = [
        {"role": "user", "content": "Translate 'good morning' to French."},
        {"role": "assistant", "content": "Bonjour, comment ça va ?"},
    ]
    ids, _ = render_conversation(tokenizer, messages)
    text = "".join(f"<|im_start|>{m['role']}<|im_sep|>{m['content']}<|im_end|>" for m in messages)
    assert ids == tokenizer.encode(text, allow_special=True)


def test_packed_loss_and_gradients_are_the_token_weighted_combination():
    model = LanguageModel(tiny_config().model)
    params = model.init(jax.random.key(0))
    conversations = [e.messages(with_system=False) for e in builtin_chat.examples(3, seed=1)]
    rendered = [render_conversation(BYTES, c) for c in conversations]
    report = ChatDataReport()
    row_len = sum(len(ids) for ids, _ in rendered) + 4  # all three fit, then padding
    packed = pack(rendered, row_len, pad_id=BYTES.pad_id, truncation="drop", report=report)
    assert report.rows == 1 and sorted(set(packed.segment_ids[0].tolist())) == [0, 1, 2, 3]

    def loss_and_grads(tokens, segments, mask):
        batch = lm_batch_from_rows(tokens, segments, mask)
        (loss_sum, aux), grads = jax.value_and_grad(
            lambda p: causal_lm_loss(model, p, batch), has_aux=True
        )(params)
        return float(loss_sum), float(aux.denominator), grads

    packed_sum, packed_count, packed_grads = loss_and_grads(
        packed.tokens, packed.segment_ids, packed.loss_mask
    )
    alone = [loss_and_grads(np.array([ids]), None, np.array([mask])) for ids, mask in rendered]
    total_count = sum(count for _, count, _ in alone)
    assert packed_count == total_count == report.trained_tokens
    # The mean over trained tokens of the packed row = the token-weighted mean of each alone.
    assert packed_sum / packed_count == pytest.approx(
        sum(s for s, _, _ in alone) / total_count, rel=1e-5
    )
    combined = jax.tree.map(lambda *g: sum(g), *[grads for _, _, grads in alone])
    # atol: float32 sums in another order (one packed row vs four rows added) differ by
    # ~1e-6 on entries of ~1e-3; a leak between documents would move them far more.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), packed_grads, combined
    )


def test_conversations_longer_than_a_row_are_dropped_or_truncated_and_counted():
    long = render_conversation(
        BYTES, [{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "y" * 50}]
    )
    short = render_conversation(
        BYTES, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    )
    report = ChatDataReport()
    rows = pack([long, short], 40, BYTES.pad_id, "drop", report)
    assert (report.dropped_too_long, report.rows) == (1, 1)
    assert rows.tokens[0, : len(short[0])].tolist() == short[0]
    report = ChatDataReport()
    rows = pack([long, short], 40, BYTES.pad_id, "truncate", report)
    assert (report.truncated_too_long, report.rows) == (1, 2)
    assert rows.tokens[0].tolist() == long[0][:40]


def test_packing_is_best_fit_decreasing_and_keeps_every_conversation_whole():
    # Lengths 6, 5, 5, 4 in rows of 10: in arrival order [6] [5 5] [4] (3 rows);
    # best-fit decreasing [6 4] [5 5] (2 rows, no padding).
    rendered = [([n] * length, [n % 2] * length) for n, length in enumerate([6, 5, 5, 4], start=1)]
    report = ChatDataReport()
    rows = pack(rendered, 10, BYTES.pad_id, "drop", report)
    assert report.rows == 2 and (rows.segment_ids > 0).all()
    assert rows.tokens.tolist() == [[1] * 6 + [4] * 4, [2] * 5 + [3] * 5]
    assert rows.segment_ids.tolist() == [[1] * 6 + [2] * 4, [1] * 5 + [2] * 5]
    assert rows.loss_mask.tolist() == [[1] * 6 + [0] * 4, [0] * 5 + [1] * 5]
    # Into the fullest row that still holds it: 8, 6, 3 give rows free 2 and 1; the 1
    # goes in the second row (first fit would put it in the first).
    rendered = [([n] * length, [1] * length) for n, length in enumerate([3, 8, 1, 6], start=1)]
    rows = pack(rendered, 10, BYTES.pad_id, "drop", ChatDataReport())
    assert rows.tokens.tolist() == [[2] * 8 + [BYTES.pad_id] * 2, [4] * 6 + [1] * 3 + [3]]


@pytest.mark.parametrize(("fraction", "expected"), [(0.0, 0), (0.3, 52), (1.0, 200)])
def test_builtin_system_fraction_sets_how_many_conversations_have_the_system_prompt(
    fraction, expected
):
    from jaxllm.stages.sft import _conversations

    cfg = tiny_config(
        "data.path=builtin", "sft.builtin_examples=200", f"sft.builtin_system_fraction={fraction}"
    )
    train, validation, _ = _conversations(cfg)
    with_system = [c for c in train if c[0]["role"] == "system"]
    assert len(with_system) == expected
    assert all(c[0]["content"] == builtin_chat.SYSTEM for c in with_system)
    assert not any(c[0]["role"] == "system" for c in validation)


def test_data_path_calculator_trains_on_the_tool_tasks_demonstrations():
    from jaxllm.data import tool_task
    from jaxllm.stages.sft import VALIDATION, _conversations

    cfg = tiny_config("data.path=calculator", "sft.builtin_examples=300", "sft.tool_fraction=0.5")
    train, validation, verifiable = _conversations(cfg)
    demos = [d["messages"] for d in tool_task.demonstrations(300 + VALIDATION, 0, 0.5)]
    assert (train, validation, verifiable) == (demos[:300], demos[300:], [])
    with_tool = [c for c in train if c[1]["content"].startswith("<tool_call>")]
    assert 110 < len(with_tool) < 190  # about half
    assert cfg.train.seed == 0


def write_jsonl(path, lines):
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"chat.jsonl:2: not valid JSON"),
        (
            {"messages": [{"role": "robot", "content": "hi"}]},
            r"chat.jsonl:2: message 0 has unknown role 'robot'",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "  "},
                    {"role": "assistant", "content": "x"},
                ]
            },
            r"chat.jsonl:2: message 0 \(user\) has empty content",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
            r"chat.jsonl:2: message 1 \(assistant\) has empty content",
        ),
        ({"messages": "hello"}, r"chat.jsonl:2: 'messages' must be a non-empty list of"),
        ({"prompt": 5, "completion": "x"}, r"chat.jsonl:2: 'prompt' must be a string"),
        ({"text": "plain"}, r"chat.jsonl:2: no 'messages' list and no 'prompt'/'completion'"),
        ({"messages": [{"role": "user"}]}, r"chat.jsonl:2: message 0 \(user\) has no string"),
    ],
)
def test_malformed_chat_data_names_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "q", "completion": "a"}, line])
    with pytest.raises(DataError, match=message):
        list(read_conversations(path))


def test_conversations_without_assistant_are_skipped_and_counted(tmp_path):
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"prompt": "q", "completion": "a"},
            {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]},
        ],
    )
    report = ChatDataReport()
    rendered = render_all([m for _, m in read_conversations(path)], BYTES, "all", report)
    assert (len(rendered), report.skipped_without_assistant) == (1, 1)
    assert "skipped 1 without an assistant turn" in report.summary()


def test_builtin_tasks_are_verifiable_and_held_out_prompts_are_new():
    train = builtin_chat.examples(700, seed=0)
    assert {e.family for e in train} == set(builtin_chat.FAMILIES)
    for example in train[:70]:
        if example.family == "add":
            a, b = map(int, example.prompt.removeprefix("What is ").rstrip("?").split(" + "))
            assert example.answer == str(a + b)
        if example.family == "reverse":
            word = example.prompt.split("'")[1]
            assert example.answer == word[::-1]
        if example.family == "sort":
            numbers = sorted(int(n) for n in example.prompt.split(": ")[1].split(", "))
            assert example.answer == ", ".join(map(str, numbers))
    assert any(e.thinking for e in train if e.family == "add")
    held = builtin_chat.held_out(70, seed=1, train=train)
    train_prompts = {e.prompt for e in train}
    assert not [e for e in held if e.family != "capital" and e.prompt in train_prompts]


def test_builtin_families_choose_the_families_of_training_and_held_out_data():
    from jaxllm.data.prompts import train_and_eval_prompts

    cfg = tiny_config("data.path=builtin", "data.builtin_families=[add,count]")
    assert cfg.data.builtin_family_names() == ("add", "count")
    assert tiny_config().data.builtin_family_names() == builtin_chat.FAMILIES
    train, held = train_and_eval_prompts(
        "builtin", None, 0.1, 100, 40, 0, families=cfg.data.builtin_family_names()
    )
    assert [p.fields["family"] for p in train] == ["add", "count"] * 50
    assert [p.fields["family"] for p in held] == ["add", "count"] * 20
    assert not {p.text for p in train} & {p.text for p in held}
    # The same training prompts as the families' own examples (the held-out ones too).
    assert [p.text for p in train] == [
        e.prompt for e in builtin_chat.examples(100, 0, ("add", "count"))
    ]
    # A family the training set exhausts has no held-out prompts: one clear error.
    every_sum = [
        builtin_chat.Example("add", f"What is {a} + {b}?", str(a + b))
        for a in range(10, 100)
        for b in range(10, 100)
    ]
    with pytest.raises(DataError, match=r"only 0 of 5 held-out prompts of the families add"):
        builtin_chat.held_out(5, 1, every_sum, ("add",))
    # SFT's conversations and held-out verifiable prompts.
    from jaxllm.stages.sft import _conversations

    cfg = tiny_config("data.path=builtin", "sft.builtin_examples=10", "sft.eval_prompts=6")
    conversations, _, verifiable = _conversations(
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, builtin_families=["sort"]))
    )
    assert all(c[-2]["content"].startswith("Sort ascending") for c in conversations)
    assert [e.family for e in verifiable] == ["sort"] * 6


def test_sft_run_starts_from_pretrained_params_and_logs_accuracy(tmp_path, capsys):
    from pydoc_data.topics import topics

    corpus = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in topics.values()])
    common = [
        "preset=tiny",
        "model.max_seq_len=128",
        "train.seq_len=128",
        "train.eval_batches=1",
        "train.samples=0",
    ]
    pre_dir, sft_dir = tmp_path / "pre", tmp_path / "sft"
    assert (
        cli_main(
            [
                "pretrain",
                *common,
                f"data.path={corpus}",
                f"out_dir={pre_dir}",
                "train.steps=3",
                "train.eval_every=3",
            ]
        )
        == 0
    )
    assert (
        cli_main(
            [
                "sft",
                *common,
                "data.path=builtin",
                f"out_dir={sft_dir}",
                f"sft.init_from={pre_dir}",
                "sft.builtin_examples=300",
                "sft.eval_prompts=14",
                "train.steps=4",
                "train.eval_every=4",
                "train.eval_at_start=true",
            ]
        )
        == 0
    )
    assert "skipped 0 without an assistant turn" in capsys.readouterr().out

    evals = [r for r in read_metrics(sft_dir / "metrics.jsonl") if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 4]
    for key in ("loss", "accuracy", "ends_with_im_end", "accuracy_repeat", "accuracy_add"):
        assert 0 <= evals[0][key] < 10
    # The loader an SFT run starts from returns the pre-trained params, not fresh ones.
    model = LanguageModel(tiny_config("model.max_seq_len=128").model)
    fresh = model.init(jax.random.key(0))
    shardings = jax.tree.map(lambda x: x.sharding, fresh)
    loaded = params_from_run(str(pre_dir), "sft.init_from")(fresh, shardings)
    checkpointer = Checkpointer(pre_dir / "checkpoints")
    saved = checkpointer.restore_params(model.abstract_params)
    checkpointer.close()
    jax.tree.map(np.testing.assert_array_equal, loaded, saved)
    assert not np.allclose(loaded["token_embedding_vd"], fresh["token_embedding_vd"])
