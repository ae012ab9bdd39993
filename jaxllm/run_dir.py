"""A training run's out_dir: its layout checked before anything is written into it, and an
exclusive lock so that two runs never write into the same one.

The lock is `flock` on the out_dir folder itself, so no lock file is left behind, and the
kernel drops it when the process ends however it ends: a run killed with kill -9 leaves no
stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from jaxllm.errors import UserError

FOLDERS = ("checkpoints", "data", "tensorboard")  # what a run keeps in out_dir
FILES = ("config.yaml", "metrics.jsonl", "samples.txt", "loss.png", "eval_first.json")


def check_layout(out_dir: str | Path) -> None:
    """Refuse an out_dir where a run could not write its files (a file in a folder's place,
    or the reverse), before anything is written."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"out_dir={out_dir} is a file, not a folder; choose another out_dir")
    for name in FOLDERS:
        if (out_dir / name).exists() and not (out_dir / name).is_dir():
            raise UserError(
                f"{out_dir / name} is a file where the run keeps its {name}/ folder; move it "
                "away or choose another out_dir"
            )
    for name in FILES:
        if (out_dir / name).is_dir():
            raise UserError(
                f"{out_dir / name} is a folder where the run writes its {name} file; move it "
                "away or choose another out_dir"
            )


@contextlib.contextmanager
def exclusive_out_dir(out_dir: str | Path) -> Iterator[None]:
    """Check the layout of `out_dir`, create it, and hold an exclusive lock on it inside the
    `with` block; another run holding it is refused with one line. A block that fails in
    an out_dir it created leaves no empty folders behind (files it wrote stay)."""
    out_dir = Path(out_dir)
    check_layout(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(out_dir, os.O_RDONLY)
    locked = False
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"out_dir={out_dir} is in use by another run; wait for it to end or stop it, "
                "or choose another out_dir"
            ) from None
        locked = True
        yield
    except BaseException:
        if created and locked:  # never the folders of the run that holds the lock
            _remove_empty_folders(out_dir)
        raise
    finally:
        os.close(descriptor)


def _remove_empty_folders(root: Path) -> None:
    """Remove `root` and the folders under it that hold no file, deepest first."""
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
        with contextlib.suppress(OSError):  # not empty
            folder.rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()
