"""Errors a user can cause and fix. The CLI prints their message, one line each, and exits 2."""


class UserError(Exception):
    """A mistake in the config, the data or the environment that the user can fix."""


class ConfigError(UserError, ValueError):
    """A config that cannot work. The message has one line per mistake."""


class DataError(UserError, ValueError):
    """Input data that cannot be used: missing, empty, malformed, too short."""
