"""Corpora, the tokenized cache, and the step-indexed sharded batches."""

import json

import jax
import numpy as np
import pytest

from jaxllm.config import DataConfig, MeshConfig
from jaxllm.data.corpus import iter_documents
from jaxllm.data.loader import LMBatches, eval_batches
from jaxllm.data.tokens import prepare_token_streams
from jaxllm.errors import DataError
from jaxllm.sharding import make_mesh
from jaxllm.tokenizer import load_tokenizer

BYTES = load_tokenizer("bytes")


def write_corpus(folder):
    folder.mkdir()
    (folder / "a.txt").write_text("first document\n")
    (folder / "b.jsonl").write_text(
        json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}) + "\n"
    )
    (folder / "ignored.csv").write_text("x,y\n")
    return folder


def test_folder_of_txt_and_jsonl_reads_in_sorted_order(tmp_path):
    folder = write_corpus(tmp_path / "corpus")
    assert list(iter_documents(str(folder))) == ["first document\n", "second", "third"]


def test_stream_marks_documents_and_splits_off_validation(tmp_path):
    folder = write_corpus(tmp_path / "corpus")
    train, val = prepare_token_streams(
        DataConfig(path=str(folder), val_fraction=0.25), BYTES, tmp_path / "cache"
    )
    tokens = np.concatenate([train.tokens, val.tokens]).tolist()
    segments = np.concatenate([train.segment_ids, val.segment_ids]).tolist()
    expected = []
    for text in ["first document\n", "second", "third"]:
        expected += [BYTES.start_id, *text.encode(), BYTES.end_id]
    assert tokens == expected
    assert segments == [1] * 17 + [2] * 8 + [3] * 7
    assert len(val) == round(len(expected) * 0.25)


def test_cache_is_reused_not_rebuilt(tmp_path, monkeypatch):
    folder = write_corpus(tmp_path / "corpus")
    config = DataConfig(path=str(folder))
    first, _ = prepare_token_streams(config, BYTES, tmp_path / "cache")
    monkeypatch.setattr("jaxllm.data.tokens.iter_documents", pytest.fail)
    again, _ = prepare_token_streams(config, BYTES, tmp_path / "cache")
    assert isinstance(again.tokens, np.memmap)
    np.testing.assert_array_equal(again.tokens, first.tokens)
    assert [p.name for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name] == []


def test_rows_overlap_by_one_token(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("abcdefghijklmnopqrstuvwxyz" * 4)
    train, _ = prepare_token_streams(DataConfig(path=str(path)), BYTES, tmp_path / "cache")
    tokens, segments, mask = train.rows([0, 1, 2], seq_len=8)
    assert mask is None
    assert tokens.shape == segments.shape == (3, 9)
    assert tokens[0, -1] == tokens[1, 0] and tokens[1, -1] == tokens[2, 0]
    assert train.num_rows(8) == (len(train) - 1) // 8


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda p: None, r"'.*missing' does not exist"),
        (lambda p: p.write_text(""), r"corpus '.*' is empty"),
        (lambda p: p.write_bytes(b"fine\xff\xfe"), r"byte 4 is not valid UTF-8"),
        # the offset counts the byte-order mark: it is the byte an editor's hex view shows
        (lambda p: p.write_bytes(b"\xef\xbb\xbffine\xff"), r"byte 7 is not valid UTF-8"),
    ],
)
def test_bad_text_files(tmp_path, write, message):
    path = tmp_path / ("missing" if "missing" in message else "corpus.txt")
    write(path)
    with pytest.raises(DataError, match=message):
        prepare_token_streams(DataConfig(path=str(path)), BYTES, tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("*/meta.json"))


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(DataError, match=r"docs.jsonl:2: not valid JSON"):
        prepare_token_streams(DataConfig(path=str(path)), BYTES, tmp_path / "cache")
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"docs.jsonl:2: no string field 'text'"):
        list(iter_documents(str(path)))


def test_folder_without_corpus_files(tmp_path):
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="holds no .txt or .jsonl files"):
        list(iter_documents(str(tmp_path)))


@pytest.fixture
def stream(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("".join(chr(97 + i % 26) for i in range(3000)))
    train, val = prepare_token_streams(DataConfig(path=str(path)), BYTES, tmp_path / "cache")
    return train, val


def test_batches_are_a_function_of_the_step(stream):
    train, _ = stream
    mesh = make_mesh(MeshConfig(2, 2, 2), jax.devices()[:8])
    batches = LMBatches(train, seq_len=16, batch_size=8, mesh=mesh, seed=3)
    first, again = batches(5), batches(5)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
        np.testing.assert_array_equal(first[key], batches.host_batch(5 * 8, 8)[key])
    assert first["tokens"].sharding.spec[0] == ("data", "fsdp")


def test_each_epoch_visits_every_row_once_in_a_new_order(stream):
    train, _ = stream
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    batches = LMBatches(train, seq_len=16, batch_size=4, mesh=mesh, seed=0)
    rows = batches.num_rows
    epoch0 = [batches.order[i] for i in range(rows)]
    epoch1 = [batches.order[rows + i] for i in range(rows)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(rows))
    assert epoch0 != epoch1


def test_corpus_shorter_than_a_batch(stream):
    train, val = stream
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    with pytest.raises(
        DataError,
        match=r"training split gives \d+ rows of 65 tokens but one "
        r"batch needs 1000",
    ):
        LMBatches(train, seq_len=64, batch_size=1000, mesh=mesh)
    with pytest.raises(DataError, match="validation split"):
        eval_batches(val, 64, 100, 2, mesh)


def test_a_byte_order_mark_is_not_text(tmp_path):
    """Files saved with a UTF-8 byte-order mark (Windows editors) read as without it."""
    from jaxllm.data.conversations import read_jsonl_records

    bom = "\ufeff".encode()
    (tmp_path / "chat.jsonl").write_bytes(bom + b'{"prompt": "hi", "completion": "yo"}\n')
    assert [r for _, r in read_jsonl_records(tmp_path / "chat.jsonl", "chat")] == [
        {"prompt": "hi", "completion": "yo"}
    ]
    (tmp_path / "corpus.txt").write_bytes(bom + "Tôt le matin".encode())
    assert list(iter_documents(str(tmp_path / "corpus.txt"))) == ["Tôt le matin"]


def test_an_eval_path_is_the_whole_validation_stream(tmp_path):
    """With data.eval_path, pre-training trains on all of data.path and evaluates on all of
    data.eval_path (a missing one is an error naming it)."""
    train_text, eval_text = tmp_path / "train.txt", tmp_path / "eval.txt"
    train_text.write_text("the training text " * 20)
    eval_text.write_text("held out")
    data_cfg = DataConfig(path=str(train_text), eval_path=str(eval_text))
    train, val = prepare_token_streams(data_cfg, BYTES, tmp_path / "cache")
    assert len(train) == len("the training text " * 20) + 2  # <|start|> text <|end|>
    assert BYTES.decode(val.tokens[1:-1].tolist()) == "held out"
    missing = DataConfig(path=str(train_text), eval_path=str(tmp_path / "gone.txt"))
    with pytest.raises(DataError, match="gone.txt' does not exist"):
        prepare_token_streams(missing, BYTES, tmp_path / "cache")


def test_a_path_that_is_neither_file_nor_folder_says_so():
    with pytest.raises(DataError, match="'/dev/null' is neither a file nor a folder"):
        list(iter_documents("/dev/null"))
