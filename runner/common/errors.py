"""User-facing errors and the one-line forms every entry point prints."""

from __future__ import annotations

import difflib
import functools
import signal
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

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


def did_you_mean(value: object, choices: Iterable[str] | Mapping[str, str]) -> str:
    """` (did you mean 'x'?)` for the closest of `choices`, or an empty string. With a mapping, the closest key
    is matched and its value suggested (e.g. a key's last part -> the full dotted key)."""
    hint = difflib.get_close_matches(str(value), list(choices), n=1)
    if not hint:
        return ""
    return f" (did you mean {choices[hint[0]] if isinstance(choices, Mapping) else hint[0]!r}?)"


def error(msg: str, prog: str = "t2i") -> None:
    """Print one error line the way every command does: `prog: error: msg`."""
    print(f"{prog}: error: {msg}", file=sys.stderr)


def interrupted_code(signum: int | None) -> int:
    """The exit code of a run stopped by `signum`: 143 for SIGTERM (128 + 15), else 130 (Ctrl-C)."""
    return EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED


def exit_code(exc: BaseException) -> int:
    """The exit code of a command stopped by `exc`: 2 for a config error, 130/143 for an interrupt (the signal
    generate/faults.py records as `signum`), 1 for anything else."""
    if isinstance(exc, ConfigError):
        return EXIT_CONFIG
    if isinstance(exc, KeyboardInterrupt):
        return interrupted_code(getattr(exc, "signum", None))
    return EXIT_FAILED


def report(exc: BaseException, prog: str, *, verbose: bool = False, hint: str = "run with verbose=true",
           interrupted: str = "interrupted") -> int:
    """Print the one line for `exc` (`prog: error: …`) and return its exit code; an unexpected error re-raises
    (its traceback) when `verbose`."""
    if isinstance(exc, KeyboardInterrupt):
        error(interrupted, prog)
    elif isinstance(exc, ConfigError):
        error(str(exc), prog)
    elif verbose:
        raise exc
    else:
        error(f"{type(exc).__name__}: {exc} ({hint} for the traceback)", prog)
    return exit_code(exc)


@contextmanager
def task_errors(prog: str, *, verbose: bool = False, interrupted: str = "interrupted",
                on_config_error: Callable[[], None] | None = None,
                job_failed: Callable[[str], BaseException] | None = None) -> Iterator[None]:
    """Every entry point's error policy around its task (lightning-hydra-template's `task_wrapper`): one line and
    exit 2 for a config error, 130 for Ctrl-C (143 for SIGTERM), 1 for anything else (its traceback only when
    `verbose`). `on_config_error` runs before the line (e.g. remove what the failed start created);
    `job_failed` turns a failure into the exception a Hydra multirun records instead of exiting (the other jobs
    still run)."""
    try:
        yield
    except (KeyboardInterrupt, Exception) as exc:
        if isinstance(exc, ConfigError) and on_config_error is not None:
            on_config_error()
        code = report(exc, prog, verbose=verbose, interrupted=interrupted)
        if job_failed is not None and code in (EXIT_CONFIG, EXIT_FAILED):
            raise job_failed(str(exc) if code == EXIT_CONFIG else f"{type(exc).__name__}: {exc}") from exc
        sys.exit(code)


def task_wrapper(prog: str, exits: bool = False) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate an argparse command's `main(argv) -> int` with `task_errors`' policy, returning the exit code of a
    failure (so tests can call it), or with `exits` raising SystemExit with it (a server's main never returns while
    it serves); `--verbose` in argv shows an unexpected error's traceback."""

    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapped(argv: list[str] | None = None) -> int:
            try:
                return main(argv)
            except (KeyboardInterrupt, Exception) as exc:
                verbose = "--verbose" in (sys.argv[1:] if argv is None else argv)
                code = report(exc, prog, verbose=verbose, hint="run with --verbose")
                if exits:
                    sys.exit(code)
                return code

        return wrapped

    return decorate
