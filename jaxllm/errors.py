"""Errors a user can cause and fix. The CLI prints their message, one line each, and exits 2;
and the noise it keeps off that line (`quiet_abandoned_reads`)."""

import logging
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


class _AbandonedOrbaxTasks(logging.Filter):
    """asyncio's 'Task exception was never retrieved' for an Orbax/TensorStore read task
    that a failed restore left behind."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        abandoned = "never retrieved" in message
        return not (abandoned and ("orbax" in message or "tensorstore" in message))


def quiet_abandoned_reads() -> None:
    """Drop the pages of tracebacks Python and asyncio print after a failed checkpoint read
    or write for the reads and writes it abandoned ('Exception ignored in <coroutine ...>',
    'Event loop is closed', 'Task exception was never retrieved'): the error that matters
    was raised where the restore or save failed. Every other unraisable exception and
    asyncio error is printed as before."""
    previous = sys.unraisablehook
    if getattr(previous, "keeps_orbax_quiet", False):
        return
    logging.getLogger("asyncio").addFilter(_AbandonedOrbaxTasks())

    def hook(unraisable) -> None:
        if not _from_orbax_reads(unraisable):
            previous(unraisable)

    hook.keeps_orbax_quiet = True
    sys.unraisablehook = hook
