"""Faults the generation loop survives: out-of-memory (smaller batches), black/NaN images (reported, optional
fp32-VAE retry), write errors (one clear line, finished images kept), Ctrl-C, SIGTERM and a submitit
preemption signal (finish the batch, then stop)."""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..plan import ImageJob

log = logging.getLogger(__name__)


class OutOfMemory(RuntimeError):
    """Even a batch of one image does not fit in memory."""


class OutputError(RuntimeError):
    """Writing outputs failed (disk full, read-only, ...); what was finished is intact in the manifest."""


@dataclass
class Produced:
    """One finished image with the batch size that actually made it and the faults met on the way."""

    job: ImageJob
    image: Any
    batch_size: int
    faults: list[dict] = field(default_factory=list)


def is_oom(exc: BaseException) -> bool:
    """True for CUDA/MPS/CPU out-of-memory errors."""
    import torch

    oom_type = getattr(torch, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory() -> None:
    """Give cached accelerator memory back after an OOM."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    backend = getattr(torch.backends, "mps", None)
    if mps is not None and backend is not None and backend.is_available():
        mps.empty_cache()


def is_black(image: Any) -> bool:
    """True if every pixel is 0: what NaNs (fp16 VAE overflow) become in a PIL image."""
    extrema = image.getextrema()
    if extrema and isinstance(extrema[0], tuple):
        return all(hi == 0 for _, hi in extrema)
    return extrema[1] == 0


@contextlib.contextmanager
def fp32_vae(pipe: Any) -> Iterator[None]:
    """Within the block the VAE runs in fp32 (its inputs are cast up); its dtype is restored afterwards."""
    import torch

    vae = pipe.vae
    old = vae.dtype
    vae.to(torch.float32)

    def cast(_module: Any, args: tuple, kwargs: dict) -> tuple:
        return tuple(a.float() if torch.is_tensor(a) else a for a in args), kwargs

    mods = [getattr(vae, name, None) for name in ("post_quant_conv", "decoder")]
    mods = [m for m in mods if m is not None]
    handles = [m.register_forward_pre_hook(cast, with_kwargs=True) for m in mods]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        vae.to(old)


class FaultHandler:
    """Runs batches through `generate`: halves them on OOM (and remembers it), checks for black images."""

    def __init__(self, pipe: Any, nan_retry_fp32_vae: bool = False) -> None:
        self.pipe = pipe
        self.nan_retry_fp32_vae = nan_retry_fp32_vae
        self.cap: int | None = None  # largest batch that fitted after an OOM
        self.names: dict[str, str] = {}  # key -> file name, for messages (the run dir gives names)

    def name(self, job: ImageJob) -> str:
        return self.names.get(job.key, job.stem)

    def _call(self, generate: Callable[[list[ImageJob]], list[Any]], jobs: list[ImageJob],
              notes: dict[str, list[dict]]) -> list[tuple[list[ImageJob], list[Any]]]:
        """Generate `jobs`, halving on OOM until the pieces fit; returns (jobs, images) pieces in order."""
        pending = [jobs[i:i + self.cap] for i in range(0, len(jobs), self.cap)] if self.cap else [jobs]
        done = []
        while pending:
            chunk = pending.pop(0)
            if self.cap and len(chunk) > self.cap:  # the cap dropped while this chunk waited
                pending[:0] = [chunk[i:i + self.cap] for i in range(0, len(chunk), self.cap)]
                continue
            try:
                images = list(generate(chunk))
            except Exception as exc:
                if not is_oom(exc):
                    raise
                free_memory()
                if len(chunk) == 1:
                    raise OutOfMemory(f"out of memory even with batch_size=1 for {self.name(chunk[0])}; use "
                                      "smaller width/height, model.dtype=fp16 or another device") from exc
                half = (len(chunk) + 1) // 2
                self.cap = half
                log.warning("out of memory with a batch of %d images; continuing with batches of %d",
                            len(chunk), half)
                event = {"type": "oom", "batch_size": len(chunk), "retried_with": half}
                for job in chunk:
                    notes.setdefault(job.key, []).append(event)
                pending[:0] = [chunk[:half], chunk[half:]]
                continue
            done.append((chunk, images))
        return done

    def _black(self, generate: Callable, produced: list[Produced]) -> None:
        """Report black images; regenerate them with the VAE in fp32 when asked and it can help."""
        import torch

        bad = [p for p in produced if is_black(p.image)]
        if not bad:
            return
        vae = getattr(self.pipe, "vae", None)
        can_retry = vae is not None and vae.dtype != torch.float32
        for p in bad:
            event: dict = {"type": "black_image", "detail": "every pixel is 0 (NaN in the VAE?)"}
            p.faults.append(event)
            if not self.nan_retry_fp32_vae:
                hint = "kept as is"
                if can_retry:
                    hint = "set nan_retry_fp32_vae=true to retry with the VAE in fp32"
                log.warning("%s is all black (NaN in the VAE?); %s", self.name(p.job), hint)
        if not (self.nan_retry_fp32_vae and can_retry):
            if self.nan_retry_fp32_vae:
                log.warning("%d black image(s); the VAE already runs in fp32, kept as is", len(bad))
            return
        with fp32_vae(self.pipe):
            for p in bad:
                (_, (image,)), *_ = self._call(generate, [p.job], {})
                fixed = not is_black(image)
                p.faults[-1].update(retried="fp32_vae", fixed=fixed)
                if fixed:
                    p.image = image
                log.warning("%s was all black; retried with the VAE in fp32: %s", self.name(p.job),
                            "fixed" if fixed else "still black, kept")

    def generate(self, generate: Callable[[list[ImageJob]], list[Any]],
                 batch: Sequence[ImageJob]) -> list[Produced]:
        """Every image of `batch`, in order, each with the batch size that made it and its faults."""
        notes: dict[str, list[dict]] = {}
        produced = []
        for jobs, images in self._call(generate, list(batch), notes):
            for job, image in zip(jobs, images, strict=True):
                produced.append(Produced(job, image, len(jobs), [dict(e) for e in notes.get(job.key, [])]))
        self._black(generate, produced)
        return produced


def annotate(record: dict, produced: Produced) -> dict:
    """Add the faults an image met to its record (nothing is added when there were none)."""
    if produced.faults:
        record["faults"] = produced.faults
    return record


def output_error(exc: OSError, out: Path, done: int) -> OutputError:
    """A one-line error for a failed write that says what is kept and how to go on."""
    reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    return OutputError(f"cannot write to {out} ({reason}); the {done} image(s) finished are kept in "
                       "manifest.jsonl; fix it and re-run the same command to resume")


class Interrupted(KeyboardInterrupt):
    """A second Ctrl-C or SIGTERM: stop at once (what is written stays consistent)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal_name(signum))
        self.signum = signum


def signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "no signal"


def preemption_signal() -> int:
    """The signal submitit sends before a time limit or on preemption (SUBMITIT_PREEMPT_SIGNAL, default USR2)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return int(getattr(signal, f"SIG{name}", signal.SIGUSR2))


class InterruptGuard:
    """First Ctrl-C or SIGTERM: finish the batch in flight, then stop (the run writes its summary; exit 130 or
    143). A Ctrl-C after it: `Interrupted` at once; a second SIGTERM changes nothing.

    Under submitit (a Python handler is installed for its preemption signal), that signal also stops the run
    after the batch in flight; `hand_over()` then passes it to submitit's handler, which checkpoints and requeues
    the job, and the requeued job resumes from the manifest."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._signalled = False  # a Ctrl-C or SIGTERM has been handled (a Ctrl-C after it aborts)
        self._old: dict[int, Any] = {}
        self._preempt = preemption_signal()

    def request(self) -> None:
        """Stop after the batch in flight, as a first Ctrl-C does; for a caller in another thread (the server's
        interrupt), where no signal handler is installed."""
        self.requested = True

    @property
    def preempted(self) -> bool:
        return self.signum == self._preempt

    @property
    def time_limited(self) -> bool:
        """Stopped by SIGTERM or preemption: a kill follows soon, so nothing slow should run now."""
        return self.requested and self.signum != signal.SIGINT

    def _handle(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT and self._signalled:
            raise Interrupted(signum)  # Ctrl-C again: abort now
        if self.requested:
            # a repeated SIGTERM is not an abort: Slurm signals every process of a job step and a launcher
            # (torchrun, accelerate) forwards the same signal again; the kill after the grace period is the hard stop
            return
        self._signalled = signum != self._preempt
        self.requested, self.signum = True, signum
        name = signal_name(signum)
        again = " (Ctrl-C again to abort now)" if signum == signal.SIGINT else ""
        print(f"t2i: interrupted ({name}); finishing the current batch, then stopping{again}", file=sys.stderr,
              flush=True)

    def hand_over(self) -> None:
        """Give the preemption signal to the handler that was there before (submitit: checkpoint, requeue)."""
        old = self._old.get(self._preempt)
        if self.preempted and callable(old):
            old(self._preempt, None)

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is not threading.main_thread():
            return self
        wanted = [signal.SIGINT, signal.SIGTERM]
        if callable(signal.getsignal(self._preempt)):  # submitit's checkpoint-and-requeue handler
            wanted.append(self._preempt)
        for signum in wanted:
            self._old[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, old in self._old.items():
            signal.signal(signum, old)
        if not self.preempted:
            self._old.clear()


def close_quietly(writer: Any) -> None:
    """Flush and stop an image writer whose error (if any) was already raised."""
    with contextlib.suppress(Exception):
        writer.close()
