"""Answer extraction, math-verify comparison, the `correct` reward, and the GSM8K/MATH
prompt adapters (local files, and a local folder read through `datasets` as `hf:`)."""

import json
import threading

import pytest

from jaxllm.answers import answers_match, extract_answer
from jaxllm.config import load_config
from jaxllm.data.corpus import hf_dataset
from jaxllm.data.prompts import (
    PromptFields,
    builtin_prompts,
    read_prompts,
    shuffled_answers,
    train_and_eval_prompts,
)
from jaxllm.errors import ConfigError, DataError
from jaxllm.rl.rewards import make_rewards
from jaxllm.tokenizer import load_tokenizer

GSM8K = PromptFields(prompt="question", answer_format="gsm8k")
MATH = PromptFields(prompt="problem", answer="solution", answer_format="boxed")


@pytest.mark.parametrize(
    "text, how, expected",
    [
        ("Half is \\boxed{\\frac{1}{2}}.", "boxed", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{\\{a, \\{b\\}\\}} end", "boxed", "\\{a, \\{b\\}\\}"),
        ("\\fbox{7}", "boxed", "7"),
        ("\\boxed{\\frac{1}{2}", "boxed", ""),  # the braces never close
        ("no box here", "boxed", ""),
        ("3 + 4 = 7\n#### 1,000\n", "gsm8k", "1000"),
        ("#### 5\nmore work\n#### 6 apples", "gsm8k", "6 apples"),
        ("12 and 1,234.5 then -3.", "last_number", "-3"),
        ("It costs 1,234.50", "last_number", "1234.50"),
        ("no digits", "last_number", ""),
        ("  just text \n", "plain", "just text"),
        ("#### 3 but \\boxed{4}", "auto", "4"),
        ("work\n#### 72", "auto", "72"),
        (" 42 ", "auto", "42"),
    ],
)
def test_extract_answer(text, how, expected):
    assert extract_answer(text, how) == expected


@pytest.mark.parametrize(
    "answer, expected, match",
    [
        ("\\frac{1}{2}", "0.5", True),
        ("0.5", "\\frac{1}{2}", True),
        ("\\boxed{42}", "42", True),
        ("1,000", "1000", True),
        ("1,2", "12", False),  # only thousands separators are dropped
        ("12,345.5", "12345.5", True),
        ("12.0", "12", True),
        ("$x=3$", "3", True),  # math-verify takes an equation's right-hand side
        ("(1,2]", "(1, 2]", True),
        ("(1,2)", "(1, 2]", False),
        ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", True),
        ("2\\sqrt{3}", "\\sqrt{12}", True),
        ("\\{2, 1\\}", "\\{1, 2\\}", True),  # sets, by math-verify
        ("50\\%", "0.5", True),  # math-verify: a percentage equals its fraction
        ("5\\text{ cm}", "5", True),  # units in \text{} are dropped by math-verify
        ("5 cm", "5", False),  # a bare word does not read as math
        ("42", "43", False),
        ("abc", "abc", True),
        ("abc", "cba", False),  # as LaTeX both would be the product a*b*c
        ("Paris", "paris", False),
        ("81, 78, 55, 40", "40, 55, 78, 81", False),  # a number list is ordered, not a set
        ("3", "1 2", False),  # not 1 + 2
        ("", "0", False),
    ],
)
def test_answers_match(answer, expected, match):
    assert answers_match(answer, expected) is match


def test_answers_match_off_the_main_thread_is_the_exact_rule():
    """math-verify's signal-based timeout cannot run there: no error, no hang."""
    results = []
    pairs = [("\\frac{1}{2}", "0.5"), ("12.0", "12"), ("abc", "abc"), ("42", "43")]
    worker = threading.Thread(target=lambda: results.extend(answers_match(*p) for p in pairs))
    worker.start()
    worker.join(timeout=30)
    assert results == [False, True, True, False]


def test_correct_reward_reads_the_answer_by_config_and_by_row():
    tokenizer = load_tokenizer("bytes")
    think, end_think = tokenizer.think_ids()
    end = tokenizer.special_id("<|im_end|>")

    def example(reply: str, answer: str, **fields) -> dict:
        ids = [think, *tokenizer.encode("work"), end_think, *tokenizer.encode(reply), end]
        return {"answer": answer, "completion_ids": ids, **fields}

    boxed = example("So it is \\boxed{\\frac{1}{2}}.", "0.5")
    gsm8k = example("The total is\n#### 1,000", "1000")
    words = example("There are 7 apples.", "7")
    words_by_row = example("There are 7 apples.", "7", answer_format="last_number")
    wrong = example("\\boxed{43}", "42")

    def scores(answer_format: str) -> list[float]:
        correct = make_rewards({"correct": 1.0}, tokenizer, 64, 8, answer_format)["correct"]
        return [correct("q", "", e) for e in (boxed, gsm8k, words, words_by_row, wrong)]

    assert scores("auto") == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert scores("plain") == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert scores("last_number") == [0.0, 1.0, 1.0, 1.0, 0.0]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "What is 999 + 1?", "answer": "999 + 1 = 1,000\n#### 1,000"},
]


def test_gsm8k_rows_become_prompts_with_their_answers(tmp_path):
    prompts = read_prompts(write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS), fields=GSM8K)
    assert [p.text for p in prompts] == [row["question"] for row in GSM8K_ROWS]
    assert [p.messages[0]["role"] for p in prompts] == ["user", "user"]
    assert [p.fields for p in prompts] == [{"answer": "7"}, {"answer": "1000"}]


def test_math_rows_become_prompts_with_the_boxed_answer(tmp_path):
    rows = [
        {
            "problem": "What is $\\frac{2}{4}$ in lowest terms?",
            "solution": "Divide by 2: $\\boxed{\\frac{1}{2}}$.",
            "level": "Level 1",
        }
    ]
    (prompt,) = read_prompts(write_jsonl(tmp_path / "math.jsonl", rows), fields=MATH)
    assert prompt.text == rows[0]["problem"]
    assert prompt.fields == {
        "solution": rows[0]["solution"],
        "level": "Level 1",
        "answer": "\\frac{1}{2}",
    }


def test_existing_prompt_files_read_as_before(tmp_path):
    rows = [
        {"prompt": "What is 2 + 2?", "answer": 4, "family": "add"},
        {"messages": [{"role": "user", "content": "Hi"}], "answer": " hello "},
        {"prompt": "No answer here"},
    ]
    prompts = read_prompts(write_jsonl(tmp_path / "p.jsonl", rows))
    assert [p.fields for p in prompts] == [{"answer": 4, "family": "add"}, {"answer": "hello"}, {}]


@pytest.mark.parametrize(
    "row, fields, message",
    [
        (
            {"question": "q", "answer": "no mark"},
            GSM8K,
            r":2: 'answer' states no answer in the gsm8k",
        ),
        ({"problem": "p", "solution": "\\boxed{1"}, MATH, r":2: 'solution' states no answer in"),
        ({"prompt": "p", "answer": "  "}, PromptFields(), r":2: 'answer' states no answer in"),
        ({"answer": "#### 1"}, GSM8K, r":2: no 'prompt' and no 'messages' and no 'question'"),
        ({"prompt": "p", "answer": "1", "answer_format": "latex"}, PromptFields(), r":2: 'answer_"),
    ],
)
def test_a_bad_row_is_a_data_error_naming_its_line(tmp_path, row, fields, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "answer": "#### 1"}, row])
    with pytest.raises(DataError, match=f"^{path}{message}"):
        read_prompts(path, fields=fields)


def test_a_local_dataset_folder_reads_as_hf_with_its_splits(tmp_path):
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", GSM8K_ROWS)
    write_jsonl(folder / "test.jsonl", [{"question": "What is 6 x 7?", "answer": "#### 42"}])
    train, held_out = train_and_eval_prompts(
        f"hf:{folder}", f"hf:{folder}:test", 0.1, 0, 5, 0, GSM8K, hf_split="train"
    )
    assert [p.fields["answer"] for p in train] == ["7", "1000"]
    assert [(p.text, p.fields["answer"]) for p in held_out] == [("What is 6 x 7?", "42")]
    assert held_out[0].where == f"hf:{folder}:test row 1"
    with pytest.raises(DataError, match=r"\(split validation\): Bad split: validation"):
        read_prompts(f"hf:{folder}:validation", fields=GSM8K)


@pytest.mark.parametrize(
    "spec, parts",
    [
        ("hf:openai/gsm8k/main", ("openai/gsm8k", "main", "train")),
        ("hf:openai/gsm8k/main:test", ("openai/gsm8k", "main", "test")),
        ("hf:wikitext/wikitext-2-raw-v1", ("wikitext", "wikitext-2-raw-v1", "train")),
        ("hf:squad:validation", ("squad", None, "validation")),
    ],
)
def test_hf_specs(spec, parts):
    assert hf_dataset(spec, "train") == parts


def test_a_bad_hf_spec_and_unknown_answer_formats_are_one_line_each():
    with pytest.raises(DataError, match="'hf:a/b/c/d' is not a Hugging Face dataset"):
        hf_dataset("hf:a/b/c/d", "train")
    with pytest.raises(ConfigError) as error:
        load_config(None, ["data.answer_format=latex", "grpo.answer_format=xml"])
    assert "data.answer_format='latex' is unknown; use auto, plain, gsm8k" in str(error.value)
    assert "grpo.answer_format='xml' is unknown; use auto, plain, gsm8k" in str(error.value)


def test_a_control_s_answers_are_the_same_answers_on_other_prompts():
    prompts = builtin_prompts(200, seed=0, families=("add",))
    shuffled = shuffled_answers(prompts, seed=0)
    answers = [q.fields["answer"] for q in prompts]
    moved = [q.fields["answer"] for q in shuffled]
    assert sorted(moved) == sorted(answers)  # the same answers...
    assert sum(a != b for a, b in zip(answers, moved, strict=True)) > 150  # ...elsewhere
    assert [q.messages for q in shuffled] == [q.messages for q in prompts]
    assert [q.fields["family"] for q in shuffled] == ["add"] * 200
    assert shuffled == shuffled_answers(prompts, seed=0) != shuffled_answers(prompts, seed=1)
    assert load_config(None, ["grpo.shuffled_answers=true"]).grpo.shuffled_answers
    with pytest.raises(ConfigError, match="grpo.rewards has no correct reward"):
        load_config(None, ["grpo.shuffled_answers=true", "grpo.rewards.correct=0"])
