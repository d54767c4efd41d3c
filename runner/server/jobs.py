"""A bounded job queue and ONE worker thread that feeds requests to the shared core `runner.run.run`.

Batching decision: when the worker takes a job it also takes every queued job of the same *shape* (a RunSpec
equal but for prompts and seeds: same model, LoRAs, size, steps, guidance, scheduler) whose images make an
exact product with it, i.e. all have the same seeds (their prompts are merged) or all have the same prompt
(their seeds are merged), up to `server.merge_max_images` images. The merged spec is one `run()` call, so
the core batches those images into pipeline calls; nothing is generated that no request asked for. Other
jobs run one after another. The pipeline and its adapters stay loaded between runs: `runner.models.loading` caches
them per process.

Sweeps (runner/server/sweeps.py) are queued items too: one run of a whole validated config into its own run dir,
never merged. With a `Store` (runner/server/store.py) every item and state change is in SQLite: a new queue
resumes what was running (into the same run dir, from its manifest: every image exactly once) and keeps what was
queued. The queue order is the owner's priority (`server.priorities`), then submission order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..common.errors import ConfigError
from ..config import RunSpec
from ..generate.faults import InterruptGuard
from ..outputs.manifest import MANIFEST, one_per_file, parse_lines
from ..run import run
from .owner import current_owner
from .store import Store, decode, encode

log = logging.getLogger(__name__)
KEEP_FINISHED = 1000  # finished job records kept in memory (their files stay on disk)


def queued_viewer(run_dir: Path, planned: int) -> None:
    """A new sweep's run dir with its viewer saying `queued` (the run's live viewer takes over)."""
    from ..outputs.viewer import progress, write_viewer

    run_dir.mkdir(parents=True, exist_ok=True)
    write_viewer(run_dir, [], progress("queued", planned, 0, time.time()))


class KeyLimit(Exception):
    """One owner's queued images would pass `server.max_queued_images` (HTTP 429)."""


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
    # queued | running | done | error | interrupted (stopped early: its images so far) | cancelled (by its owner)
    status: str = "queued"
    error: str | None = None
    error_status: int = 500  # HTTP status for the error: 422 for a user error found while running
    files: list[Path | None] = dataclasses.field(default_factory=list)
    run_dir: Path | None = None
    family: str | None = None  # the model's family (runner/models/families.py), reported by the API
    kind: str = "job"  # job (a single request: its images are prompts x seeds) | sweep (a whole run config)
    owner: str = ""  # runner/server/owner.py
    priority: int = 0
    seq: int = 0  # submission order (the store's)
    planned: int = 0  # a sweep's images
    made: int = 0  # a sweep's images in its run dir
    source: str | None = None  # a sweep's config as submitted
    resume: bool = False  # its run dir may hold images already (a restart, a resumed sweep)
    _waiters: list[Callable[[], None]] = dataclasses.field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.files = [None] * len(self.wanted) if self.kind == "job" else []

    @property
    def wanted(self) -> list[tuple[str, str, int]]:
        """(prompt, negative prompt, seed) of each image, in request order."""
        return [(p.prompt, p.negative_prompt, s) for p in self.spec.prompts for s in self.spec.seeds]

    @property
    def done(self) -> int:
        return self.made if self.kind == "sweep" else sum(f is not None for f in self.files)

    @property
    def total(self) -> int:
        return self.planned if self.kind == "sweep" else len(self.files)

    @property
    def finished(self) -> bool:
        return self.status in ("done", "error", "interrupted", "cancelled")

    def take_manifest(self) -> None:
        """What its run dir's manifest already holds: a job's files, a sweep's count (after a restart)."""
        if self.run_dir is None or not (self.run_dir / MANIFEST).is_file():
            return
        entries = one_per_file(parse_lines((self.run_dir / MANIFEST).read_bytes()))
        if self.kind == "sweep":
            self.made = len(entries)
            return
        for entry in entries:
            key = (entry.get("prompt"), entry.get("negative_prompt"), entry.get("seed"))
            for k, want in enumerate(self.wanted):
                if want == key and (self.run_dir / entry["file"]).is_file():
                    self.files[k] = self.run_dir / entry["file"]


@dataclasses.dataclass(frozen=True)
class Running:
    """What the worker runs now: its jobs (one run), when it started, and how far it got."""

    jobs: tuple[Job, ...]
    started: float  # time.time()
    done: int
    total: int
    interrupted: bool  # asked to stop after the batch in flight
    kind: str = "job"


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
    """Pending jobs and sweeps (at most `size`), their records, and the single worker thread that runs them."""

    def __init__(self, out_dir: Path, size: int, merge_max: int = 16, store: Store | None = None,
                 priorities: dict[str, int] | None = None, max_queued_images: int = 0) -> None:
        self.out_dir = Path(out_dir)
        self.size = size
        self.merge_max = merge_max
        self.store = store
        self.priorities = priorities or {}  # owner -> priority (higher first)
        self.max_queued_images = max_queued_images  # per owner; 0 = no limit
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.runs = 0  # run() calls made (a merged run counts once)
        self._pending: list[Job] = []  # sorted: priority (high first), then seq
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._seconds = 5.0  # moving average of a run's duration, for Retry-After
        self._running: tuple[list[Job], float, InterruptGuard] | None = None
        self._seq = 0  # without a store
        rate = store.get_meta("rate") if store is not None else None
        self._made, self._spent = rate if rate else (0, 0.0)  # images generated, seconds: the measured rate
        if store is not None:
            self._recover()

    # 1. Persistence: what the store holds comes back as it was; running items run again into their run dirs.
    def _recover(self) -> None:
        assert self.store is not None
        for row in self.store.active():
            try:
                job = self._from_row(row)
            except Exception as exc:  # noqa: BLE001 - one unreadable row must not keep the server down
                log.error("queue item %s cannot be read back (%s); marked as failed", row["id"], exc)
                self.store.update(row["id"], state="error", error=f"could not be read back: {exc}")
                continue
            job.resume = row["state"] == "running" or job.kind == "sweep"
            job.status = "queued"
            self.jobs[job.id] = job
            self._pending.append(job)
        # what was running runs first, as it would have gone on doing; the rest keeps its order
        self._pending.sort(key=lambda j: (not self._was_running(j), -j.priority, j.seq))
        if self._pending:
            log.info("queue: %d item(s) taken back from %s", len(self._pending), self.store.path)

    def _was_running(self, job: Job) -> bool:
        row = self.store.get(job.id) if self.store is not None else None
        return bool(row and row["state"] == "running")

    def _from_row(self, row: dict) -> Job:
        spec = decode(json.loads(row["spec"]))
        if not isinstance(spec, RunSpec):
            raise ValueError("its spec is not a run spec")
        job = Job(spec, id=row["id"], status=row["state"], family=row["family"], kind=row["kind"],
                  owner=row["owner"], priority=row["priority"], seq=row["seq"], planned=row["images"],
                  made=row["done"], source=row["source"], error=row["error"],
                  error_status=row["error_status"] or 500)
        job.run_dir = Path(row["run_dir"]) if row["run_dir"] else None
        job.take_manifest()
        return job

    def _save(self, job: Job, **values: Any) -> None:
        if self.store is not None:
            self.store.update(job.id, **values)

    # 2. The worker thread.
    def start(self) -> None:
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._stop = False
                self._thread = threading.Thread(target=self._work, name="t2i-worker", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Let the worker finish its current job, then end it (queued items are left unrun; a running sweep stops
        after its batch in flight and stays `running` in the store, so the next start resumes it)."""
        with self._cond:
            self._stop = True
            if self._running is not None and self._running[0][0].kind == "sweep":
                self._running[2].request()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # 3. Queueing, finding, cancelling.
    def submit(self, spec: RunSpec, family: str | None = None, kind: str = "job", planned: int = 0,
               source: str | None = None, owner: str | None = None) -> Job:
        """Queue a job (or a sweep of `planned` images) for `spec`; raises QueueFull when `size` items are already
        waiting, KeyLimit when the owner's queued images would pass `max_queued_images`."""
        owner = current_owner() if owner is None else owner
        job = Job(spec, family=family, kind=kind, owner=owner, priority=int(self.priorities.get(owner, 0)),
                  planned=planned, source=source)
        with self._cond:
            if len(self._pending) >= self.size:
                raise QueueFull(max(1, math.ceil(self._seconds * max(1, len(self._pending)) / 4)))
            queued = sum(j.total - j.done for j in self._pending if j.owner == owner)
            if self.max_queued_images and queued + job.total > self.max_queued_images:
                raise KeyLimit(f"{job.total} more image(s) would make {queued + job.total} queued for this key; "
                               f"valid: at most {self.max_queued_images} (server.max_queued_images); wait for "
                               "the queued ones or cancel some")
            if kind == "sweep":
                job.run_dir = self.out_dir / f"sweep-{job.id[:12]}"
                queued_viewer(job.run_dir, job.total)  # its viewer URL works at once
            if self.store is not None:
                job.seq = self.store.add({
                    "id": job.id, "kind": kind, "owner": owner, "priority": job.priority, "state": "queued",
                    "images": job.total, "spec": json.dumps(encode(spec)), "family": family, "source": source,
                    "run_dir": str(job.run_dir) if job.run_dir else None})
            else:
                self._seq += 1
                job.seq = self._seq
            self._insert(job)
            self.jobs[job.id] = job
            self._forget_old()
            self._cond.notify_all()
        self.start()
        return job

    def _insert(self, job: Job) -> None:
        at = len(self._pending)
        for i, other in enumerate(self._pending):
            if (-job.priority, job.seq) < (-other.priority, other.seq):
                at = i
                break
        self._pending.insert(at, job)

    def requeue(self, job: Job) -> None:
        """Queue a finished sweep again (a cancelled or failed one): it makes only the images its run dir lacks."""
        with self._cond:
            if not job.finished:
                raise ValueError(f"{job.kind} {job.id} is {job.status}")
            job.status, job.error, job.resume = "queued", None, True
            self._save(job, state="queued", error=None)
            self._insert(job)
            self._cond.notify_all()
        self.start()

    def cancel(self, job: Job) -> str:
        """Cancel a queued item at once, a running one after its batch in flight (its images stay; a sweep's run
        dir can be resumed). Returns the item's state afterwards."""
        waiters: list[Callable[[], None]] = []
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
                job.status, job.error, job.error_status = "cancelled", "cancelled before it started", 409
                self._save(job, state="cancelled", error=job.error, error_status=409)
                waiters, job._waiters = job._waiters, []
            elif self._running is not None and job in self._running[0]:
                job.error = "cancelling"
                self._running[2].request()
        for fn in waiters:
            fn()
        return job.status

    def get(self, job_id: str) -> Job | None:
        """A job by id: in memory, else read back from the store (a job of an earlier start)."""
        with self._cond:
            job = self.jobs.get(job_id)
        if job is not None or self.store is None:
            return job
        row = self.store.get(job_id)
        if row is None:
            return None
        try:
            job = self._from_row(row)
        except Exception:  # noqa: BLE001 - unreadable: as if unknown
            return None
        with self._cond:
            self.jobs.setdefault(job.id, job)
            self._forget_old()
            return self.jobs[job.id]

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

    def images_per_second(self) -> float | None:
        """This server's measured rate over every run it made (kept in the store across restarts)."""
        return self._made / self._spent if self._made and self._spent > 0 else None

    def running(self) -> Running | None:
        """The run in progress (None when the worker is idle)."""
        with self._cond:
            if self._running is None:
                return None
            group, started, guard = self._running
            return Running(tuple(group), started, sum(j.done for j in group), sum(j.total for j in group),
                           guard.requested, group[0].kind)

    def interrupt(self) -> bool:
        """Stop the run in progress after its batch in flight (the core's Ctrl-C path); its jobs end as
        `interrupted` with the images made so far. False when nothing runs, or another key's run does."""
        with self._cond:
            if self._running is None or self._running[0][0].owner != current_owner():
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

    # 4. Running: take the next item (and the queued jobs it merges with), run it, record how it ended.
    def _take(self) -> list[Job] | None:
        with self._cond:
            while not self._pending and not self._stop:
                self._cond.wait()
            if self._stop:
                return None
            group = [self._pending.pop(0)]
            first = group[0]
            if first.kind == "job" and not first.resume:
                for job in list(self._pending):
                    if job.kind != "job" or job.resume or job.owner != first.owner:
                        continue  # one owner per run dir: a key sees its own runs only
                    spec = merge_specs([j.spec for j in group] + [job.spec])
                    if spec is not None and len(spec.prompts) * len(spec.seeds) <= self.merge_max:
                        group.append(job)
                        self._pending.remove(job)
            if first.run_dir is None:
                run_dir = self.out_dir / f"{first.seq:05d}-{first.id[:8]}"
                for job in group:
                    job.run_dir = run_dir
            for job in group:
                job.status = "running"
                # the run dir is written down before its first image: a restart finds it
                self._save(job, state="running", run_dir=str(job.run_dir))
            return group

    def _work(self) -> None:
        while (group := self._take()) is not None:
            self._run(group)

    def _run(self, group: list[Job]) -> None:
        spec = merge_specs([j.spec for j in group]) if len(group) > 1 else group[0].spec
        assert spec is not None
        first = group[0]
        if first.resume:  # its run dir holds images already: make only the missing ones
            spec = dataclasses.replace(spec, resume=True)
            first.take_manifest()
        self.runs += 1
        run_dir = first.run_dir
        assert run_dir is not None
        log.info("run %d: %d %s(s), %d image(s) -> %s", self.runs, len(group), first.kind,
                 sum(j.total for j in group), run_dir)

        def on_image(entry: dict) -> None:
            key = (entry["prompt"], entry["negative_prompt"], entry["seed"])
            with self._cond:
                if first.kind == "sweep":
                    first.made += 1
                    return
                for job in group:
                    for k, want in enumerate(job.wanted):
                        if want == key:
                            job.files[k] = run_dir / entry["file"]

        start = time.perf_counter()
        error, status, result = None, 500, None
        guard = InterruptGuard()
        with self._cond:
            self._running = (group, time.time(), guard)
        try:
            result = run(spec, run_dir, progress=False, on_image=on_image, stop=guard)
        except ConfigError as exc:
            error, status = str(exc), 422
        except Exception as exc:  # noqa: BLE001 - reported on the job; the worker keeps serving
            log.exception("run %d failed", self.runs)
            error = f"generation failed: {type(exc).__name__}: {exc}"
        finally:
            with self._cond:
                self._running = None
        self._seconds = 0.7 * self._seconds + 0.3 * (time.perf_counter() - start)
        if result is not None and result.generated:
            self._made, self._spent = self._made + result.generated, self._spent + result.seconds
            if self.store is not None:
                self.store.set_meta("rate", [self._made, self._spent])
        if first.kind == "sweep" and result is not None:
            first.take_manifest()  # the count the run dir holds, whoever wrote it
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
                missing = job.total - job.done
                cancelled = job.error == "cancelling"
                if interrupted and missing and self._stop and not cancelled and job.kind == "sweep":
                    job.status = "running"  # the server is stopping: the next start resumes it
                    self._save(job, done=job.done)
                    continue
                job.status = "error"
                if error is not None:
                    job.error, job.error_status = error, status
                elif missing and interrupted:  # stopped on request: the images made so far are its result
                    job.status, job.error_status = ("cancelled" if cancelled else "interrupted"), 409
                    job.error = f"{job.status} after {job.done} of {job.total} image(s)"
                elif missing:
                    job.error = f"{missing} image(s) were not produced"
                else:
                    job.status, job.error = "done", None
                self._save(job, state=job.status, done=job.done, error=job.error, error_status=job.error_status)
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
