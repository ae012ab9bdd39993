"""`jaxllm eval`: the harness model against lm-evaluation-harness's own Hugging Face model on
the run's export (log-likelihoods, rolling windows, generation, chat templates, task
accuracies), pass@k against counting, accuracy on prompts with known answers, bad input."""

from __future__ import annotations

import itertools
import json

import jax
import numpy as np
import pytest
from lm_eval.api.instance import Instance
from test_lora_hf import random_params, write_run

from jaxllm.cli import main as cli_main
from jaxllm.eval import pass_at_k, pass_ks
from jaxllm.hf.checkpoints import write_run_folder

MULTIPLE_CHOICE = """task: toy_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""

GENERATION = """task: toy_generation
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[0]}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


def test_pass_at_k_is_the_share_of_k_subsets_holding_a_right_answer():
    for n in range(1, 7):
        for c in range(n + 1):
            right = [i < c for i in range(n)]
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(right, k))
                counted = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(c, n, k) == pytest.approx(counted, abs=1e-12), (n, c, k)
    assert pass_ks(8) == [1, 2, 4, 8] and pass_ks(6) == [1, 2, 4, 6] and pass_ks(1) == [1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny run of ours with random weights (bytes tokenizer, context 64; logit 0 for the
    control tokens, so it writes text), its export, and a folder of two local tasks."""
    root = tmp_path_factory.mktemp("eval")
    cfg, model = write_run(root / "run", "model.max_seq_len=64")
    params = random_params(model, 1)
    params["token_embedding_vd"][256:] = 0.0  # (tied) so greedy replies are bytes, not markers
    write_run_folder(root / "run", cfg, params, {})
    assert cli_main(["export-hf", str(root / "run"), "--out", str(root / "hf")]) == 0
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(24):
        a, b = rng.integers(1, 10, 2)
        choices = [str(a + b), str(a + b + 1), str(a * b), f" {abs(a - b)}"]
        docs.append({"question": f"{a} + {b} =", "choices": choices, "label": int(a % 4)})
    tasks = root / "tasks"
    tasks.mkdir()
    data = tasks / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "choice.yaml").write_text(MULTIPLE_CHOICE.format(data=data))
    (tasks / "generation.yaml").write_text(GENERATION.format(data=data))
    return root


@pytest.fixture(scope="module")
def both_models(exported):
    from lm_eval.models.huggingface import HFLM

    from jaxllm.harness import JaxLLM

    ours = JaxLLM(str(exported / "run"), batch_size=4)
    theirs = HFLM(pretrained=str(exported / "hf"), device="cpu", batch_size=4)
    return ours, theirs


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def assert_same_scores(ours, theirs, pairs: list[tuple], texts: list[tuple]) -> None:
    """Equal log-likelihoods (not all alike) and greedy flags of (context, continuation)
    `pairs`, and equal rolling log-likelihoods of `texts`."""
    mine = ours.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    reference = theirs.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    np.testing.assert_allclose([v for v, _ in mine], [v for v, _ in reference], rtol=1e-5)
    assert [g for _, g in mine] == [g for _, g in reference]
    assert len({round(v, 3) for v, _ in mine}) == len(pairs)  # not a constant
    np.testing.assert_allclose(
        ours.loglikelihood_rolling(_requests("loglikelihood_rolling", texts), True),
        theirs.loglikelihood_rolling(_requests("loglikelihood_rolling", texts), True),
        rtol=1e-5,
    )


def assert_same_replies_and_chats(ours, theirs, args: list[tuple], chats: list[tuple]) -> None:
    """Equal (not all empty) `generate_until` replies to `args`, and equal renderings of
    (messages, add_generation_prompt) `chats` and of the template itself."""
    replies = ours.generate_until(_requests("generate_until", args), True)
    assert replies == theirs.generate_until(_requests("generate_until", args), True)
    assert any(replies), replies
    for messages, open_reply in chats:
        assert ours.apply_chat_template(messages, open_reply) == (
            theirs.apply_chat_template(messages, open_reply)
        )
    assert ours.chat_template(True) == theirs.chat_template(True)


def test_log_likelihoods_equal_the_harness_hf_model_on_the_export(both_models):
    """Empty context (the prefix token), a trailing space moved, control-token text, a row
    past the context (left-truncated), and rolling windows over a text 3x the context."""
    ours, theirs = both_models
    pairs = [
        ("The cat", " sat"),
        ("", "hello world"),
        ("2 + 3 = ", "5"),
        ("Hi <|im_end|>", " there"),
        ("x" * 100, " y z"),
        ("Q: 7 * 6?\nA:", " 42"),
    ]
    texts = [("hello there, general kenobi",), ("abc " * 50,)]
    assert_same_scores(ours, theirs, pairs, texts)


def test_generation_and_chat_templates_equal_the_harness_hf_model(both_models):
    ours, theirs = both_models
    kwargs = [
        {"until": ["\n"], "max_gen_toks": 10, "do_sample": False},
        {"until": ["e"], "max_gen_toks": 20},
    ]
    args = [(text, k) for text in ("Once upon", "A", "x" * 70) for k in kwargs]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chats = [(chat, True), ([*chat, {"role": "assistant", "content": "He"}], False)]
    assert_same_replies_and_chats(ours, theirs, args, chats)


def test_eval_tasks_prints_the_accuracies_lm_eval_hf_gives(exported, capsys):
    """`jaxllm eval --tasks` on local tasks (one multiple-choice, one generated) against the
    harness's `simple_evaluate` with `--model hf` on the export."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = ["toy_choice", "toy_generation"]
    output = exported / "results.json"
    argv = ["eval", "--checkpoint", str(exported / "run"), "--tasks", ",".join(tasks)]
    assert (
        cli_main([*argv, "--include-path", str(exported / "tasks"), "--output", str(output)]) == 0
    )
    printed = capsys.readouterr().out
    assert "|toy_choice" in printed and "acc_norm" in printed and "exact_match" in printed
    ours = json.loads(output.read_text())["results"]
    theirs = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={exported / 'hf'}",
        device="cpu",
        tasks=tasks,
        task_manager=TaskManager(include_path=str(exported / "tasks")),
        log_samples=False,
    )["results"]
    for task, metric in [
        ("toy_choice", "acc,none"),
        ("toy_choice", "acc_norm,none"),
        ("toy_generation", "exact_match,none"),
    ]:
        assert ours[task][metric] == theirs[task][metric], (task, metric)
    assert 0 < ours["toy_choice"]["acc,none"] < 1  # a random model, but not a constant


def test_eval_data_gives_the_accuracy_and_pass_at_k_of_known_answers(exported, tmp_path, capsys):
    """Prompts whose answers are the run's own greedy replies (family `right`) or never
    written (`wrong`): accuracy 1 and 0 per family, 0.5 overall; at temperature 0 every
    sample is the greedy reply, so pass@k equals accuracy."""
    from jaxllm.chat import render_for_generation
    from jaxllm.generate import Generator
    from jaxllm.stages.common import load_run

    run = load_run(exported / "run")
    questions = [f"What is {i} + {i}?" for i in range(8)]  # --limit 0.75: the first 6
    ids = [
        render_for_generation(run.tokenizer, [{"role": "user", "content": q}]) for q in questions
    ]
    generator = Generator(run.model, run.tokenizer.vocab_size, run.tokenizer.pad_id, 6)
    stops = list(run.tokenizer.stop_ids)
    greedy = generator(run.params, ids, jax.random.key(0), temperature=0.0, stop_ids=stops)
    replies = [run.tokenizer.decode(t for t in greedy.row(i) if t not in stops) for i in range(8)]
    lines = [
        {
            "prompt": q,
            "answer": r.strip() if i % 2 else "never-said",
            "family": "right" if i % 2 else "wrong",
        }
        for i, (q, r) in enumerate(zip(questions, replies, strict=True))
    ]
    assert all(line["answer"] for line in lines)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output = tmp_path / "figures.json"
    argv = ["eval", "--checkpoint", str(exported / "run"), "--data", str(data)]
    argv += [
        "--limit",
        "0.75",
        "--samples",
        "2",
        "--temperature",
        "0",
        "--max-new-tokens",
        "6",
        "--output",
        str(output),
    ]
    assert cli_main(argv) == 0
    figures = json.loads(output.read_text())["figures"]
    assert figures["accuracy"] == 0.5 and figures["pass_at_2"] == 0.5
    assert figures["accuracy_right"] == figures["pass_at_1_right"] == 1.0
    assert figures["accuracy_wrong"] == figures["pass_at_2_wrong"] == 0.0
    table = capsys.readouterr().out
    assert "pass@2" in table and "0.500 ± 0.204" in table


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks", "no_such_task"], "no task named no_such_task"),
        (["--tasks", "broken"], "does not parse: "),
        (["--tasks", "toy_choice", "--samples", "4"], "--samples do(es) not apply with --tasks"),
        (["--data", "PROMPTS", "--num-fewshot", "2"], "--num-fewshot do(es) not apply"),
        (["--data", "PROMPTS"], "a prompt without an 'answer'"),
        (["--data", "PROMPTS", "--limit", "0"], "--limit 0.0 must be > 0"),
        (["--data", "PROMPTS", "--output", "FOLDER"], "is a folder; name a .json file"),
        (["--tasks", "toy_choice", "--temperature", "0"], "--temperature do(es) not apply"),
        (["--data", "PROMPTS", "--tools", "nope", "--max-turns", "2"], "nope"),
        ([], "pass --tasks (harness tasks) or --data (prompts)"),
    ],
)
def test_eval_bad_input_is_one_error_line(exported, tmp_path, capsys, extra, message):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "broken.yaml").write_text("task: broken\n  dataset_path: [\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "2 + 2?"}\n')
    replace = {"PROMPTS": str(prompts), "FOLDER": str(tmp_path)}
    extra = [replace.get(a, a) for a in extra]
    if "--tasks" in extra:
        extra += ["--include-path", str(tasks)]
    assert cli_main(["eval", "--checkpoint", str(exported / "run"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_eval_of_the_calculator_task_in_one_turn_warns_that_its_tools_never_run(exported, capsys):
    argv = ["eval", "--checkpoint", str(exported / "run"), "--data", "calculator"]
    argv += ["--limit", "2", "--samples", "1", "--max-new-tokens", "6"]
    assert cli_main(argv) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert err == [
        "warning: 2 of the 2 prompts name tools, which one turn never runs; pass "
        "--max-turns 3 to let the replies call them"
    ]


def test_eval_of_a_missing_run_names_it(tmp_path, capsys):
    argv = ["eval", "--checkpoint", str(tmp_path / "nothing"), "--data", "builtin"]
    assert cli_main(argv) == 2
    assert f"{tmp_path / 'nothing'}: no config.yaml there" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_an_imported_model_scores_and_chats_as_the_harness_hf_model(tmp_path, family):
    """An imported Hugging Face folder (`tests/hf_families.py`): Llama 3's tokenizer adds
    `<|begin_of_text|>`, Qwen3's adds nothing (an empty context is then `<|im_end|>`); each
    with its own Jinja template. Rows stay shorter than both models' context (256)."""
    from hf_families import family_folder
    from lm_eval.models.huggingface import HFLM

    from jaxllm.harness import JaxLLM

    folder = family_folder(tmp_path / "hf", family)
    assert cli_main(["import-hf", str(folder), "--out", str(tmp_path / "run")]) == 0
    ours = JaxLLM(str(tmp_path / "run"), batch_size=4)
    theirs = HFLM(pretrained=str(folder), device="cpu", batch_size=4)
    assert (ours.max_length, ours.prefix_token_id, ours.eot_token_id) == (
        theirs.max_length,
        theirs.prefix_token_id,
        theirs.eot_token_id,
    )
    pairs = [
        ("", "The quick brown fox"),
        ("Question: What is 7 * 6? Answer: ", "42"),
        ("def add(a, b):\n", "    return a + b"),
        ("<|begin_of_text|>café", " naïve 🙂"),
        ("Hi <|im_end|>", " there"),
    ]
    texts = [("The quick brown fox jumps over the lazy dog.",), ("日本語 12 + 30 = 42\n" * 3,)]
    assert_same_scores(ours, theirs, pairs, texts)
    kwargs = [
        {"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
        {"until": ["e", "."], "max_gen_toks": 6},
    ]
    args = [(text, k) for text in ("The quick", "Question: What is") for k in kwargs]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    reasoning = "<think>\nhm\n</think>\n\nHe "
    chats = [
        (chat, True),
        (chat[1:], True),
        ([*chat, {"role": "assistant", "content": "He"}], False),
        ([*chat, {"role": "assistant", "content": reasoning}], False),
    ]
    assert_same_replies_and_chats(ours, theirs, args, chats)


def test_a_lora_run_scores_as_the_harness_hf_model_on_its_merged_export(tmp_path):
    """A LoRA run (adapters drawn nonzero) is scored with its adapters, as its merged
    export is by lm_eval's own model."""
    from lm_eval.models.huggingface import HFLM

    from jaxllm.harness import JaxLLM
    from jaxllm.lora import adapters_of, join

    base_cfg, base = write_run(tmp_path / "base", "model.max_seq_len=64")
    base_params = random_params(base, 1)
    base_params["token_embedding_vd"][256:] = 0.0
    write_run_folder(tmp_path / "base", base_cfg, base_params, {})
    overrides = ["model.max_seq_len=64", "lora.rank=4", f"sft.init_from={tmp_path / 'base'}"]
    cfg, model = write_run(tmp_path / "lora", *overrides)
    write_run_folder(
        tmp_path / "lora", cfg, join(base_params, adapters_of(random_params(model, 2))), {}
    )
    assert cli_main(["export-hf", str(tmp_path / "lora"), "--out", str(tmp_path / "hf")]) == 0
    ours = JaxLLM(str(tmp_path / "lora"), batch_size=4)
    theirs = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=4)
    plain = JaxLLM(str(tmp_path / "base"), batch_size=4)
    pairs = [("The cat", " sat"), ("", "hello"), ("2 + 3 = ", "5")]
    assert_same_scores(ours, theirs, pairs, [("hello there",)])
    adapted = ours.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    without = plain.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    assert max(abs(a - b) for (a, _), (b, _) in zip(adapted, without, strict=True)) > 0.1
    args = [("Once upon", {"until": ["\n"], "max_gen_toks": 8, "do_sample": False})]
    assert_same_replies_and_chats(ours, theirs, args, [])
