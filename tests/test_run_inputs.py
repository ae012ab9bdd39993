"""A resumed run never silently changes its inputs (`jaxllm.run_inputs`): DPO rerun on its
out_dir with another data file, a changed file or another start run is refused in one line
with nothing written; `resume.allow_changed_inputs=true` goes on and records the change; the
same inputs resume; an unfinished start run is named in a warning. Identities of fake run
folders check reward ensembles, retrained runs and gone folders without training."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from helpers import TWO_STEPS, cpu_environment, finished_checkpoints, tiny_sft_run
from test_dpo import dpo_argv
from test_reward import write_preferences

from jaxllm import run_inputs
from jaxllm.cli import main as cli_main
from jaxllm.config import load_config
from jaxllm.run_inputs import current_inputs, input_differences, unfinished_runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two different finished SFT runs, and one stopped at step 2 of its train.steps=4 (a
    copy whose config.yaml asks for 4 steps: what a run killed after step 2 leaves)."""
    root = tmp_path_factory.mktemp("inputs")
    tiny_sft_run(root / "sft")
    tiny_sft_run(root / "other_sft", "train.seed=1")
    shutil.copytree(root / "sft", root / "unfinished")
    config = root / "unfinished" / "config.yaml"
    values = yaml.safe_load(config.read_text())
    values["train"]["steps"] = 4
    config.write_text(yaml.safe_dump(values))
    return root


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(out_dir) -> dict:
    """Every file under `out_dir` -> its bytes."""
    return {str(p.relative_to(out_dir)): p.read_bytes() for p in out_dir.rglob("*") if p.is_file()}


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_a_dpo_resume_on_other_data_is_refused_unless_allowed_and_then_recorded(
    runs, tmp_path, capsys
):
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    write_preferences(first, 40, False)
    write_preferences(second, 40, False, seed=1)
    out_dir = tmp_path / "dpo"
    steps = TWO_STEPS
    assert cli_main(dpo_argv(runs / "sft", first, out_dir, *steps)) == 0
    record = json.loads((out_dir / "inputs.json").read_text())
    assert record["recorded_at_step"] == 0 and "changes" not in record
    assert record["inputs"]["data.path"]["content"] == {"sha256": sha256(first)}
    assert record["inputs"]["dpo.policy_from"] == [
        {
            "path": str((runs / "sft").resolve()),
            "step": 2,
            "run_id": json.loads((runs / "sft" / "inputs.json").read_text())["run_id"],
        }
    ]
    assert record["inputs"]["data.eval_path"] is None
    assert "ppo.reward_from" not in record["inputs"]  # another stage's setting
    before = snapshot(out_dir)
    capsys.readouterr()

    # Another file: refused, one line naming it and the way out; nothing written.
    assert cli_main(dpo_argv(runs / "sft", second, out_dir, *steps, "train.steps=4")) == 2
    errors = error_lines(capsys)
    assert errors == [
        f"error: {out_dir} holds a run started on other inputs (data.path: {first} -> {second}); "
        "use another out_dir, or set resume.allow_changed_inputs=true to go on with these (the "
        f"change is added to {out_dir / 'inputs.json'})"
    ]
    assert snapshot(out_dir) == before

    # The same file with other content: refused, naming both hashes.
    original = first.read_bytes()
    write_preferences(first, 40, False, seed=2)
    assert cli_main(dpo_argv(runs / "sft", first, out_dir, *steps, "train.steps=4")) == 2
    (error,) = error_lines(capsys)
    changed = f"sha256 {record['inputs']['data.path']['content']['sha256'][:8]}.. -> sha256 "
    assert f"(data.path: content changed ({changed}{sha256(first)[:8]}..)); use" in error
    assert snapshot(out_dir) == before

    # Another start run: refused, naming both runs and their steps.
    first.write_bytes(original)
    assert cli_main(dpo_argv(runs / "other_sft", first, out_dir, *steps, "train.steps=4")) == 2
    (error,) = error_lines(capsys)
    sft, other_sft = (runs / "sft").resolve(), (runs / "other_sft").resolve()
    assert f"(dpo.policy_from: {sft} (step 2) -> {other_sft} (step 2)); use" in error
    assert snapshot(out_dir) == before

    # The same inputs (the file's bytes back as they were): resumes.
    assert cli_main(dpo_argv(runs / "sft", first, out_dir, *steps, "train.steps=4")) == 0
    assert finished_checkpoints(out_dir) == [2, 4]
    assert json.loads((out_dir / "inputs.json").read_text()) == record

    # Allowed: goes on, says so, and the record keeps the change with its step.
    allowed = [*steps, "train.steps=6", "resume.allow_changed_inputs=true"]
    capsys.readouterr()
    assert cli_main(dpo_argv(runs / "sft", second, out_dir, *allowed)) == 0
    warnings = [line for line in error_lines(capsys) if line.startswith("warning:")]
    assert warnings == [
        f"warning: resuming {out_dir} at step 4 with changed inputs (data.path: {first} -> "
        f"{second}), as resume.allow_changed_inputs=true; recorded in {out_dir / 'inputs.json'}"
    ]
    changed_record = json.loads((out_dir / "inputs.json").read_text())
    assert (
        changed_record["inputs"] == record["inputs"]
        and changed_record["run_id"] == record["run_id"]
    )
    (change,) = changed_record["changes"]
    assert change["step"] == 4 and change["differences"] == [f"data.path: {first} -> {second}"]
    assert change["inputs"]["data.path"]["content"] == {"sha256": sha256(second)}
    assert f"path: {second}" in (out_dir / "config.yaml").read_text()

    # From then on the changed inputs are the run's: the second file is no change, the first is.
    assert cli_main(dpo_argv(runs / "sft", second, out_dir, *steps, "train.steps=6")) == 0
    assert cli_main(dpo_argv(runs / "sft", first, out_dir, *steps, "train.steps=6")) == 2
    assert f"(data.path: {second} -> {first}); use" in error_lines(capsys)[-1]
    assert finished_checkpoints(out_dir) == [2, 4, 6]


def warnings_of_run(argv: list[str]) -> list[str]:
    """The warning lines of a CLI run in its own process (in-process, this test's DPO runs
    twice ended in an XLA abort in an eager metric op on the loaded 2-core CI box)."""
    done = subprocess.run(
        [sys.executable, "-m", "jaxllm.cli", *argv],
        env=cpu_environment(1),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return [line for line in done.stderr.splitlines() if line.startswith("warning:")]


def test_an_unfinished_start_run_is_named_in_a_warning(runs, tmp_path):
    data = tmp_path / "prefs.jsonl"
    write_preferences(data, 40, False)
    warnings = warnings_of_run(dpo_argv(runs / "unfinished", data, tmp_path / "dpo", *TWO_STEPS))
    assert warnings == [
        f"warning: dpo.policy_from={(runs / 'unfinished').resolve()} is unfinished (its newest "
        "checkpoint is step 2 of train.steps=4); this run starts from step 2"
    ]
    assert not warnings_of_run(dpo_argv(runs / "sft", data, tmp_path / "finished", *TWO_STEPS))


def fake_run(folder, step: int, steps: int, run_id: str | None) -> str:
    """A run folder as a training run leaves it: config.yaml, run.json, a checkpoint folder
    at `step` (and a half-written later one), inputs.json with `run_id`."""
    (folder / "checkpoints" / str(step)).mkdir(parents=True)
    (folder / "checkpoints" / f"{step + 1}.orbax-checkpoint-tmp-1").mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump({"train": {"steps": steps}}))
    (folder / "run.json").write_text('{"stage": "reward"}\n')
    if run_id is not None:
        (folder / "inputs.json").write_text(json.dumps({"run_id": run_id}))
    return str(folder.resolve())


def ppo_inputs(reward_from: str, tmp_path) -> dict:
    cfg = load_config(
        None,
        [f"ppo.reward_from={reward_from}", f"ppo.policy_from={tmp_path / 'sft'}"],
        check=False,
    )
    return current_inputs(cfg, "ppo")


def test_reward_ensembles_retrained_runs_and_gone_folders(tmp_path):
    a = fake_run(tmp_path / "a", 10, 10, "run-a")
    b = fake_run(tmp_path / "b", 6, 10, "run-b")
    sft = fake_run(tmp_path / "sft", 2, 2, None)  # a run of an earlier version: no record
    started = ppo_inputs(f"{a},{b}", tmp_path)
    assert started["ppo.reward_from"] == [
        {"path": a, "step": 10, "run_id": "run-a"},
        {"path": b, "step": 6, "run_id": "run-b", "unfinished_of": 10},
    ]
    assert started["ppo.policy_from"] == [{"path": sft, "step": 2}]
    assert "grpo.reward_from" not in started and "dpo.policy_from" not in started
    assert unfinished_runs(started) == [
        f"warning: ppo.reward_from={b} is unfinished (its newest checkpoint is step 6 of "
        "train.steps=10); this run starts from step 6"
    ]
    assert input_differences(started, ppo_inputs(f"{a},{b}", tmp_path)) == {}
    assert input_differences(started, ppo_inputs(a, tmp_path)) == {
        "ppo.reward_from": f"ppo.reward_from: {a} (step 10),{b} (step 6) -> {a} (step 10)"
    }
    (tmp_path / "a" / "checkpoints" / "12").mkdir()
    shutil.rmtree(tmp_path / "b")
    fake_run(tmp_path / "b", 6, 10, "run-b2")  # retrained in the same folder, to the same step
    assert input_differences(started, ppo_inputs(f"{a},{b}", tmp_path)) == {
        "ppo.reward_from": f"ppo.reward_from: {a} is now at step 12 (this run read step 10), "
        f"{b} holds another run than the one this run read (retrained)"
    }
    (tmp_path / "sft" / "checkpoints" / "3").mkdir()  # without a record: by path and step
    assert input_differences(started, ppo_inputs(f"{a},{b}", tmp_path))["ppo.policy_from"] == (
        f"ppo.policy_from: {sft} is now at step 3 (this run read step 2)"
    )
    for gone in ("a", "b", "sft"):  # all gone: the record is enough to resume
        shutil.rmtree(tmp_path / gone)
    assert input_differences(started, ppo_inputs(f"{a},{b}", tmp_path)) == {}
    assert input_differences(started, ppo_inputs(f"{b},{a}", tmp_path)) == {
        "ppo.reward_from": f"ppo.reward_from: {a} (step 10),{b} (step 6) -> {b},{a}"
    }


def test_data_is_known_by_its_content_and_a_folder_by_each_file(tmp_path, monkeypatch):
    def inputs(path, tokenizer="bytes") -> dict:
        overrides = [f"data.path={path}", f"data.tokenizer={tokenizer}"]
        return current_inputs(load_config(None, overrides, check=False), "pretrain")

    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    for name, text in (("a.txt", "one"), ("b.txt", "two"), ("sub/c.txt", "three")):
        (folder / name).write_text(text)
    started = inputs(folder)
    assert started["data.path"]["content"] == {
        "files": {
            name: {"sha256": sha256(folder / name)} for name in ("a.txt", "b.txt", "sub/c.txt")
        }
    }
    assert started["data.tokenizer"] == {"value": "bytes", "path": "bytes"}  # a name, no file
    assert list(started) == [
        "lora.init_from",
        "data.path",
        "data.eval_path",
        "data.tokenizer",
        "chat.template",
    ]
    shutil.copytree(folder, tmp_path / "copy")
    assert input_differences(started, inputs(tmp_path / "copy")) == {}  # the same files moved
    assert input_differences(started, inputs(folder, "gpt2")) == {
        "data.tokenizer": "data.tokenizer: bytes -> gpt2"
    }
    (folder / "b.txt").write_text("TWO")
    (folder / "sub" / "d.txt").write_text("four")
    assert input_differences(started, inputs(folder)) == {
        "data.path": f"data.path: content changed (b.txt, sub/d.txt in {folder})"
    }
    monkeypatch.setattr(run_inputs, "HASHED_BYTES", 4)  # past it: size and modification time
    big = inputs(tmp_path / "copy" / "sub" / "c.txt")
    modified = (tmp_path / "copy" / "sub" / "c.txt").stat().st_mtime_ns
    assert big["data.path"]["content"] == {"size": 5, "mtime_ns": modified}
    os.utime(tmp_path / "copy" / "sub" / "c.txt", ns=(0, 0))
    assert input_differences(big, inputs(tmp_path / "copy" / "sub" / "c.txt")) == {
        "data.path": f"data.path: content changed (5 bytes, modified at {modified / 1e9:.0f} s -> "
        "5 bytes, modified at 0 s)"
    }


def test_built_in_names_are_never_read_as_the_files_of_the_same_name(tmp_path, monkeypatch):
    """Run from the repository root, `chat.template: jaxllm` named the `jaxllm/` package
    folder, so every library edit made a resume refuse 'changed inputs'."""
    monkeypatch.chdir(tmp_path)
    for name in ("jaxllm", "builtin", "bytes", "calculator"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "file.py").write_text("x = 1\n")
    cfg = load_config(None, ["data.path=builtin", "data.tokenizer=bytes", "chat.template=jaxllm"])
    inputs = current_inputs(cfg, "sft")
    for key, value in (("data.path", "builtin"), ("data.tokenizer", "bytes"),
                       ("chat.template", "jaxllm")):  # fmt: skip
        assert inputs[key] == {"value": value, "path": value}
    tool_task = current_inputs(load_config(None, ["data.path=calculator"]), "sft")["data.path"]
    assert tool_task == {"value": "calculator", "path": "calculator"}
    mine = load_config(None, [f"data.path={tmp_path / 'builtin'}"])
    assert "content" in current_inputs(mine, "sft")["data.path"]  # a real folder is read


def test_only_a_new_modification_time_of_an_unhashed_file_is_told_apart():
    from jaxllm.run_inputs import only_touched

    big = {"path": "/d/corpus.txt", "content": {"size": 10, "mtime_ns": 1}}
    touched = {"path": "/d/corpus.txt", "content": {"size": 10, "mtime_ns": 2}}
    grown = {"path": "/d/corpus.txt", "content": {"size": 11, "mtime_ns": 2}}
    hashed = {"path": "/d/corpus.txt", "content": {"sha256": "a"}}
    rehashed = {"path": "/d/corpus.txt", "content": {"sha256": "b"}}
    folder = {"path": "/d", "content": {"files": {"a": {"size": 3, "mtime_ns": 1}}}}
    copied = {"path": "/d", "content": {"files": {"a": {"size": 3, "mtime_ns": 9}}}}
    renamed = {"path": "/d", "content": {"files": {"b": {"size": 3, "mtime_ns": 9}}}}
    assert only_touched(big, touched) and only_touched(folder, copied)
    assert not only_touched(big, grown) and not only_touched(hashed, rehashed)
    assert not only_touched(folder, renamed) and not only_touched(big, big)
    assert not only_touched(None, touched)
