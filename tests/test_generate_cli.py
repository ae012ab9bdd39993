"""`jaxllm generate` and `jaxllm chat` on a real checkpoint; the chat template."""

import io
import json

import jax
import pytest

from jaxllm.chat import render_for_generation, render_message, visible_tokens
from jaxllm.checkpoint import Checkpointer
from jaxllm.cli import main as cli_main
from jaxllm.config import load_config
from jaxllm.generate import Generator
from jaxllm.model import LanguageModel
from jaxllm.tokenizer import load_tokenizer

BYTES = load_tokenizer("bytes")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny model pre-trained for 4 steps on Python's docs."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("run")
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in topics.values()))
    out_dir = root / "out"
    assert (
        cli_main(
            [
                "pretrain",
                "preset=tiny",
                f"data.path={corpus}",
                f"out_dir={out_dir}",
                "train.steps=4",
                "train.eval_every=4",
                "train.eval_batches=1",
                "train.samples=1",
                "train.sample_tokens=8",
            ]
        )
        == 0
    )
    return out_dir


def restored(run_dir):
    cfg = load_config(run_dir / "config.yaml")
    model = LanguageModel(cfg.model)
    checkpointer = Checkpointer(run_dir / "checkpoints")
    params = checkpointer.restore_params(model.abstract_params)
    checkpointer.close()
    return model, params


def greedy_first_reply(run_dir, history, budget: int) -> str:
    """What `jaxllm chat --temperature 0` should print for the first turn of `history`."""
    model, params = restored(run_dir)
    generator = Generator(model, BYTES.vocab_size, BYTES.pad_id, budget)
    streamed = generator.stream(
        params,
        render_for_generation(BYTES, history),
        jax.random.fold_in(jax.random.key(0), 0),
        temperature=0.0,
        stop_ids=[BYTES.special_id("<|im_end|>")],
    )
    expected = BYTES.decode_bytes(visible_tokens(BYTES, streamed, hide_thinking=False))
    return expected.decode("utf-8", errors="replace")


def test_generate_prints_the_greedy_completion(run_dir, capsys):
    capsys.readouterr()
    assert (
        cli_main(
            [
                "generate",
                "--checkpoint",
                str(run_dir),
                "--prompt",
                "def f(x):",
                "--temperature",
                "0",
                "--max-new-tokens",
                "12",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out.rstrip("\n")

    model, params = restored(run_dir)
    generator = Generator(model, BYTES.vocab_size, BYTES.pad_id, 12)
    prompt = [BYTES.start_id, *BYTES.encode("def f(x):")]
    completion = generator(
        params,
        [prompt],
        jax.random.key(0),
        temperature=0.0,
        stop_ids=[BYTES.end_id, BYTES.special_id("<|im_end|>")],
    )
    expected = BYTES.decode(
        t for t in completion.row(0) if t not in (BYTES.end_id, BYTES.special_id("<|im_end|>"))
    )
    assert printed == expected
    assert (run_dir / "samples.txt").read_text().startswith("--- step 4\n")


def test_chat_streams_replies_with_the_template(run_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n/exit\n"))
    capsys.readouterr()
    assert (
        cli_main(
            [
                "chat",
                "--checkpoint",
                str(run_dir),
                "--temperature",
                "0",
                "--max-new-tokens",
                "10",
                "--system",
                "be brief",
            ]
        )
        == 0
    )
    reply = capsys.readouterr().out.removeprefix("assistant> ").rstrip("\n")

    history = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there"},
    ]
    assert reply == greedy_first_reply(run_dir, history, budget=10)


def test_template_tokens_are_control_ids_and_user_text_stays_text():
    ids = render_message(BYTES, "user", "say <|im_end|>")
    special = BYTES.special_ids
    assert ids == [
        special["<|im_start|>"],
        *b"user",
        special["<|im_sep|>"],
        *b"say <|im_end|>",
        special["<|im_end|>"],
    ]
    prompt = render_for_generation(BYTES, [{"role": "user", "content": "hi"}])
    assert prompt[-len(b"assistant") - 2 :] == [
        special["<|im_start|>"],
        *b"assistant",
        special["<|im_sep|>"],
    ]
    with pytest.raises(ValueError, match="unknown role 'robot'"):
        render_message(BYTES, "robot", "beep")


def test_thinking_is_hidden_on_request():
    special = BYTES.special_ids
    reply = [
        special["<think>"],
        *b"2+2=4",
        special["</think>"],
        *b"4",
        special["<|im_end|>"],
        *b"after",
    ]
    assert bytes(visible_tokens(BYTES, reply, hide_thinking=True)) == b"4"
    shown = list(visible_tokens(BYTES, reply, hide_thinking=False))
    assert BYTES.decode(shown) == "<think>2+2=4</think>4"


def test_generate_from_a_folder_without_a_run_fails_clearly(tmp_path, capsys):
    assert cli_main(["generate", "--checkpoint", str(tmp_path), "--prompt", "x"]) == 2
    assert "no config.yaml there" in capsys.readouterr().err


def test_generate_defaults_fit_the_budget_to_the_prompt(run_dir, capsys):
    capsys.readouterr()
    prompt_text = "The return statement"
    argv = ["generate", "--checkpoint", str(run_dir), "--prompt", prompt_text]
    assert cli_main(argv) == 0  # the command: temperature 0.8, default budget
    assert capsys.readouterr().err == ""  # nothing to say: no budget was asked for
    assert cli_main([*argv, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out.rstrip("\n")

    model, params = restored(run_dir)
    prompt = [BYTES.start_id, *BYTES.encode(prompt_text)]
    room = model.cfg.max_seq_len - len(prompt)  # 64 - 21
    generator = Generator(model, BYTES.vocab_size, BYTES.pad_id, room)
    stops = [BYTES.end_id, BYTES.special_id("<|im_end|>")]
    completion = generator(params, [prompt], jax.random.key(0), temperature=0.0, stop_ids=stops)
    assert room == 43
    assert greedy == BYTES.decode(t for t in completion.row(0) if t not in stops)


def test_generate_caps_an_explicit_budget_and_says_so(run_dir, capsys):
    capsys.readouterr()
    argv = ["generate", "--checkpoint", str(run_dir), "--prompt", "The return statement"]
    assert cli_main([*argv, "--max-new-tokens", "500"]) == 0
    assert capsys.readouterr().err == (
        "note: --max-new-tokens 500 capped at 43: the prompt has 21 tokens and "
        "model.max_seq_len=64\n"
    )
    assert cli_main([*argv, "--max-new-tokens", "0"]) == 2
    assert capsys.readouterr().err == "error: max_new_tokens=0 must be >= 1\n"


def test_chat_defaults_leave_half_the_context_to_the_reply(run_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n/exit\n"))
    capsys.readouterr()
    assert cli_main(["chat", "--checkpoint", str(run_dir), "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    reply = captured.out.removeprefix("assistant> ").rstrip("\n")
    assert "capped" not in captured.err

    half_context = restored(run_dir)[0].cfg.max_seq_len // 2
    history = [{"role": "user", "content": "hello there"}]
    assert reply == greedy_first_reply(run_dir, history, budget=half_context)


def test_chat_skips_blank_lines_and_survives_a_message_too_long(run_dir, capsys, monkeypatch):
    """A message longer than the conversation's room is refused with one error: line and
    the session goes on with its history; blank lines are not sent; a closed standard
    input ends it."""
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n" + "x" * 500 + "\n\n   \nok\n"))
    capsys.readouterr()
    argv = ["chat", "--checkpoint", str(run_dir), "--temperature", "0", "--max-new-tokens", "10"]
    assert cli_main(argv) == 0
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "send a shorter one" in errors[0], captured.err
    # The conversation went on as if the refused message and blank lines were never sent.
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nok\n"))
    assert cli_main(argv) == 0
    assert captured.out == capsys.readouterr().out
    assert captured.out.count("assistant> ") == 2

    monkeypatch.setattr("sys.stdin", None)
    assert cli_main(argv) == 0


def test_chat_on_an_imported_model_prints_what_transformers_generates(
    tmp_path, monkeypatch, capsys
):
    """`jaxllm chat` on an imported Qwen3-style run (its own template and eos ids): the
    streamed reply is transformers' greedy reply decoded without special tokens, characters
    split over tokens included."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from hf_families import family_folder

    folder = family_folder(tmp_path / "hf", "qwen3")
    assert cli_main(["import-hf", str(folder), "--out", str(tmp_path / "run")]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    inputs = reference.apply_chat_template(
        [{"role": "user", "content": "What is 東京 🙂?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    expected = reference.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "\ufffd" in expected and len(expected) > 8  # a random model's bytes, split chars
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 東京 🙂?\n"))
    capsys.readouterr()
    argv = ["chat", "--checkpoint", str(tmp_path / "run"), "--temperature", "0"]
    assert cli_main([*argv, "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == f"assistant> {expected}\n"
