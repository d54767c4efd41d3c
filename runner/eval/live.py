"""`eval.metrics=[…]` inside a run: images are scored as the writer threads finish them, in a thread of its own
(the denoiser never waits for a scorer), batched by `eval.batch_size`; what could not be scored on the way (a
LoRA image whose baseline comes later or must be made) is scored when the run ends."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from pathlib import Path

from ..common.errors import ConfigError
from ..config.schema import EvalConfig
from . import baseline as bl
from . import store
from .scorers import Session, check_eval

log = logging.getLogger(__name__)
NICE = 10  # the scorer thread's niceness: scores may wait, the denoiser may not


def check_run_eval(cfg: EvalConfig, lora_sets: tuple) -> list[str]:
    """Check a run's eval config before anything loads; a run that will have no baseline for lora_effect with
    eval.make_baseline=false is an error now, not after the sweep."""
    names = check_eval(cfg)
    if "lora_effect" in names and not cfg.make_baseline and not any(len(s) == 0 for s in lora_sets):
        raise ConfigError("eval.metrics has lora_effect but lora_sets has no [] (no-LoRA baseline) and "
                          "eval.make_baseline=false; add [] to lora_sets or set eval.make_baseline=true")
    return names


class LiveScorer:
    """Scores a run's images as they are written (one thread; a bounded wait only at the end of the run)."""

    def __init__(self, run_dir: Path, cfg: EvalConfig, names: list[str], device: str) -> None:
        self.run_dir = Path(run_dir)
        self.session = Session(cfg, names, device, say=lambda m: log.warning("%s", m)).load()  # may raise
        self.error: BaseException | None = None
        self._q: queue.Queue = queue.Queue()
        self._base: dict[str, dict] = {}
        self._waiting: dict[str, list[dict]] = {}
        self._thread: threading.Thread | None = None

    def start(self, done: list[dict]) -> LiveScorer:
        """Start scoring; `done`: the run dir's images so far (baselines for this run's LoRA images)."""
        self._base = bl.find(done, self.run_dir)
        lines = store.read_lines(self.run_dir)
        self._have = {s.name: store.done(lines, s.name, self.session.signature(s)) for s in self.session.active}
        self._thread = threading.Thread(target=self._work, name="t2i-eval", daemon=True)
        self._thread.start()
        return self

    def add(self, entry: dict) -> None:
        self._q.put(entry)

    def _work(self) -> None:
        with contextlib.suppress(AttributeError, OSError):  # Linux: this thread (and the torch threads it starts)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)  # yields the CPU to the denoiser
        while True:
            batch = [self._q.get()]
            while batch[-1] is not None and len(batch) < self.session.cfg.batch_size:
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            stop = batch[-1] is None
            batch = [e for e in batch if e is not None]
            if batch and self.error is None:
                try:
                    self._score(batch)
                except BaseException as exc:  # noqa: BLE001 - reported when the run ends; the images are kept
                    self.error = exc
            if stop:
                return

    def _score(self, batch: list[dict]) -> None:
        from .score import Plan, execute

        for e in batch:
            if not bl.has_loras(e):
                self._base.setdefault(bl.settings_key(e), e)
        todo: dict[str, list[dict]] = {}
        for s in self.session.active:
            mine = [e for e in batch if e["key"] not in self._have[s.name]]
            if s.baseline:
                ready = []
                for e in [e for e in mine if bl.has_loras(e)] + self._waiting.pop("__all__", []):
                    (ready if bl.settings_key(e) in self._base else self._waiting.setdefault("__all__", [])).append(e)
                mine = ready
            if mine:
                todo[s.name] = mine
        execute(Plan(self.run_dir, list(self._base.values()), todo), self.session)

    def close(self, generate: bl.Generate | None, finish: bool = True) -> int:
        """Wait for the queued images; with `finish`, score what is left (making missing baselines)."""
        from .score import execute, plan, read_entries

        if self._thread is not None:
            self._q.put(None)
            self._thread.join()
        if self.error is not None:
            raise self.error
        if not finish:
            return 0
        p = plan(self.run_dir, self.session, read_entries(self.run_dir))
        bl.check(len(p.missing_baselines), self.session.cfg.make_baseline, generate)
        return execute(p, self.session, generate)
