"""Fault injection: every expected failure is one `error:` line, a non-zero exit and no
change to a run; a corrupt checkpoint is skipped (kept, never deleted) and the run resumes
exactly from the newest one that reads back whole."""

import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    build,
    cpu_environment,
    finished_checkpoints,
    losses,
    pretrain_command,
    tiny_config,
)

import jaxllm.config
from jaxllm.checkpoint import Checkpointer, load_run_params
from jaxllm.cli import main as cli_main
from jaxllm.config import DataConfig
from jaxllm.data.tokens import prepare_token_streams
from jaxllm.errors import ConfigError, UserError
from jaxllm.model import LanguageModel
from jaxllm.run_dir import exclusive_out_dir
from jaxllm.tokenizer import load_tokenizer
from jaxllm.trainer import Stage, by_step, check_step_fits_memory, run_training

STEPS = 30  # the shared run: checkpoints at 10, 20 and 30


def pretrain_argv(corpus, out_dir, *overrides: str) -> list[str]:
    """The shared run's command line for in-process `cli_main` (8 devices)."""
    return pretrain_command(corpus, out_dir, f"train.steps={STEPS}", "checkpoint.every=10")[3:] + [
        *overrides
    ]


@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("finished") / "run"
    assert cli_main(pretrain_argv(corpus, out_dir)) == 0
    return out_dir


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def one_error_line(capsys, expected: str) -> None:
    """stderr holds exactly one `error:` line, containing `expected`, and no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], err
    assert "Traceback" not in err


def snapshot(out_dir: Path) -> dict[str, bytes]:
    """Every file of a run (checkpoints included) and its bytes."""
    return {str(p.relative_to(out_dir)): p.read_bytes() for p in out_dir.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("overrides", "config_file", "expected"),
    [
        (["train=5"], None, "override 'train' is a config section, not a value"),
        (None, b"train: 5\n", "'train' is a config section, not a value"),
        (["model.scalar_heads=[a"], None, "override 'model.scalar_heads=[a' is not a valid YAML"),
        (
            ["model.scalar_heads=!!python/object/apply:os.system [echo]"],
            None,
            "could not determine a constructor for the tag",
        ),
        (["optimizer.lr=inf"], None, "optimizer.lr=inf must be a finite number"),
        (["optimizer.lr=nan"], None, "optimizer.lr=nan must be a finite number"),
        (None, b"train:\n  steps: [1\n", "is not valid YAML: expected ',' or ']'"),
        (None, b"out_dir: caf\xe9\n", "byte 12 is not valid UTF-8; save the file as UTF-8"),
    ],
)
def test_config_faults_are_one_line(corpus, tmp_path, capsys, overrides, config_file, expected):
    argv = pretrain_argv(corpus, tmp_path / "out", *(overrides or []))
    if config_file is not None:
        (tmp_path / "run.yaml").write_bytes(config_file)
        argv = [argv[0], "--config", str(tmp_path / "run.yaml"), *argv[1:]]
    assert cli_main(argv) == 2
    one_error_line(capsys, expected)
    assert not (tmp_path / "out").exists()


def test_out_dir_a_file_or_holding_a_file_for_checkpoints_is_refused_before_writing(
    corpus, tmp_path, capsys
):
    as_file = tmp_path / "file"
    as_file.write_text("mine")
    assert cli_main(pretrain_argv(corpus, as_file)) == 2
    one_error_line(capsys, f"out_dir={as_file} is a file, not a folder")
    assert as_file.read_text() == "mine"

    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / "checkpoints").write_text("not a folder")
    (out_dir / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0}\n')
    before = snapshot(out_dir)
    assert cli_main(pretrain_argv(corpus, out_dir)) == 2
    one_error_line(capsys, "checkpoints is a file where the run keeps its checkpoints/ folder")
    assert snapshot(out_dir) == before


def test_os_errors_and_a_bad_tiktoken_file_are_one_line(corpus, tmp_path, capsys):
    folder = tmp_path / "a_folder.tiktoken"
    folder.mkdir()
    tokenizer_train = ["tokenizer", "train", "--input", str(corpus), "--vocab-size", "260"]
    assert cli_main([*tokenizer_train, "--output", str(folder)]) == 2
    one_error_line(capsys, f"{folder}: Is a directory; it is a folder; name a file")

    ranks = tmp_path / "ten.tiktoken"  # tiktoken panics (a Rust abort) on such a file
    ranks.write_text("".join(f"{b64} {i}\n" for i, b64 in enumerate(["QQ==", "Qg==", "Qw=="])))
    assert cli_main(pretrain_argv(corpus, tmp_path / "out", f"data.tokenizer={ranks}")) == 2
    one_error_line(capsys, "lacks 253 of the 256 single-byte ranks (first: byte 0)")


def test_ctrl_c_and_a_full_disk_are_one_line_and_a_bug_asks_to_be_reported(
    corpus, tmp_path, capsys, monkeypatch
):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(jaxllm.config, "load_stage_config", interrupted)
    assert cli_main(pretrain_argv(corpus, tmp_path / "out")) == 128 + signal.SIGINT
    one_error_line(capsys, "interrupted by Ctrl-C (SIGINT) outside training")

    def disk_full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "runs/x/metrics.jsonl")

    monkeypatch.setattr(jaxllm.config, "load_stage_config", disk_full)
    assert cli_main(pretrain_argv(corpus, tmp_path / "out")) == 2
    one_error_line(
        capsys, "error: runs/x/metrics.jsonl: No space left on device; free some disk space"
    )

    def buggy(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(jaxllm.config, "load_stage_config", buggy)
    with pytest.raises(RuntimeError, match="a bug"):
        cli_main(pretrain_argv(corpus, tmp_path / "out"))
    assert "internal error, not a mistake in your input" in capsys.readouterr().err


def test_a_second_run_on_a_locked_out_dir_is_refused_and_changes_nothing(corpus, run_copy, capsys):
    before = snapshot(run_copy)
    with exclusive_out_dir(run_copy):
        assert cli_main(pretrain_argv(corpus, run_copy, "train.steps=40")) == 2
    one_error_line(capsys, f"out_dir={run_copy} is in use by another run")
    assert snapshot(run_copy) == before


def test_the_lock_of_a_run_killed_with_kill_9_is_released(tmp_path):
    out_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom jaxllm.run_dir import exclusive_out_dir\n"
            f"with exclusive_out_dir({str(out_dir)!r}):\n"
            "    print('locked', flush=True)\n    time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline() == "locked\n"
    with pytest.raises(UserError, match="is in use by another run"), exclusive_out_dir(out_dir):
        pass
    holder.kill()
    holder.wait()
    with exclusive_out_dir(out_dir):  # no stale lock: the kernel dropped it with the process
        assert out_dir.is_dir()


def test_train_steps_below_the_run_is_refused_and_equal_is_done(corpus, run_copy, capsys):
    before = snapshot(run_copy)
    assert cli_main(pretrain_argv(corpus, run_copy, "train.steps=20")) == 2
    one_error_line(capsys, f"the run in {run_copy} is already at step 30, past train.steps=20")
    assert snapshot(run_copy) == before

    assert cli_main(pretrain_argv(corpus, run_copy)) == 0
    captured = capsys.readouterr()
    assert f"the run in {run_copy} is already done (step 30 = train.steps)" in captured.out
    assert "error:" not in captured.err
    assert snapshot(run_copy) == before


def corrupt(step_dir: Path, how: str) -> None:
    data_files = sorted((step_dir / "state").rglob("d/*"))
    if how == "data file deleted":
        for path in data_files:
            path.unlink()
    elif how == "data file truncated":
        for path in data_files:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "manifest truncated":
        manifest = step_dir / "state" / "manifest.ocdbt"
        manifest.write_bytes(manifest.read_bytes()[:20])
    elif how == "meta missing":
        (step_dir / "meta" / "metadata").unlink()
    elif how == "empty folder":
        shutil.move(step_dir, step_dir.parent.parent / "moved_away")
        step_dir.mkdir()


@pytest.mark.parametrize(
    "how",
    ["data file deleted", "data file truncated", "manifest truncated", "meta missing", "empty"],
)
def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_run_resumes_exactly(
    corpus, finished_run, run_copy, capsys, how
):
    newest = run_copy / "checkpoints" / "30"
    corrupt(newest, "empty folder" if how == "empty" else how)
    corrupted = snapshot(newest)
    (run_copy / "samples.txt").write_text("--- step 20\nkept\n--- step 30\ndropped\n")
    assert cli_main(pretrain_argv(corpus, run_copy)) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "error:" not in err, err
    assert warnings[0].startswith(f"warning: checkpoint {newest} does not read back whole (")
    assert warnings[0].endswith("moved it to 30.unreadable and resumed from step 20")
    assert snapshot(run_copy / "checkpoints" / "30.unreadable") == corrupted  # kept whole
    assert finished_checkpoints(run_copy) == [10, 20, 30]
    resumed, expected = losses(run_copy), losses(finished_run)
    assert sorted(resumed) == list(range(1, 31))
    np.testing.assert_allclose(
        [resumed[s] for s in range(21, 31)], [expected[s] for s in range(21, 31)], rtol=1e-6
    )
    assert (run_copy / "samples.txt").read_text() == "--- step 20\nkept\n"


def test_loading_skips_a_corrupt_checkpoint_and_never_writes(finished_run, run_copy, capsys):
    corrupt(run_copy / "checkpoints" / "30", "manifest truncated")
    before = snapshot(run_copy)
    model = LanguageModel(tiny_config().model)
    params = load_run_params(run_copy, model.abstract_params, from_key="sft.init_from")
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"warning: checkpoint {run_copy / 'checkpoints' / '30'} does not read")
    assert err.endswith("using step 20") and len(err.splitlines()) == 1
    assert snapshot(run_copy) == before
    checkpointer = Checkpointer(finished_run / "checkpoints", read_only=True)
    expected = checkpointer.restore_params(model.abstract_params, step=20)
    checkpointer.close()
    jax.tree.map(np.testing.assert_array_equal, params, expected)

    config_only = run_copy.parent / "config_only"
    config_only.mkdir()
    shutil.copy(run_copy / "config.yaml", config_only)
    with pytest.raises(ConfigError, match="has no checkpoints/ folder"):
        load_run_params(config_only, model.abstract_params)
    (config_only / "checkpoints").mkdir()
    with pytest.raises(ConfigError, match="holds no complete checkpoint"):
        load_run_params(config_only, model.abstract_params)
    assert sorted(p.name for p in config_only.rglob("*")) == ["checkpoints", "config.yaml"]


def test_a_corrupt_metrics_line_names_the_file_and_changes_nothing(corpus, run_copy, capsys):
    metrics = run_copy / "metrics.jsonl"
    metrics.write_text(metrics.read_text().replace('{"step": 5,', '{"step": 5', 1))
    before = snapshot(run_copy)
    assert cli_main(pretrain_argv(corpus, run_copy, "train.steps=40")) == 2
    one_error_line(capsys, f"{metrics}:5: not a metrics line (JSON with a 'step'); delete or mend")
    assert snapshot(run_copy) == before


def test_a_truncated_token_cache_is_rebuilt_and_dead_staging_folders_removed(corpus, tmp_path):
    tokenizer = load_tokenizer("bytes")
    data_cfg = DataConfig(path=str(corpus))
    expected = np.array(prepare_token_streams(data_cfg, tokenizer, tmp_path)[0].tokens)
    (folder,) = tmp_path.iterdir()
    tokens = folder / "tokens.bin"
    complete = tokens.read_bytes()
    tokens.write_bytes(complete[:1000])

    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    dead_pid = int(finished.stdout)
    host = socket.gethostname()
    dead = tmp_path / f"{folder.name}.tmp-{host}-{dead_pid}-abc"
    live = tmp_path / f"{folder.name}.tmp-{host}-{os.getpid()}-abc"
    dead.mkdir()
    live.mkdir()
    rebuilt_train, _ = prepare_token_streams(data_cfg, tokenizer, tmp_path)
    assert tokens.read_bytes() == complete
    np.testing.assert_array_equal(rebuilt_train.tokens, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name, live.name]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize(
    ("records", "overrides", "expected"),
    [
        ([], [], "holds no conversations; add .jsonl lines"),
        (
            [{"messages": [{"role": "user", "content": "hi"}]}] * 10,
            [],
            "none of the 9 training conversations has an assistant turn",
        ),
        (
            [{"prompt": "q", "completion": "a"}] * 3,
            [],
            "the validation split is empty: data.val_fraction=0.1 of 3 conversations",
        ),
        (
            [{"prompt": "a long question " * 4, "completion": "a"}] * 10,
            ["sft.truncation=truncate"],
            "the training conversations give 0 trained tokens: truncation at train.seq_len=32",
        ),
    ],
)
def test_sft_data_that_trains_nothing_says_why(tmp_path, capsys, records, overrides, expected):
    data = write_jsonl(tmp_path / "chat.jsonl", records)
    argv = ["sft", "preset=tiny", f"data.path={data}", f"out_dir={tmp_path / 'out'}"]
    assert cli_main([*argv, "train.seq_len=32", *overrides]) == 2
    one_error_line(capsys, expected)


def test_tokenizer_train_refuses_empty_input_and_writes_files_readable_by_all(tmp_path, capsys):
    empty, output = tmp_path / "empty.txt", tmp_path / "out.tiktoken"
    empty.write_text("")
    train = ["tokenizer", "train", "--vocab-size", "260", "--output", str(output)]
    assert cli_main([*train, "--input", str(empty)]) == 2
    one_error_line(capsys, "the tokenizer's training text is empty")
    assert not output.exists()
    text = tmp_path / "text.txt"
    text.write_text("abababab cdcdcd " * 50)
    assert cli_main([*train, "--input", str(text)]) == 0
    assert output.stat().st_mode & 0o777 == 0o644
    ranks = output.read_bytes()
    assert cli_main([*train, "--input", str(empty)]) == 2  # never overwritten
    one_error_line(capsys, f"--output {output} exists; remove it or choose another name")
    assert output.read_bytes() == ranks
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    train[-1] = str(precious)
    assert cli_main([*train, "--input", str(text)]) == 2
    one_error_line(capsys, f"--output {precious}: name the file *.tiktoken")
    assert precious.read_text() == "keep me"


def test_a_signal_during_the_last_step_finishes_the_run(tmp_path):
    """SIGTERM that lands while the final step and save run: the run is finished, not
    stopped, and the last checkpoint is complete."""
    from helpers import random_batches

    cfg = tiny_config(f"out_dir={tmp_path}", "train.steps=4", "train.samples=0")
    model, mesh, _, _, _ = build(cfg, (1, 1, 1))
    batches = random_batches(4)

    def batch(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return batches[step]

    stage = Stage("pretrain", model, by_step(batch), tokens_per_step=8 * 32)
    result = run_training(cfg, stage, mesh)
    assert (result.final_step, result.stopped_by_signal) == (4, None)
    assert finished_checkpoints(tmp_path) == [4]


def test_a_step_that_cannot_fit_device_memory_is_refused_with_the_estimate():
    cfg = tiny_config("train.seq_len=64")
    compiled = jax.jit(lambda x: (x @ x).sum()).lower(jnp.ones((512, 512))).compile()
    memory = compiled.memory_analysis()
    assert (memory.argument_size_in_bytes, memory.output_size_in_bytes) == (2**20, 4)
    needed = 2**20 + 4 + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes
    check_step_fits_memory(memory, needed, cfg)
    check_step_fits_memory(memory, None, cfg)  # CPU: no limit reported
    expected = (
        f"needs about {needed / 2**30:.3g} GiB per device at train.seq_len=64, "
        "train.batch_size=8 but a device has 0.000977 GiB; lower train.seq_len"
    )
    with pytest.raises(UserError, match=re.escape(expected)):
        check_step_fits_memory(memory, 2**20, cfg)


def test_another_stage_in_the_out_dir_of_a_run_is_refused_and_changes_nothing(
    corpus, run_copy, capsys
):
    assert json.loads((run_copy / "run.json").read_text()) == {"stage": "pretrain"}
    before = snapshot(run_copy)
    sft = ["sft", "data.path=builtin", f"out_dir={run_copy}", "preset=tiny", "train.steps=40"]
    sft += ["model.max_seq_len=128", "train.seq_len=128", "sft.max_new_tokens=8"]
    assert cli_main(sft) == 2
    one_error_line(capsys, f"out_dir={run_copy} holds a pretrain run; give the sft stage a new")
    assert snapshot(run_copy) == before


def test_one_stage_s_batch_rules_do_not_bind_another_stage():
    """PPO's rollouts split into ppo.minibatches (2 by default); a pre-training batch of 3
    has no minibatches to split into."""
    assert jaxllm.config.load_config(None, ["train.batch_size=3"], stage="pretrain")
    with pytest.raises(ConfigError, match="do not split into ppo.minibatches=2"):
        jaxllm.config.load_config(None, ["train.batch_size=3"], stage="ppo")
    with pytest.raises(
        ConfigError, match="6 replies per iteration .* do not split into grpo.minibatches=4"
    ):
        jaxllm.config.load_config(
            None,
            ["train.batch_size=3", "grpo.minibatches=4", "grpo.group_size=2", "grpo.pass_k=2"],
            stage="grpo",
        )
    assert jaxllm.config.load_config(
        None, ["train.batch_size=3", "grpo.minibatches=4", "grpo.group_size=2", "grpo.pass_k=2"]
    )
    from jaxllm.stages.ppo import ppo  # called from Python: the stage checks its own rules

    with pytest.raises(ConfigError, match="do not split into ppo.minibatches=2"):
        ppo(jaxllm.config.load_config(None, ["train.batch_size=3"]))


def test_prompts_that_leave_no_held_out_prompt_are_refused_before_training(tmp_path):
    from jaxllm.data.prompts import train_and_eval_prompts
    from jaxllm.errors import DataError

    few = tmp_path / "few.jsonl"
    few.write_text('{"prompt": "What is 0+1?", "answer": "1"}\n' * 3)
    with pytest.raises(DataError, match="3 prompts leave no held-out prompts at data.val_fra"):
        train_and_eval_prompts(str(few), None, 0.1, 0, 64, 0)
    with pytest.raises(ConfigError, match="ppo.eval_prompts must be >= 1, got 0"):
        jaxllm.config.load_config(None, ["ppo.eval_prompts=0"])


def test_a_run_that_fails_to_start_leaves_no_folders(corpus, tmp_path, capsys):
    """Bad data found while starting (after out_dir and its data/ cache folder were made):
    the new out_dir is gone again; an out_dir that existed before stays."""
    missing = str(tmp_path / "missing.txt")
    out_dir = tmp_path / "new" / "run"
    assert cli_main(pretrain_argv(corpus, out_dir, f"data.path={missing}")) == 2
    one_error_line(capsys, "missing.txt' does not exist")
    assert not out_dir.exists()
    out_dir.mkdir()
    assert cli_main(pretrain_argv(corpus, out_dir, f"data.path={missing}")) == 2
    capsys.readouterr()
    assert out_dir.is_dir()


def test_a_failed_restores_abandoned_reads_print_nothing_and_other_leftovers_still_do():
    """A corrupt checkpoint's restore fails on one array; Orbax's other read coroutines are
    then never awaited and Python printed each as a page of 'Exception ignored in
    <coroutine ...>' after the one error line. The CLI's hook drops exactly those."""
    import types

    from orbax.checkpoint._src.serialization import serialization

    from jaxllm.errors import quiet_abandoned_reads

    seen = []
    previous = sys.unraisablehook
    sys.unraisablehook = seen.append
    try:
        quiet_abandoned_reads()
        quiet_abandoned_reads()  # installed once
        read = serialization._read_array_index_and_device_put(
            [], (), None, global_shape=(), new_shard_shape=(), dtype=None,
            byte_limiter=None, strict=True, dll=None, memory_kind=None,
        )  # fmt: skip
        abandoned = types.SimpleNamespace(
            object=read, exc_value=Exception("Encountered error while reading array index")
        )
        closed = types.SimpleNamespace(object=None, exc_value=RuntimeError("Event loop is closed"))
        other = types.SimpleNamespace(object=None, exc_value=RuntimeError("a real bug"))
        for unraisable in (abandoned, closed, other):
            sys.unraisablehook(unraisable)
        read.close()
    finally:
        sys.unraisablehook = previous
    assert seen == [other]
    log = logging.getLogger("asyncio")
    task = "future: <Task finished coro=<_read_array_index_and_device_put() done, defined at "
    dropped = log.makeRecord(
        "asyncio",
        logging.ERROR,
        "",
        0,
        f"Task exception was never retrieved\n{task}/site-packages/orbax/serialization.py>",
        (),
        None,
    )
    kept = log.makeRecord("asyncio", logging.ERROR, "", 0, "Task exception was never "
                          f"retrieved\n{task}/my_code.py>", (), None)  # fmt: skip
    assert [log.filter(r) for r in (dropped, kept)] == [False, True]


@pytest.mark.parametrize("command", ["export-hf", "tokenizer", "label"])
def test_a_write_past_the_disk_is_one_line_naming_the_path_and_leaves_nothing(
    finished_run, corpus, tmp_path, command
):
    out = tmp_path / "out"
    out.mkdir()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}."}) + "\n" for i in range(40)))
    argv = {
        "export-hf": ["export-hf", str(finished_run), "--out", str(out / "hf")],
        "tokenizer": ["tokenizer", "train", "--input", str(corpus), "--vocab-size", "400",
                      "--output", str(out / "my.tiktoken")],
        "label": ["label", "--checkpoint", str(finished_run), "--prompts", str(prompts),
                  "--max-new-tokens", "8",
                  "--output", str(out / "labels.jsonl")],
    }[command]  # fmt: skip
    # Files past 2 KiB fail with EFBIG: a full disk in miniature (SIGXFSZ ignored).
    limited = "ulimit -f 2; trap '' XFSZ; exec \"$@\""
    result = subprocess.run(
        ["bash", "-c", limited, "bash", sys.executable, "-m", "jaxllm.cli", *argv],
        env=cpu_environment(1, compilation_cache=False),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {out}/") and "File too large; it passes" in last, last
    assert "Traceback" not in result.stderr
    assert list(out.iterdir()) == []


def test_a_checkpoint_save_past_the_disk_is_one_line_naming_the_folder(tmp_path):
    """TensorStore's failed write (OUT_OF_RANGE ... os_error_code='27'), Orbax's logged
    thread tracebacks and the closed-loop callbacks after it: one line."""
    from pydoc_data.topics import topics

    corpus = tmp_path / "small.txt"
    corpus.write_text("\n".join(topics[k] for k in sorted(topics))[:20_000])
    out_dir = tmp_path / "run"
    argv = [
        *pretrain_command(corpus, out_dir, "train.steps=2", "checkpoint.every=2"),
        "data.tokenizer=bytes",
        "train.samples=0",
    ]
    limited = "ulimit -f 200; trap '' XFSZ; exec \"$@\""  # token cache fits, checkpoint not
    result = subprocess.run(
        ["bash", "-c", limited, "bash", *argv],
        env=cpu_environment(1, compilation_cache=False),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "rror" in line]
    assert errors == [
        f"error: {out_dir / 'checkpoints'}: File too large; it passes the largest file this "
        "process may write (ulimit -f, or the filesystem's limit); raise the limit or write "
        "elsewhere"
    ], result.stderr[-3000:]
    assert finished_checkpoints(out_dir) == []


def test_a_killed_exports_staging_folder_is_removed_by_the_next_export(finished_run, tmp_path):
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    host = socket.gethostname()
    dead = tmp_path / f"hf.tmp-{host}-{int(finished.stdout)}-abc"  # as a kill -9 leaves it
    live = tmp_path / f"hf.tmp-{host}-{os.getpid()}-abc"  # another export still writing
    (dead / "model.safetensors").parent.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    live.mkdir()
    assert cli_main(["export-hf", str(finished_run), "--out", str(tmp_path / "hf")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", live.name]
