"""What the Hydra entry points (t2i, t2i-train) share: the override pre-check and the run-dir guard. The error
policy of every command (exit codes, one-line errors) is common/errors.task_errors / task_wrapper."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from .common.errors import EXIT_CONFIG, ConfigError, error
from .config.overrides import check_override
from .config.schema import RunConfig
from .outputs.rundir import check_not_foreign, check_writable, note_created

_launched = [False]  # a multirun's jobs were launched (RunDirGuard.on_multirun_start)


class RunDirGuard(Callback):
    """Hydra callback (conf/config.yaml): before Hydra creates the run dir, check that it can be written (one line,
    exit 2, before any model loads) and remember what this process creates there (the folder, `.hydra/`, the job
    log), so that a run that fails before its first image removes exactly that (outputs/rundir.remove_created)."""

    def __init__(self, prog: str = "t2i") -> None:
        self.prog = prog
        self._existing: set[str] | None = None  # multirun: job dirs that existed before the sweep

    def _check(self, path: Path, what: str) -> None:
        try:
            check_writable(path, what)  # first: a place that cannot be written to is that, whatever it holds
            check_not_foreign(path, what)
        except ConfigError as exc:
            error(str(exc), self.prog)
            sys.exit(EXIT_CONFIG)

    def _note_hydra_files(self, config: DictConfig, out: Path) -> None:
        sub = config.hydra.output_subdir
        for name in ([str(sub)] if sub is not None else []) + [f"{config.hydra.job.name}.log"]:
            if not (out / name).exists():
                note_created(out, out / name)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        out = Path(os.path.abspath(str(config.hydra.run.dir)))
        self._check(out, "output_dir" if config.get("output_dir") else "hydra.run.dir")
        self._note_hydra_files(config, out)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(os.path.abspath(str(config.hydra.sweep.dir)))
        self._check(sweep, "hydra.sweep.dir")
        _launched[0] = True  # the jobs may run elsewhere (submitit): a failure from now on is not a config error
        self._existing = {str(p) for p in sweep.iterdir()}

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN or self._existing is None:
            return  # a single run noted its files at on_run_start; unknown history: remove nothing
        out = Path(str(config.hydra.runtime.output_dir))
        if str(out) not in self._existing:
            note_created(out, out)
            self._note_hydra_files(config, out)


def run_app(app: Callable[[], Any], state: dict, schema: Any = RunConfig, prog: str = "t2i",
            groups: tuple[str, ...] = ("model", "lora", "server", "experiment")) -> None:
    """Pre-check the overrides against `schema` and the app's config `groups` (one line, exit 2), then run the
    Hydra `app`."""
    state["task_started"] = _launched[0] = False  # a process may run the app more than once (tests, a Python session)
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
        if exc.code == 1 and not state["task_started"] and not _launched[0]:
            sys.exit(EXIT_CONFIG)  # Hydra rejected the config before the run began
        raise
