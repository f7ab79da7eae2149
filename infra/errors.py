"""User-facing errors: one clear message, a non-zero exit code, never a deep traceback."""
from __future__ import annotations


class TwinarmError(Exception):
    """An error whose message is meant for the user as is (names the file/row/field and what was expected).

    exit_code 1: the command ran and found a problem (failed stage, violated audit check, ...).
    exit_code 2: the command could not run as asked (bad spec, bad input file, bad arguments).
    """

    exit_code = 1


class SpecError(TwinarmError):
    """The ablation spec is invalid: the message names the file, line, dotted key and what was expected."""

    exit_code = 2


class DataError(TwinarmError):
    """A data file is missing or does not match its expected schema."""

    exit_code = 2


class LockedError(TwinarmError):
    """Another process holds a lock (the lineage writer, or a run of the same ablation)."""

    exit_code = 1


class UsageError(TwinarmError):
    """The command was called wrongly (bad option value)."""

    exit_code = 2
