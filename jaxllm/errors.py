"""Errors a user can cause and fix. The CLI prints their message, one line each, and exits 2;
and the noise it keeps off that line (`quiet_abandoned_reads`)."""

import sys


class UserError(Exception):
    """A mistake in the config, the data or the environment that the user can fix."""


class ConfigError(UserError, ValueError):
    """A config that cannot work. The message has one line per mistake."""


class DataError(UserError, ValueError):
    """Input data that cannot be used: missing, empty, malformed, too short."""


def _from_orbax_reads(unraisable) -> bool:
    """Whether an unraisable exception is the leftover of a failed Orbax/TensorStore read:
    an array read coroutine whose error nobody awaited once another read had failed (the
    restore already raised, and the caller reported it), or an event loop closed under
    it."""
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None and any(lib in code.co_filename for lib in ("orbax", "tensorstore")):
        return True
    value = unraisable.exc_value
    return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"


def quiet_abandoned_reads() -> None:
    """Drop the pages of 'Exception ignored in <coroutine ...>' tracebacks that Python
    prints at garbage collection for a failed restore's abandoned reads (the error that
    matters was raised where the restore failed); every other unraisable exception is
    printed as before."""
    previous = sys.unraisablehook
    if getattr(previous, "keeps_orbax_quiet", False):
        return

    def hook(unraisable) -> None:
        if not _from_orbax_reads(unraisable):
            previous(unraisable)

    hook.keeps_orbax_quiet = True
    sys.unraisablehook = hook
