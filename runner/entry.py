"""What every console entry point shares: the override pre-check, error lines and exit codes."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common.errors import EXIT_CONFIG
from .config.overrides import check_override
from .config.schema import RunConfig


def error(msg: str, prog: str = "t2i") -> None:
    """Print one error line the way every command does: `prog: error: msg`."""
    print(f"{prog}: error: {msg}", file=sys.stderr)


def remove_fresh_dir(out: Path) -> None:
    """Remove a run dir that holds only what Hydra put there (the run failed before writing anything)."""
    if not out.is_dir() or (out / "manifest.jsonl").exists():
        return
    if all(p.name in (".hydra",) or p.suffix == ".log" for p in out.iterdir()):
        shutil.rmtree(out, ignore_errors=True)
        parent = out.parent
        cwd = Path.cwd().resolve()
        while parent.resolve() != cwd and cwd in parent.resolve().parents and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent


def run_app(app: Callable[[], Any], state: dict, schema: Any = RunConfig, prog: str = "t2i",
            groups: tuple[str, ...] = ("model", "lora", "server")) -> None:
    """Pre-check the overrides against `schema` and the app's config `groups` (one line, exit 2), then run the
    Hydra `app`."""
    from .common.errors import ConfigError

    args = sys.argv[1:]
    flags = [a for a in args if a.startswith("-")]
    if all(f in ("-m", "--multirun") for f in flags):  # other flags take values that are not overrides
        try:
            for a in args:
                if a not in flags:
                    check_override(a, schema, prog, groups)
        except ConfigError as exc:
            error(str(exc), prog)
            sys.exit(EXIT_CONFIG)
    try:
        app()
    except SystemExit as exc:
        if exc.code == 1 and not state["task_started"]:
            sys.exit(EXIT_CONFIG)  # Hydra rejected the config before the run began
        raise
