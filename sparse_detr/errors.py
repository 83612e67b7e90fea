"""The errors a user can cause and fix: each ends a program with one `error:` line and exit status 2.

A leaf module (it imports nothing of the package), so configs, data loading, the engine and the
entry points can all raise these without importing each other (see `config.reports_config_errors`).
Anything else that escapes is a bug and keeps its traceback.
"""
from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """Something the user gave or can act on: a bad value, an unreadable file, a busy run folder, a full disk."""

    prefix = ""      # what the one-line message starts with after `error: `


class ConfigError(UserError):
    """A config value is out of range or not one of the valid choices."""

    prefix = "invalid configuration: "


class UnreadableFile(UserError):
    """An input file (a checkpoint) that cannot be read, or must not be: damaged, truncated or unsafe."""


class DiskFull(UserError, OSError):
    """A file could not be written for lack of space or quota; the file it was to replace is intact."""


def one_line(error: UserError) -> str:
    """`error: ...` for stderr: the message with its lines joined, so a log grep finds it whole."""
    return "error: " + error.prefix + " ".join(line.strip() for line in str(error).splitlines() if line.strip())
