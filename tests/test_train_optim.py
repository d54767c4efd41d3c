"""t2i-train's optimizers and EMA: Prodigy + EMA + gradient accumulation resume bit for bit; EMA decay 0 is the
plain run and a real decay differs; an optimizer whose package is absent is one line before anything loads."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from runner.common.errors import ConfigError


def _cfg(data: Path, **train: object) -> dict:
    return {"model": {"id": "builtin:tiny-flux1"}, "data": {"dir": str(data), "resolution": 32},
            "lora": {"rank": 4, "name": "x"},
            "train": {"steps": 4, "lr": 1e-2, "batch_size": 1, "gradient_accumulation": 2, "checkpoint_every": 2,
                      **train},
            "validation": {"prompts": []}, "progress": False}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    for name, rgb in {"red": (220, 30, 30), "blue": (30, 40, 220)}.items():
        Image.new("RGB", (32, 32), rgb).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {name} square")
    return folder


def test_prodigy_with_ema_and_accumulation_resumes_exactly(data: Path, tmp_path: Path) -> None:
    from runner.train.loop import train

    cfg = _cfg(data, optimizer="prodigy", lr=1.0, ema_decay=0.9)
    full = train(cfg, tmp_path / "full")
    part = tmp_path / "part"
    shutil.copytree(full.run_dir, part, ignore=shutil.ignore_patterns("step-000004", "x.safetensors",
                                                                       "x_kohya.safetensors"))
    again = train(cfg, part)
    assert again.start_step == 2
    a, b = load_file(str(full.lora_file)), load_file(str(again.lora_file))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ema_is_the_average(data: Path, tmp_path: Path) -> None:
    from runner.train.loop import train

    plain = load_file(str(train(_cfg(data), tmp_path / "plain").lora_file))
    zero = load_file(str(train(_cfg(data, ema_decay=0.0), tmp_path / "zero").lora_file))
    avg = load_file(str(train(_cfg(data, ema_decay=0.9), tmp_path / "avg").lora_file))
    assert all(torch.equal(plain[k], zero[k]) for k in plain)  # decay 0: the average is the last weights
    up = [k for k in plain if "lora_B" in k]
    # B starts at zero: after 4 steps, the 0.9-average has moved about 1 - 0.9^4 (0.34) of the way
    assert sum(float(avg[k].abs().sum()) for k in up) < 0.6 * sum(float(plain[k].abs().sum()) for k in up)


def test_missing_optimizer_package_is_one_line(monkeypatch: pytest.MonkeyPatch, data: Path) -> None:
    from runner.train.config import validate_train

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"train.optimizer=adamw8bit needs the bitsandbytes package"):
        validate_train(_cfg(data, optimizer="adamw8bit"))
