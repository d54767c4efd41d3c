"""The `perf:` fast path: each option applies, reverts, keeps pixels (to float rounding), errors clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from runner.config import ConfigError, PerfConfig, validate
from runner.generate.fastpath import apply_perf
from runner.models.loading import load_model
from runner.run import run


def _cfg(tiny_dir: Path, lora_sets: list, **perf) -> dict:
    return {
        "model": {"id": str(tiny_dir)},
        "prompts": ["a red fox"],
        "seeds": [3],
        "steps": 2,
        "width": 32,
        "height": 32,
        "device": "cpu",
        "lora_sets": lora_sets,
        "perf": perf,
        "grid": {"enabled": False},
    }


def _pixels(tiny_dir: Path, out: Path, lora_sets: list, **perf) -> list[np.ndarray]:
    result = run(validate(_cfg(tiny_dir, lora_sets, **perf)), out, progress=False)
    entries = sorted(result.entries, key=lambda e: e["index"])
    return [np.asarray(Image.open(out / e["file"]).convert("RGB"), dtype=np.int16) for e in entries]


def _state(tiny_dir: Path):
    return load_model(validate(_cfg(tiny_dir, [[]])).model, "cpu")


@pytest.mark.slow
def test_fuse_qkv_keeps_pixels_and_merges_lora_sets(tiny_dir: Path, tmp_path: Path, lora_a: dict) -> None:
    (base,) = _pixels(tiny_dir, tmp_path / "base", [[]])
    (fused,) = _pixels(tiny_dir, tmp_path / "fused", [[]], fuse_qkv=True)
    assert _state(tiny_dir).perf_state.fused_qkv
    assert np.abs(base - fused).max() <= 2  # same image up to float rounding
    lora_plain = _pixels(tiny_dir, tmp_path / "lp", [[], [lora_a]])
    assert not _state(tiny_dir).perf_state.fused_qkv
    lora_fast = _pixels(tiny_dir, tmp_path / "lf", [[], [lora_a]], fuse_qkv=True)
    loaded = _state(tiny_dir)
    assert loaded.perf_state.fused_qkv and loaded.adapters.merge  # fused QKV needs merged LoRAs
    assert np.abs(lora_plain[1] - lora_fast[1]).max() <= 2
    assert np.abs(lora_plain[1] - lora_plain[0]).max() > 10  # the LoRA really changes the image
    (fused_again,) = _pixels(tiny_dir, tmp_path / "fa", [[]], fuse_qkv=True)  # adapters loaded but unused
    assert _state(tiny_dir).perf_state.fused_qkv
    assert np.array_equal(fused, fused_again)  # the LoRA merged before is not baked into the fused copy


@pytest.mark.slow
def test_fuse_lora_matches_unfused_and_restores_base(
    tiny_dir: Path, tmp_path: Path, lora_a: dict, lora_b: dict
) -> None:
    sets = [[], [lora_a], [lora_a, {**lora_b, "scale": 0.5}]]
    plain = _pixels(tiny_dir, tmp_path / "plain", sets)
    fused = _pixels(tiny_dir, tmp_path / "fused", sets, fuse_lora=True)
    assert _state(tiny_dir).adapters.merge
    for p, f in zip(plain, fused, strict=True):
        assert np.abs(p - f).max() <= 2
    assert np.abs(plain[2] - plain[1]).max() > 10
    again = _pixels(tiny_dir, tmp_path / "again", sets)  # fusing undone: the plain path gives the same pixels
    assert not _state(tiny_dir).adapters.merge
    for p, a in zip(plain, again, strict=True):
        assert np.array_equal(p, a)  # base weights restored exactly, not by subtraction


@pytest.mark.slow
def test_many_fuse_switches_leave_base_weights_bit_exact(tiny_dir: Path, tmp_path: Path, lora_a: dict,
                                                          lora_b: dict) -> None:
    pipe = _state(tiny_dir).pipe
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    sets = [[lora_a], [lora_b], [lora_a, {**lora_b, "scale": 0.7}]]
    for i in range(3):
        _pixels(tiny_dir, tmp_path / f"r{i}", sets, fuse_lora=True)
    _pixels(tiny_dir, tmp_path / "plain", [[]])  # back to the plain path: everything unmerged
    after = {k: v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_channels_last_applied_and_reverted(tiny_dir: Path, tmp_path: Path) -> None:
    import torch

    (base,) = _pixels(tiny_dir, tmp_path / "base", [[]])
    (fast,) = _pixels(tiny_dir, tmp_path / "cl", [[]], channels_last=True)
    weight = _state(tiny_dir).pipe.unet.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert np.abs(base - fast).max() <= 2
    _pixels(tiny_dir, tmp_path / "back", [[]])
    assert _state(tiny_dir).pipe.unet.conv_in.weight.is_contiguous()


def test_compile_is_wired_and_reversible(tiny_dir: Path) -> None:
    loaded = _state(tiny_dir)
    apply_perf(loaded, PerfConfig(compile=True), uses_loras=True)
    assert loaded.perf_state.compiled and loaded.pipe.unet._compiled_call_impl is not None
    assert loaded.adapters is None or loaded.adapters.merge
    apply_perf(loaded, PerfConfig(), uses_loras=False)
    assert not loaded.perf_state.compiled and loaded.pipe.unet._compiled_call_impl is None


def test_compile_errors_are_one_line(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = _state(tiny_dir)
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(ConfigError, match=r"perf.compile=true on cpu needs a C\+\+ compiler"):
        apply_perf(loaded, PerfConfig(compile=True), uses_loras=False)
    monkeypatch.setattr(loaded, "device", "mps")
    with pytest.raises(ConfigError, match="not supported on device=mps"):
        apply_perf(loaded, PerfConfig(compile=True), uses_loras=False)
    assert not loaded.perf_state.compiled


def test_perf_config_validation(tiny_dir: Path) -> None:
    spec = validate(_cfg(tiny_dir, [[]], writer_threads=3, channels_last=True))
    assert spec.perf == PerfConfig(channels_last=True, writer_threads=3, fuse_lora="auto", compile="auto")
    with pytest.raises(ConfigError, match=r"perf.fuse_lora='yes' is not valid; valid: auto, true, false"):
        validate(_cfg(tiny_dir, [[]], fuse_lora="yes"))
    with pytest.raises(ConfigError, match="perf.writer_threads=0 is out of range"):
        validate(_cfg(tiny_dir, [[]], writer_threads=0))


def test_auto_perf_resolves_per_device_and_run_length() -> None:
    from runner.generate.fastpath import COMPILE_AUTO_MIN_IMAGE_STEPS, image_steps, resolve_perf
    from runner.plan import ImageJob

    auto = PerfConfig()
    assert (auto.fuse_lora, auto.compile) == ("auto", "auto")
    cpu = resolve_perf(auto, "cpu", 1e9)
    assert (cpu.fuse_lora, cpu.compile) == (False, False)  # measured on cuda only: cpu keeps the exact peft path
    short = resolve_perf(auto, "cuda", COMPILE_AUTO_MIN_IMAGE_STEPS - 1)
    assert (short.fuse_lora, short.compile) == (True, False)
    assert resolve_perf(auto, "cuda", COMPILE_AUTO_MIN_IMAGE_STEPS).compile
    assert not resolve_perf(PerfConfig(compile=False), "cuda", 1e9).compile  # an explicit value wins
    assert resolve_perf(PerfConfig(fuse_lora=True), "cpu", 0).fuse_lora
    jobs = [ImageJob(0, "p", "", 0, 30, 7.5, 1024, None, None, 0, (), None)]
    assert image_steps(jobs, (512, 512)) == 30 * 2  # 1024x512 is two 512x512 images' worth
