"""What a run was started from and on, recorded once, and checked whenever it resumes.

A run's inputs are the settings that name something outside its config (`INPUT_KEYS`):
other runs (each stage's start key, PPO/GRPO's `reward_from`, `lora.init_from`) and files
(`data.path`, `data.eval_path`, `data.tokenizer`, `chat.template`). When a run first
starts, `out_dir/inputs.json` records each one's identity:

- a run: its resolved path, the newest complete checkpoint step it was read at (a folder
  `checkpoints/<step>` that Orbax has renamed into place), and the `run_id` its own
  inputs.json gave it, where it has one; so "the same run" is the same run_id at the same
  step, or for a run without a record the same path at the same step;
- a file: its sha256 (a folder: every file under it, or the top-level ones for the
  tokenizer), or size and modification time when over `HASHED_BYTES`;
- anything else (`builtin`, `bytes`, `hf:NAME`, a chat template's name): the value as is.

A resumed run (one with a checkpoint) compares its settings' identities with the record
and is refused, in one line naming each difference, before anything is written or
restored; `resume.allow_changed_inputs=true` goes on and adds the change, with its step,
to the record. An input that is gone (a start run's folder deleted after the run started)
is not a change: a resumed run needs none of its start runs (its checkpoint holds what
they gave, its config.yaml and PPO's reward_model.json the rest). A start run read while
unfinished (a training run whose newest checkpoint is below its own `train.steps`) is
named in a warning line, whichever setting names it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from jaxllm.config import Config, TrainConfig, read_run_values
from jaxllm.data.builtin_chat import NAME as BUILTIN_TASKS
from jaxllm.data.corpus import PYDOC
from jaxllm.data.tool_task import NAME as CALCULATOR_TASK
from jaxllm.errors import UserError
from jaxllm.stages.registry import STAGES

RECORD_FILE = "inputs.json"
RUN_FILE = "run.json"  # {"stage": name}: which stage made the run in an out_dir
HASHED_BYTES = 64 * 2**20  # a file (or a folder's files together) up to this is hashed
SHARED_SECTIONS = ("data", "chat", "lora")  # sections every stage reads
# Setting -> which files under a folder it names are read ("**/*": all; "*": top level).
FILE_KEYS = {
    "data.path": "**/*",
    "data.eval_path": "**/*",
    "data.tokenizer": "*",
    "chat.template": "*",
}
OTHER_RUN_KEYS = ("ppo.reward_from", "grpo.reward_from", "lora.init_from")


def run_keys() -> tuple[str, ...]:
    """The settings that name other runs: every registered stage's start key and inputs
    (a stage registered later counts too), and `OTHER_RUN_KEYS`."""
    keys = [spec.start_key for spec in STAGES.values() if spec.start_key]
    keys += [key for spec in STAGES.values() for key in spec.inputs]
    return tuple(dict.fromkeys([*keys, *OTHER_RUN_KEYS]))


def input_keys(stage: str) -> list[str]:
    """The input settings the stage `stage` reads: those of its own section and the
    shared ones."""
    spec = STAGES.get(stage)
    sections = {*SHARED_SECTIONS, *([spec.section] if spec and spec.section else [])}
    return [key for key in (*run_keys(), *FILE_KEYS) if key.split(".")[0] in sections]


def newest_step(run_dir: Path) -> int | None:
    """The newest complete checkpoint step of the run in `run_dir`, or None."""
    folder = run_dir / "checkpoints"
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
    return max(steps, default=None)


def run_identity(value: str) -> dict[str, Any]:
    """One run named by a setting: its path, and (while its folder is there) the step it
    would be read at, its run_id and whether it is a training run stopped before its own
    `train.steps` (`unfinished_of`: those steps)."""
    path = Path(value).resolve()
    identity: dict[str, Any] = {"path": str(path)}
    step = newest_step(path) if path.is_dir() else None
    if step is None:
        return identity
    identity["step"] = step
    record = read_record(path / RECORD_FILE)
    if "run_id" in record:
        identity["run_id"] = record["run_id"]
    if (path / RUN_FILE).is_file() and (path / "config.yaml").is_file():
        steps = (read_run_values(path / "config.yaml").get("train") or {}).get("steps")
        steps = steps if isinstance(steps, int) else TrainConfig.steps
        if step < steps:
            identity["unfinished_of"] = steps
    return identity


def builtin_names(key: str) -> tuple[str, ...]:
    """The values of file setting `key` that name something built in, never a file, even
    where a file or folder of that name lies in the working directory (the repository
    root holds a `jaxllm/` folder, and `chat.template: jaxllm` is not it)."""
    import tiktoken

    from jaxllm.chat_templates import CHAT_TEMPLATES, MODEL_TEMPLATE

    return {
        "data.path": (BUILTIN_TASKS, PYDOC, CALCULATOR_TASK),
        "data.eval_path": (BUILTIN_TASKS, PYDOC, CALCULATOR_TASK),
        "data.tokenizer": ("bytes", *tiktoken.list_encoding_names()),
        "chat.template": (*CHAT_TEMPLATES, MODEL_TEMPLATE),
    }.get(key, ())


def file_identity(value: str, pattern: str, key: str = "") -> dict[str, Any]:
    """A file setting's value, its absolute path and, where it names a file or folder, its
    `content`: {"sha256"}, {"size", "mtime_ns"} or {"files": {relative path: either}}.
    A built-in name of `key` (`builtin_names`) or a Hugging Face dataset (`hf:...`) is its
    value alone."""
    if value in builtin_names(key) or value.startswith("hf:"):
        return {"value": value, "path": value}
    path = Path(value).absolute()
    identity: dict[str, Any] = {"value": value, "path": str(path)}
    if path.is_file():
        identity["content"] = _file_content(path, path.stat().st_size <= HASHED_BYTES)
    elif path.is_dir():
        files = sorted(p for p in path.glob(pattern) if p.is_file())
        hashed = sum(p.stat().st_size for p in files) <= HASHED_BYTES
        identity["content"] = {
            "files": {str(p.relative_to(path)): _file_content(p, hashed) for p in files}
        }
    return identity


def _file_content(path: Path, hashed: bool) -> dict[str, Any]:
    if not hashed:
        stat = path.stat()
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    return {"sha256": digest.hexdigest()}


def current_inputs(cfg: Config, stage: str) -> dict[str, Any]:
    """Setting -> the identity of what it names now (None when unset), for `stage`'s input
    settings; a run setting's value is a list (an ensemble names several, comma-separated)."""
    structured = OmegaConf.structured(cfg)
    inputs: dict[str, Any] = {}
    for key in input_keys(stage):
        value = OmegaConf.select(structured, key)
        if value is None or value == "":
            inputs[key] = None
        elif key in FILE_KEYS:
            inputs[key] = file_identity(str(value), FILE_KEYS[key], key)
        else:
            runs = [part.strip() for part in str(value).split(",") if part.strip()]
            inputs[key] = [run_identity(run) for run in runs]
    return inputs


def unfinished_runs(inputs: dict[str, Any]) -> list[str]:
    """One warning line per start run in `inputs` read before it finished."""
    return [
        f"warning: {key}={run['path']} is unfinished (its newest checkpoint is step "
        f"{run['step']} of train.steps={run['unfinished_of']}); this run starts from step "
        f"{run['step']}"
        for key, runs in inputs.items()
        if key not in FILE_KEYS and runs
        for run in runs
        if "unfinished_of" in run
    ]


def _same_run(old: dict, new: dict) -> bool:
    if "step" not in new or "step" not in old:  # a folder gone: the path is all there is
        return old["path"] == new["path"]
    if "run_id" in old and "run_id" in new:
        return (old["run_id"], old["step"]) == (new["run_id"], new["step"])
    return (old["path"], old["step"]) == (new["path"], new["step"])


def _run_text(run: dict) -> str:
    return run["path"] + (f" (step {run['step']})" if "step" in run else "")


def _run_difference(key: str, old: list[dict], new: list[dict]) -> str | None:
    if len(old) == len(new) and all(map(_same_run, old, new)):
        return None
    if [run["path"] for run in old] == [run["path"] for run in new]:
        changed = [(a, b) for a, b in zip(old, new, strict=True) if not _same_run(a, b)]
        return f"{key}: " + ", ".join(
            f"{a['path']} is now at step {b['step']} (this run read step {a['step']})"
            if a["step"] != b["step"]
            else f"{a['path']} holds another run than the one this run read (retrained)"
            for a, b in changed
        )
    return f"{key}: {','.join(map(_run_text, old))} -> {','.join(map(_run_text, new))}"


def _content_text(content: dict) -> str:
    if "sha256" in content:
        return f"sha256 {content['sha256'][:8]}.."
    return f"{content['size']} bytes, modified at {content['mtime_ns'] / 1e9:.0f} s"


def _file_difference(key: str, old: dict, new: dict) -> str | None:
    if "content" in old and "content" in new:
        if old["content"] == new["content"]:
            return None
        if old["path"] != new["path"]:  # the paths, where one value names both from two folders
            name = "value" if old["value"] != new["value"] else "path"
            return f"{key}: {old[name]} -> {new[name]}"
        before, after = old["content"], new["content"]
        if "files" in before and "files" in after:
            before, after = before["files"], after["files"]
            names = sorted(n for n in {*before, *after} if before.get(n) != after.get(n))
            listed = ", ".join(names[:3]) + (
                f" and {len(names) - 3} more" if len(names) > 3 else ""
            )
            return f"{key}: content changed ({listed} in {new['value']})"
        if "files" in before or "files" in after:
            return f"{key}: {new['value']} is now a {'file' if 'files' in before else 'folder'}"
        return f"{key}: content changed ({_content_text(before)} -> {_content_text(after)})"
    if ("content" in old) != ("content" in new) and old["path"] == new["path"]:
        return None  # the file is gone (or was a name that is now a file): not another one
    return None if old["value"] == new["value"] else f"{key}: {old['value']} -> {new['value']}"


def only_touched(old: dict | None, new: dict | None) -> bool:
    """Whether two identities of a file setting differ only in modification times: the
    same path, too large to hash, every file of the same size (copied again, or touched)."""
    if not (old and new) or not isinstance(old, dict) or old.get("path") != new.get("path"):
        return False
    before, after = old.get("content"), new.get("content")
    if not before or not after or before == after:
        return False
    before, after = before.get("files", {"": before}), after.get("files", {"": after})
    return before.keys() == after.keys() and all(
        "size" in before[name] and before[name]["size"] == after[name].get("size")
        for name in before
    )


def input_differences(recorded: dict[str, Any], current: dict[str, Any]) -> dict[str, str]:
    """Setting -> a `key: before -> now` line, for each input of `current` whose identity
    differs from the one `recorded` (settings the record lacks are not compared)."""
    lines = {}
    for key, new in current.items():
        if key not in recorded:
            continue
        old = recorded[key]
        if old is None or new is None:
            line = None if old == new else f"{key}: {_shown(old)} -> {_shown(new)}"
        elif key in FILE_KEYS:
            line = _file_difference(key, old, new)
        else:
            line = _run_difference(key, old, new)
        if line is not None:
            lines[key] = line
    return lines


def _shown(identity: Any) -> str:
    if identity is None:
        return "unset"
    if isinstance(identity, list):
        return ",".join(map(_run_text, identity))
    return identity["value"]


def read_record(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def recorded_inputs(record: dict[str, Any]) -> dict[str, Any]:
    """The inputs a record says the run reads now: those it started on, with each change
    recorded since laid over them."""
    inputs = dict(record.get("inputs") or {})
    for change in record.get("changes") or []:
        inputs.update(change.get("inputs") or {})
    return inputs


def changed_inputs(cfg: Config, current: dict[str, Any]) -> dict[str, Any]:
    """For a run resumed in `cfg.out_dir`: the inputs of `current` that differ from its
    record (empty without a record, a run of an earlier version). Refuses them with one
    line naming each difference, unless `resume.allow_changed_inputs`."""
    record = read_record(Path(cfg.out_dir) / RECORD_FILE)
    lines = input_differences(recorded_inputs(record), current)
    if lines and not cfg.resume.allow_changed_inputs:
        raise UserError(
            f"{cfg.out_dir} holds a run started on other inputs ("
            + "; ".join(lines.values())
            + "); use another out_dir, or set resume.allow_changed_inputs=true to go on with "
            f"these (the change is added to {Path(cfg.out_dir) / RECORD_FILE})"
        )
    if not lines:
        return {}
    return {"differences": list(lines.values()), "inputs": {key: current[key] for key in lines}}


def write_record(out_dir: Path, current: dict[str, Any], step: int, change: dict | None) -> None:
    """Record `current` as the inputs of a new run in `out_dir` (`change` None; a new
    run_id), or, for a run resumed at `step`, add `change` (from `changed_inputs`) to its
    record, saying so in a warning line; a resumed run of an earlier version, without a
    record, gets one from `step`."""
    path = out_dir / RECORD_FILE
    record = read_record(path) if change is not None else {}
    if "run_id" not in record:
        record = {"run_id": uuid.uuid4().hex, "recorded_at_step": step, "inputs": current}
    elif change:
        record.setdefault("changes", []).append({"step": step, **change})
        print(
            f"warning: resuming {out_dir} at step {step} with changed inputs ("
            + "; ".join(change["differences"])
            + f"), as resume.allow_changed_inputs=true; recorded in {path}",
            file=sys.stderr,
            flush=True,
        )
    else:
        return
    partial = path.with_name(f".{RECORD_FILE}.{os.getpid()}")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(partial, path)
