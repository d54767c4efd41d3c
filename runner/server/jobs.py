"""A bounded job queue and ONE worker thread that feeds requests to the shared core `runner.run.run`.

Batching decision: when the worker takes a job it also takes every queued job of the same *shape* (a RunSpec
equal but for prompts and seeds: same model, LoRAs, size, steps, guidance, scheduler) whose images make an
exact product with it, i.e. all have the same seeds (their prompts are merged) or all have the same prompt
(their seeds are merged), up to `server.merge_max_images` images. The merged spec is one `run()` call, so
the core batches those images into pipeline calls; nothing is generated that no request asked for. Other
jobs run one after another. The pipeline and its adapters stay loaded between runs: `runner.models.loading` caches
them per process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path

from ..common.errors import ConfigError
from ..config import RunSpec
from ..generate.faults import InterruptGuard
from ..run import run

log = logging.getLogger(__name__)
KEEP_FINISHED = 1000  # finished job records kept in memory (their files stay on disk)


class QueueFull(Exception):
    """The queue holds `queue_size` pending jobs; retry after `retry_after` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is busy: the job queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclasses.dataclass(eq=False)
class Job:
    """One request: its validated spec, the images it wants, and what has been made so far."""

    spec: RunSpec
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    status: str = "queued"  # queued | running | done | error | interrupted (stopped early: its images so far)
    error: str | None = None
    error_status: int = 500  # HTTP status for the error: 422 for a user error found while running
    files: list[Path | None] = dataclasses.field(default_factory=list)
    run_dir: Path | None = None
    family: str | None = None  # the model's family (runner/models/families.py), reported by the API
    _waiters: list[Callable[[], None]] = dataclasses.field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.files = [None] * len(self.wanted)

    @property
    def wanted(self) -> list[tuple[str, str, int]]:
        """(prompt, negative prompt, seed) of each image, in request order."""
        return [(p.prompt, p.negative_prompt, s) for p in self.spec.prompts for s in self.spec.seeds]

    @property
    def done(self) -> int:
        return sum(f is not None for f in self.files)

    @property
    def finished(self) -> bool:
        return self.status in ("done", "error", "interrupted")


@dataclasses.dataclass(frozen=True)
class Running:
    """What the worker runs now: its jobs (one run), when it started, and how far it got."""

    jobs: tuple[Job, ...]
    started: float  # time.time()
    done: int
    total: int
    interrupted: bool  # asked to stop after the batch in flight


def _shape(spec: RunSpec) -> RunSpec:
    return dataclasses.replace(spec, prompts=(), seeds=())


def _union(items: list[tuple]) -> tuple:
    return tuple(dict.fromkeys(x for t in items for x in t))


def merge_specs(specs: list[RunSpec]) -> RunSpec | None:
    """One spec whose prompts x seeds product is exactly the union of `specs`' images, or None if none is."""
    first = specs[0]
    if any(_shape(s) != _shape(first) for s in specs):
        return None
    if all(s.seeds == first.seeds for s in specs):
        return dataclasses.replace(first, prompts=_union([s.prompts for s in specs]))
    if all(s.prompts == first.prompts for s in specs):
        return dataclasses.replace(first, seeds=_union([s.seeds for s in specs]))
    return None


class JobQueue:
    """Pending jobs (at most `size`), the job records, and the single worker thread that runs them."""

    def __init__(self, out_dir: Path, size: int, merge_max: int = 16) -> None:
        self.out_dir = Path(out_dir)
        self.size = size
        self.merge_max = merge_max
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.runs = 0  # run() calls made (a merged run counts once)
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._seconds = 5.0  # moving average of a run's duration, for Retry-After
        self._running: tuple[list[Job], float, InterruptGuard] | None = None

    def start(self) -> None:
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._stop = False
                self._thread = threading.Thread(target=self._work, name="t2i-worker", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Let the worker finish its current run, then end it (queued jobs are left unrun)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, spec: RunSpec, family: str | None = None) -> Job:
        """Queue a job for `spec`; raises QueueFull when `size` jobs are already waiting."""
        job = Job(spec, family=family)
        with self._cond:
            if len(self._pending) >= self.size:
                raise QueueFull(max(1, math.ceil(self._seconds * max(1, len(self._pending)) / 4)))
            self._pending.append(job)
            self.jobs[job.id] = job
            self._forget_old()
            self._cond.notify_all()
        self.start()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self.jobs.get(job_id)

    def position(self, job: Job) -> int | None:
        """1-based place of a queued job in the queue (None once it has been taken)."""
        with self._cond:
            for i, j in enumerate(self._pending):
                if j is job:
                    return i + 1
        return None

    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def running(self) -> Running | None:
        """The run in progress (None when the worker is idle)."""
        with self._cond:
            if self._running is None:
                return None
            group, started, guard = self._running
            return Running(tuple(group), started, sum(j.done for j in group), sum(len(j.files) for j in group),
                           guard.requested)

    def interrupt(self) -> bool:
        """Stop the run in progress after its batch in flight (the core's Ctrl-C path); its jobs end as
        `interrupted` with the images made so far. False when nothing runs."""
        with self._cond:
            if self._running is None:
                return False
            self._running[2].request()
            return True

    def add_waiter(self, job: Job, fn: Callable[[], None]) -> None:
        """Call `fn` (from the worker thread) when `job` finishes; at once if it already has."""
        with self._cond:
            if not job.finished:
                job._waiters.append(fn)
                return
        fn()

    def _forget_old(self) -> None:
        extra = len(self.jobs) - KEEP_FINISHED
        for jid in [j for j, job in self.jobs.items() if job.finished][:max(0, extra)]:
            del self.jobs[jid]

    def _take(self) -> list[Job] | None:
        with self._cond:
            while not self._pending and not self._stop:
                self._cond.wait()
            if self._stop:
                return None
            group = [self._pending.popleft()]
            for job in list(self._pending):
                spec = merge_specs([j.spec for j in group] + [job.spec])
                if spec is not None and len(spec.prompts) * len(spec.seeds) <= self.merge_max:
                    group.append(job)
                    self._pending.remove(job)
            for job in group:
                job.status = "running"
            return group

    def _work(self) -> None:
        while (group := self._take()) is not None:
            self._run(group)

    def _run(self, group: list[Job]) -> None:
        spec = merge_specs([j.spec for j in group]) if len(group) > 1 else group[0].spec
        assert spec is not None
        self.runs += 1
        run_dir = self.out_dir / f"{self.runs:05d}-{group[0].id[:8]}"
        for job in group:
            job.run_dir = run_dir
        log.info("run %d: %d job(s), %d image(s) -> %s", self.runs, len(group),
                 len(spec.prompts) * len(spec.seeds), run_dir)

        def on_image(entry: dict) -> None:
            key = (entry["prompt"], entry["negative_prompt"], entry["seed"])
            with self._cond:
                for job in group:
                    for k, want in enumerate(job.wanted):
                        if want == key:
                            job.files[k] = run_dir / entry["file"]

        start = time.perf_counter()
        error, status = None, 500
        guard = InterruptGuard()
        with self._cond:
            self._running = (group, time.time(), guard)
        try:
            run(spec, run_dir, progress=False, on_image=on_image, stop=guard)
        except ConfigError as exc:
            error, status = str(exc), 422
        except Exception as exc:  # noqa: BLE001 - reported on the job; the worker keeps serving
            log.exception("run %d failed", self.runs)
            error = f"generation failed: {type(exc).__name__}: {exc}"
        finally:
            with self._cond:
                self._running = None
        self._seconds = 0.7 * self._seconds + 0.3 * (time.perf_counter() - start)
        if error is not None and len(group) > 1 and not guard.requested:
            log.warning("run %d of %d merged requests failed; running each alone", self.runs, len(group))
            for job in group:  # one request's bad input never fails another's
                self._run([job])
            return
        self._finish(group, error, status, guard.requested)

    def _finish(self, group: list[Job], error: str | None, status: int, interrupted: bool = False) -> None:
        waiters: list[Callable[[], None]] = []
        with self._cond:
            for job in group:
                missing = len(job.files) - job.done
                job.status = "error"
                if error is not None:
                    job.error, job.error_status = error, status
                elif missing and interrupted:  # stopped on request: the images made so far are its result
                    job.status, job.error_status = "interrupted", 409
                    job.error = f"interrupted after {job.done} of {len(job.files)} image(s)"
                elif missing:
                    job.error = f"{missing} image(s) were not produced"
                else:
                    job.status = "done"
                waiters += job._waiters
                job._waiters = []
        for fn in waiters:
            try:
                fn()
            except Exception:  # noqa: BLE001 - a waiter's event loop may be gone
                log.debug("job waiter failed", exc_info=True)


async def wait_for(queue: JobQueue, job: Job) -> None:
    """Await the end of `job` without blocking the event loop (the worker wakes us)."""
    loop = asyncio.get_running_loop()
    event = asyncio.Event()
    queue.add_waiter(job, lambda: loop.call_soon_threadsafe(event.set))
    await event.wait()
