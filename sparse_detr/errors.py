"""Errors that are the user's to fix, not the program's: every entry point reports them as one line.

A `UserError` ends a command with `error: <message>` on stderr and exit status 2, never with a
traceback (see `config.reports_config_errors`); tracebacks are kept for bugs. This module imports
nothing from the package, so any layer may raise these.
"""
from __future__ import annotations


class UserError(Exception):
    """Something the user can act on: a bad value, an unreadable file, a busy run folder, a full disk."""

    headline = ""  # printed between "error: " and the message


class UnreadableFile(UserError, ValueError):
    """An input file (a checkpoint) that cannot be read, or must not be: damaged, truncated or unsafe."""


class DiskFull(UserError, OSError):
    """A file could not be written for lack of space or quota; the file it was to replace is intact."""
