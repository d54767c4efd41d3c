"""User-facing errors and the one-line forms every entry point prints."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

EXIT_OK = 0
EXIT_FAILED = 1  # anything else that went wrong (a traceback with verbose=true)
EXIT_CONFIG = 2  # bad input: one line naming the bad value and the valid ones
EXIT_INTERRUPTED = 130  # Ctrl-C: the finished images are kept
EXIT_TERMINATED = 143  # SIGTERM (128 + 15): the finished images are kept


class ConfigError(ValueError):
    """A user-facing configuration error: one line, exit code 2."""


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:limit] if limit else line


def did_you_mean(value: object, choices: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the closest of `choices`, or an empty string."""
    hint = difflib.get_close_matches(str(value), list(choices), n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""
