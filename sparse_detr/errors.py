"""The errors a user can cause and fix: each ends a program with one `error:` line and exit status 2.

A leaf module (it imports nothing of the package), so configs, data loading and entry points can
all raise these without importing each other. Anything else that escapes is a bug and keeps its
traceback.
"""
from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """Something the user gave (a value, a file, a data set) cannot be used as it is."""

    prefix = ""      # what the one-line message starts with after `error: `


class ConfigError(UserError):
    """A config value is out of range or not one of the valid choices."""

    prefix = "invalid configuration: "


def one_line(error: UserError) -> str:
    """`error: ...` for stderr: the message with its lines joined, so a log grep finds it whole."""
    return "error: " + error.prefix + " ".join(line.strip() for line in str(error).splitlines() if line.strip())
