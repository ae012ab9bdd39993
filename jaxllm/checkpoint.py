"""Orbax checkpoints of the whole TrainState, plus JSON metadata (the step; import-hf: where
the params came from).

Layout: `<directory>/<step>/state` (the TrainState pytree, sharded arrays written by every
process) and `<directory>/<step>/meta` (JSON). Orbax writes each step into a temporary
folder and renames it when complete, so a crash mid-save never leaves a checkpoint that
looks complete; `latest_step` only sees finished ones.

A restore without a step reads the newest checkpoint that reads back whole; a newer one
that does not (a file deleted or truncated, an empty step folder) is skipped and recorded
in `unreadable`, never deleted. A training run then moves it aside to
`<step>.unreadable`, so that step can be saved again.

Restores take an abstract target (ShapeDtypeStructs with shardings), so a checkpoint saved
on one mesh restores onto any other. `restore_params` reads only the params subtree into a
new stage's params, keeping whatever the new stage has that the checkpoint lacks (a fresh
value head, say).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxllm.errors import ConfigError, UserError, quiet_abandoned_reads
from jaxllm.model import Params
from jaxllm.quant import as_dicts, like_quantized
from jaxllm.state import TrainState

Restored = TypeVar("Restored")


def _restore_args(abstract_tree: Any) -> Any:
    return ocp.checkpoint_utils.construct_restore_args(abstract_tree)


def _reason(error: Exception) -> str:
    """Why a checkpoint did not read back, in one short line (tensorstore's run to 2,000
    characters over several lines)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")


def _storage_errno(text: str) -> int | None:
    """The OS error number TensorStore names in a failed write's message (a full disk, a
    file-size limit), or None."""
    found = _OS_ERROR_CODE.search(text)
    return int(found.group(1)) if found else None


class _DropStorageTracebacks(logging.Filter):
    """Orbax logs each background save thread's failure with its traceback before the
    save raises; the raised error says it once (`_storage_errors`), so drop those."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return _storage_errno(f"{record.getMessage()} {error}") is None


@contextlib.contextmanager
def _storage_errors(directory: Path):
    """A TensorStore write that failed for lack of space (or past a file-size limit) as the
    OSError it was, naming the checkpoint folder."""
    try:
        yield
    except (ValueError, RuntimeError) as error:
        number = _storage_errno(str(error))
        if number is None:
            raise
        raise OSError(number, os.strerror(number), str(directory)) from None


class Checkpointer:
    """Save and restore TrainStates under `directory`, keeping the newest `keep`."""

    def __init__(
        self,
        directory: str | Path,
        keep: int = 3,
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = Path(directory).absolute()
        quiet_abandoned_reads()  # a failed read's or write's callbacks can come first
        absl_log = logging.getLogger("absl")
        if not any(isinstance(f, _DropStorageTracebacks) for f in absl_log.filters):
            absl_log.addFilter(_DropStorageTracebacks())
        self.unreadable: dict[int, str] = {}  # step -> why, for steps the last restore skipped
        self.restored_step: int | None = None  # the step the last restore read
        self.manager = ocp.CheckpointManager(
            self.directory,
            # Read-only: nothing created, nothing ever garbage-collected; Orbax's own
            # read_only flag adds only two warning lines to every `generate`.
            options=ocp.CheckpointManagerOptions(
                max_to_keep=None if read_only else keep,
                create=not read_only,
                enable_async_checkpointing=async_save,
            ),
            item_handlers={
                "state": ocp.PyTreeCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def save(self, state: TrainState, meta: dict[str, Any] | None = None):
        """Start saving `state` at its step (asynchronously when enabled), whatever the
        manager's save interval."""
        step = int(jax.device_get(state.step))
        with _storage_errors(self.directory):  # an earlier asynchronous save's failure too
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta or {})
                ),
                force=True,
            )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def refuse_other_state_parts(self, abstract_state: TrainState) -> None:
        """Raise a UserError when the newest checkpoint holds other optional parts than
        `abstract_state` (its `extras`: a frozen reference, a KL coefficient, reward models,
        a critic):
        the run was started with settings that decide them otherwise, and would otherwise
        read back as unreadable at every step. A step whose metadata cannot be read is left
        to `restore`, which says why."""
        try:
            saved = dict(self.manager.item_metadata(self.latest_step())["state"].items())
        except Exception:  # any unreadable metadata: restore says why
            return
        legacy = sorted(set(saved) - {"step", "params", "opt_state", "rng", "extras"})
        if legacy:
            raise UserError(
                f"{self.directory.parent} holds a checkpoint of an earlier jaxllm (its state keeps "
                f"{', '.join(legacy)} outside `extras`), which this version cannot resume; finish "
                "it with the version that started it, or start a new out_dir from it (its params "
                "still load through *.init_from / *.policy_from)"
            )
        held = sorted(saved.get("extras") or {})
        wanted = sorted(abstract_state.extras)
        if held != wanted:
            raise UserError(
                f"{self.directory.parent} holds a run whose state keeps "
                f"[{', '.join(held)}] but these settings keep [{', '.join(wanted)}]: a setting "
                "that decides them changed (dpo.loss to or from simpo/orpo, grpo.beta to or "
                "from 0, ppo.critic, the reward models); resume with the settings in its "
                "config.yaml, or use a new out_dir"
            )

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON meta saved with the checkpoint at `step` (no arrays are read)."""
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        return self.manager.restore(step, args=args)["meta"]

    def restore(
        self, abstract_state: TrainState, step: int | None = None
    ) -> tuple[TrainState, dict[str, Any]]:
        """The state at `step` (default: the newest that reads back whole) laid out as
        `abstract_state` says, and its meta."""

        def read(step: int) -> tuple[TrainState, dict[str, Any]]:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item=abstract_state, restore_args=_restore_args(abstract_state)
                    ),
                    meta=ocp.args.JsonRestore(),
                ),
            )
            return restored["state"], restored["meta"]

        return self._newest_readable(read, step)

    def restore_params(
        self,
        abstract_params: Params,
        fresh_params: Params | None = None,
        step: int | None = None,
    ) -> Params:
        """Params from a checkpoint, merged into `fresh_params`.

        Every leaf of the checkpoint's params must exist in the target with the same shape;
        leaves only the target has (a new scalar head) keep their fresh values. Without
        `fresh_params` the checkpoint must hold every leaf of `abstract_params`.
        """
        return self._newest_readable(
            lambda step: self._read_params(step, abstract_params, fresh_params), step
        )

    def _read_params(
        self, step: int, abstract_params: Params, fresh_params: Params | None
    ) -> Params:
        quantized = abstract_params
        # Orbax's metadata names a saved QArray's parts as a dict's (`jaxllm.quant`).
        abstract_params = as_dicts(abstract_params)
        saved = self.manager.item_metadata(step)["state"]["params"]
        saved_paths = {path: leaf for path, leaf in jax.tree_util.tree_leaves_with_path(saved)}
        target_paths = dict(jax.tree_util.tree_leaves_with_path(abstract_params))
        for path, leaf in saved_paths.items():
            name = jax.tree_util.keystr(path)
            if path not in target_paths:
                raise ConfigError(
                    f"checkpoint param {name} has no place in the new model; the model "
                    "config must match the checkpoint's (only new heads may be added)"
                )
            if tuple(leaf.shape) != tuple(target_paths[path].shape):
                raise ConfigError(
                    f"checkpoint param {name} has shape {tuple(leaf.shape)} but the new model "
                    f"expects {tuple(target_paths[path].shape)}; use the checkpoint's model config"
                )
        subset = _subtree_at(abstract_params, set(saved_paths))
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={"params": subset},
                    restore_args={"params": _restore_args(subset)},
                    partial_restore=True,
                )
            ),
        )["state"]["params"]
        if fresh_params is None:
            missing = set(target_paths) - set(saved_paths)
            if missing:
                names = ", ".join(sorted(jax.tree_util.keystr(p) for p in missing))
                raise ConfigError(f"checkpoint has no {names}; the model config adds them")
            return like_quantized(restored, quantized)
        return like_quantized(_overlay(fresh_params, restored), quantized)

    def wait(self) -> None:
        """Block until any asynchronous save has been committed."""
        with _storage_errors(self.directory):
            self.manager.wait_until_finished()

    def close(self) -> None:
        with _storage_errors(self.directory):
            self.manager.wait_until_finished()
        self.manager.close()

    def _newest_readable(self, read: Callable[[int], Restored], step: int | None) -> Restored:
        """`read(step)`, or without a step `read` of the newest step that reads back whole;
        the steps skipped on the way, and why, go to `self.unreadable`."""
        if step is not None and step not in self.all_steps():
            raise FileNotFoundError(f"no complete checkpoint at step {step} in {self.directory}")
        steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        self.unreadable = {}
        for candidate in steps:
            try:
                restored = read(candidate)
            except UserError:
                raise
            except Exception as error:  # Orbax and tensorstore raise many kinds on bad files
                self.unreadable[candidate] = _reason(error)
            else:
                self.restored_step = candidate
                return restored
        raise UserError(
            f"no checkpoint in {self.directory} reads back whole ("
            + "; ".join(f"step {s}: {why}" for s, why in self.unreadable.items())
            + "); restore the folder from a copy or start again in a new out_dir"
        )

    def set_aside_unreadable(self) -> None:
        """Move each checkpoint the last restore skipped to `<step>.unreadable` (kept for a
        look, never deleted; Orbax ignores the name) so the run can save that step again,
        and say so in one line each."""
        if jax.process_index() == 0:
            for step, why in self.unreadable.items():
                aside = self.directory / f"{step}.unreadable"
                copies = 1
                while aside.exists():
                    copies += 1
                    aside = self.directory / f"{step}.unreadable{copies}"
                (self.directory / str(step)).rename(aside)
                print(
                    f"warning: checkpoint {self.directory / str(step)} does not read back whole "
                    f"({why}); moved it to {aside.name} and resumed from step {self.restored_step}",
                    file=sys.stderr,
                )
        if self.unreadable:
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("jaxllm: unreadable checkpoints set aside")
            self.manager.reload()
            self.unreadable = {}


def load_run_params(
    run_dir: str | Path,
    abstract_params: Params,
    fresh_params: Params | None = None,
    from_key: str = "--checkpoint",
) -> Params:
    """The newest params of the run in `run_dir`, laid out as `abstract_params` (with
    shardings) says; merged into `fresh_params` when given (heads the run lacks stay fresh).

    Reads only: nothing is created or changed in `run_dir`. `from_key` names the setting
    that pointed here, for the error message.
    """
    checkpoints = Path(run_dir) / "checkpoints"
    if not checkpoints.is_dir():
        raise ConfigError(
            f"{from_key}={run_dir} has no checkpoints/ folder; point it at the out_dir of a "
            "finished run"
        )
    checkpointer = Checkpointer(checkpoints, read_only=True)
    try:
        if not checkpointer.all_steps():
            raise ConfigError(
                f"{from_key}={run_dir} holds no complete checkpoint; let the run save one "
                "(checkpoint.every, or its end) and try again"
            )
        params = checkpointer.restore_params(abstract_params, fresh_params)
    finally:
        checkpointer.close()
    if jax.process_index() == 0:
        for step, why in checkpointer.unreadable.items():
            print(
                f"warning: checkpoint {checkpoints / str(step)} does not read back whole ({why}); "
                f"using step {checkpointer.restored_step}",
                file=sys.stderr,
            )
    return params


def _subtree_at(tree: dict, keep_paths: set) -> dict:
    """The nested dict `tree` pruned to the leaves whose paths are in `keep_paths`."""
    pruned: dict = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if path in keep_paths:
            node = pruned
            for key in path[:-1]:
                node = node.setdefault(key.key, {})
            node[path[-1].key] = leaf
    return pruned


def _overlay(base: dict, top: dict) -> dict:
    """`base` with every leaf that `top` also has replaced by `top`'s."""
    return {
        key: (_overlay(value, top[key]) if isinstance(value, dict) else top[key])
        if key in top
        else value
        for key, value in base.items()
    }
