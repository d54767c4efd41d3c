"""batch_size=auto on a GPU: grows while images/s rises and memory fits, settles, remembers; fixed elsewhere."""

from __future__ import annotations

import types

import pytest

from runner.generate import sizing
from runner.plan import ImageJob


def jobs(n: int, steps: int = 4) -> list[ImageJob]:
    return [ImageJob(i, "p", "", i, steps, 7.5, 64, 64, None, 0, (), None) for i in range(n)]


class FakeCuda:
    """A card whose batch of b takes `cost(b)` seconds and `base + per_image * b` bytes at peak."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cost, per_image: float, total: float) -> None:
        import torch

        self.now, self.cost, self.per_image, self.total, self.peak = 0.0, cost, per_image, total, 0.0
        monkeypatch.setattr(sizing.time, "perf_counter", lambda: self.now)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: self.peak)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda _: types.SimpleNamespace(total_memory=self.total))

    def run(self, sizer: sizing.BatchSizer, todo: list[ImageJob]) -> list[int]:
        sizes = []
        for batch in sizer.batches(todo):
            sizes.append(len(batch))
            self.now += self.cost(len(batch))
            self.peak = 1e9 + self.per_image * len(batch)
        return sizes


@pytest.fixture(autouse=True)
def fresh() -> None:
    sizing._TUNED.clear()


def test_grows_while_throughput_rises_then_keeps_the_best(monkeypatch: pytest.MonkeyPatch) -> None:
    card = FakeCuda(monkeypatch, lambda b: 0.2 + 0.05 * b, per_image=1e8, total=80e9)  # saturates near b=16
    sizer = sizing.BatchSizer(None, "cuda", shape_of=lambda j: ("m", 64))
    sizes = card.run(sizer, jobs(200))
    assert sizes[:5] == [2, 4, 8, 16, 32]  # 16 -> 32 still gains 9%, 32 -> 64 would gain under 5%...
    best = max((2, 4, 8, 16, 32, 64), key=lambda b: b / (0.2 + 0.05 * b))
    assert sizing._TUNED[("m", 64)] in (32, 64) and sizing._TUNED[("m", 64)] <= best
    assert set(sizes[6:-1]) == {sizing._TUNED[("m", 64)]}  # the rest of the run uses the settled size
    assert sum(sizes) == 200  # every image exactly once
    tuned = sizing._TUNED[("m", 64)]
    again = card.run(sizing.BatchSizer(None, "cuda", shape_of=lambda j: ("m", 64)), jobs(3 * tuned))
    assert again == [tuned] * 3  # remembered: a later run of the same shape does not probe again


def test_stops_before_the_memory_runs_out(monkeypatch: pytest.MonkeyPatch) -> None:
    card = FakeCuda(monkeypatch, lambda b: 0.01 * b ** 0.5, per_image=2e9, total=40e9)  # always faster, 2 GB/img
    sizes = card.run(sizing.BatchSizer(None, "cuda", shape_of=lambda j: ("m",)), jobs(100))
    settled = sizing._TUNED[("m",)]
    assert 1e9 + 2e9 * settled < 0.9 * 40e9 < 1e9 + 2e9 * 2 * settled  # the largest that fits in 90%
    assert max(sizes) == settled and sum(sizes) == 100


def test_an_out_of_memory_halving_caps_and_settles(monkeypatch: pytest.MonkeyPatch) -> None:
    card = FakeCuda(monkeypatch, lambda b: 0.1 * b, per_image=1e8, total=80e9)
    cap: dict[str, int | None] = {"v": None}
    sizer = sizing.BatchSizer(None, "cuda", shape_of=lambda j: (), cap=lambda: cap["v"])
    out = []
    for batch in sizer.batches(jobs(40)):
        out.append(len(batch))
        card.now += 0.1 * len(batch)
        if len(out) == 2:
            cap["v"] = 3  # the fault handler halved a batch after an out-of-memory error
    assert out[:2] == [2, 4] and set(out[2:-1]) == {3} and out[-1] <= 3 and sum(out) == 40
    assert sizing._TUNED[()] == 3


def test_fixed_sizes_on_cpu_and_when_given() -> None:
    assert {len(b) for b in sizing.BatchSizer(None, "cpu").batches(jobs(12))} == {sizing.CPU_BATCH}
    assert [len(b) for b in sizing.BatchSizer(5, "cuda").batches(jobs(12))] == [5, 5, 2]
    assert not sizing._TUNED


def test_groups_never_mix_and_shapes_tune_separately(monkeypatch: pytest.MonkeyPatch) -> None:
    card = FakeCuda(monkeypatch, lambda b: 0.2 + 0.05 * b, per_image=1e8, total=80e9)
    mixed = jobs(20) + [ImageJob(100 + i, "p", "", i, 8, 7.5, 64, 64, None, 0, (), None) for i in range(20)]
    sizer = sizing.BatchSizer(None, "cuda", shape_of=lambda j: (j.steps,))
    for batch in sizer.batches(mixed):
        assert len({j.steps for j in batch}) == 1
        card.now += 0.2 + 0.05 * len(batch)
    assert set(sizing._TUNED) <= {(4,), (8,)}
