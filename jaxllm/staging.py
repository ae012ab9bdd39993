"""Staging folders: a result is written into a temporary folder beside where it goes,
`<name>.tmp-<host>-<pid>-<random>`, and renamed into place whole, so a reader sees it whole
or not at all. A writer first removes the staging folders of its destination left by
processes on this host that are gone (killed before they could clean up)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path


def staging_prefix(destination: Path) -> str:
    """This host's staging folders of `destination` are `<name>.tmp-<host>-<pid>-*`."""
    return f"{destination.name}.tmp-{socket.gethostname()}-"


def remove_dead_staging(destination: Path) -> None:
    """Remove the staging folders of `destination` whose process on this host is gone."""
    prefix = staging_prefix(destination)
    if not destination.parent.is_dir():
        return
    for staging in destination.parent.iterdir():
        pid = staging.name[len(prefix) :].partition("-")[0]
        if staging.name.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def new_staging(destination: Path) -> Path:
    """A new, empty staging folder for `destination` (dead ones removed first)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_staging(destination)
    prefix = f"{staging_prefix(destination)}{os.getpid()}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=destination.parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
