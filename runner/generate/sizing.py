"""`batch_size=auto`: on a GPU, the batch size is measured on the run's own images, not guessed.

The first batches of a run grow (2, 4, 8, …) while images/s still rises by at least `MIN_GAIN` and the next size
is predicted to fit in memory (from the peak memory of the sizes already run); then the best size is kept for the
rest of the run and remembered for later runs of the same shape in this process. No image is wasted on probing:
the probe batches are real images (each records the batch size that made it). On cpu/mps a fixed size is used:
there batch-invariant generation runs each image on its own anyway.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..plan import ImageJob, batches

log = logging.getLogger(__name__)
CPU_BATCH = 4
GPU_BATCH = 16  # when probing is off (compile: each new batch shape would compile again); measured good on H200
MIN_GAIN = 0.05  # grow only while images/s improves by at least 5%
MEMORY_HEADROOM = 0.9  # never plan past 90% of the card's memory
MAX_BATCH = 64
_TUNED: dict[tuple, int] = {}  # shape -> measured best size, per process


@dataclass
class BatchSizer:
    """Yields the run's batches; with `size=None` on cuda, tunes the size per batch shape from timed batches."""

    size: int | None  # the user's batch_size, or None for auto
    device: str
    shape_of: Callable[[ImageJob], tuple] = lambda job: ()  # what one tuning is valid for (model, size, CFG…)
    cap: Callable[[], int | None] = lambda: None  # the fault handler's size after an out-of-memory halving
    probe: bool = True  # False: a measured size from earlier runs, else GPU_BATCH (no new batch shapes)
    timings: dict[tuple, list[tuple[int, float, int]]] = field(default_factory=dict)  # (batch, s, peak bytes)

    def _tuning(self, shape: tuple) -> bool:
        return self.size is None and self.device == "cuda" and self.probe and shape not in _TUNED

    def current(self, shape: tuple) -> int:
        """The size of the next batch of this shape."""
        cap = self.cap()
        if self.size is not None:
            size = self.size
        elif self.device != "cuda":
            size = CPU_BATCH
        elif shape in _TUNED:
            size = _TUNED[shape]
        elif not self.probe:
            size = GPU_BATCH
        elif cap:  # an out-of-memory halving while probing: that is the size that fits
            size = self._settle(shape, cap, "out of memory above it")
        else:
            size = self._next_probe(shape)
        return min(size, cap) if cap else size

    def _next_probe(self, shape: tuple) -> int:
        timings = self.timings.get(shape, [])
        if not timings:
            return 2
        (b, secs, _), best = timings[-1], max(timings, key=lambda t: t[0] / t[1])
        if len(timings) > 1:
            prev_b, prev_s, _ = timings[-2]
            if b / secs < (1 + MIN_GAIN) * (prev_b / prev_s):
                return self._settle(shape, best[0], "images/s stopped rising")
        nxt = min(2 * b, MAX_BATCH)
        if nxt == b:
            return self._settle(shape, best[0], "the largest size")
        if not self._fits(timings, nxt):
            return self._settle(shape, best[0], "the next size would not fit")
        return nxt

    @staticmethod
    def _fits(timings: list[tuple[int, float, int]], batch: int) -> bool:
        """Linear extrapolation of peak memory from the sizes run so far."""
        import torch

        total = torch.cuda.get_device_properties(0).total_memory
        if len(timings) < 2:
            b, _, peak = timings[-1]
            return peak * batch / b < MEMORY_HEADROOM * total
        (b0, _, p0), (b1, _, p1) = timings[-2:]
        per_image = max(0.0, (p1 - p0) / max(1, b1 - b0))
        return p1 + per_image * (batch - b1) < MEMORY_HEADROOM * total

    def _settle(self, shape: tuple, size: int, why: str) -> int:
        _TUNED[shape] = size
        rates = ", ".join(f"b{b}: {b / s:.2f} img/s" for b, s, _ in self.timings.get(shape, []))
        log.info("batch_size=auto: %d (%s; %s)", size, why, rates or "no timing")
        return size

    def batches(self, jobs: list[ImageJob]) -> Iterator[list[ImageJob]]:
        """Batches of `jobs` (grouped as plan.batches groups them), each sized by `current()` when it starts."""
        for group in batches(jobs, max(1, len(jobs))):
            shape, start = self.shape_of(group[0]), 0
            while start < len(group):
                want = self.current(shape)
                chunk = group[start:start + want]
                start += len(chunk)
                timed = self._tuning(shape) and len(chunk) == want
                if timed:
                    import torch

                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    began = time.perf_counter()
                yield chunk  # the caller generates and hands the images over before asking for the next one
                if timed:
                    torch.cuda.synchronize()
                    self.timings.setdefault(shape, []).append(
                        (len(chunk), time.perf_counter() - began, torch.cuda.max_memory_allocated()))
