"""t2i-train on an int8 base (`train.quantize_base=int8`, torchao + peft): the denoiser's Linear weights are int8
tensors under peft's torchao LoRA layers, training runs (finite loss that moves the LoRA), the LoRA file loads in
the runner and changes its image, and the setting is in the run config and the file's metadata; without torchao,
or with another mode, one line before the model loads."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from runner.common.errors import ConfigError


def _cfg(data: Path, **train: object) -> dict:
    return {"model": {"id": "builtin:tiny"}, "data": {"dir": str(data), "resolution": 32},
            "lora": {"rank": 4, "name": "q", "preset": "attn_mlp"},
            "train": {"steps": 3, "lr": 1e-2, "checkpoint_every": 3, "quantize_base": "int8", **train},
            "validation": {"prompts": []}, "progress": False}


def test_int8_base_trains_and_its_lora_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runner.config import validate
    from runner.run import run
    from runner.train import loop
    from runner.train.quant import is_quantized

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(data / "red.png")
    (data / "red.txt").write_text("a red square")
    seen = []
    quantize = loop.quantize_denoiser
    monkeypatch.setattr(loop, "quantize_denoiser", lambda m, mode: (seen.append(m), quantize(m, mode))[1])
    result = loop.train(_cfg(data), tmp_path / "run")

    # 1. the base weights under the LoRA layers are int8 tensors, a quarter of their fp32 bytes
    (unet,) = seen
    wrapped = [m for m in unet.modules() if type(m).__name__ == "TorchaoLoraLinear"]
    assert len(wrapped) >= 8
    for m in wrapped:
        w = m.get_base_layer().weight
        assert is_quantized(w) and w.qdata.dtype == torch.int8 and w.qdata.shape == w.shape
    # every other Linear of the UNet too (the adapters' own lora_A/lora_B stay fp32)
    assert not [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and ".lora_" not in n
                and not is_quantized(m.weight)]
    assert all(p.dtype == torch.float32 for n, p in unet.named_parameters() if p.requires_grad)
    # 2. it trained: finite losses, a LoRA that moved, the setting recorded
    assert result.last_loss is not None and np.isfinite(result.last_loss)
    with safe_open(str(result.lora_file), "pt") as f:
        assert f.metadata()["ss_quantize_base"] == "int8"
        ups = [f.get_tensor(k) for k in f.keys() if "lora_B" in k or "lora.up" in k]  # noqa: SIM118
    assert ups and max(float(u.abs().max()) for u in ups) > 1e-3
    assert "quantize_base: int8" in (result.run_dir / "train_config.yaml").read_text()
    # 3. the file loads in the runner (full-precision base) and changes the image
    cfg = {"model": {"id": "builtin:tiny"}, "prompts": ["a red square"], "seeds": [0], "steps": 2, "width": 32,
           "height": 32, "lora_sets": [[], [{"source": str(result.lora_file)}]], "grid": {"enabled": False}}
    entries = run(validate(cfg), tmp_path / "sweep", progress=False).entries
    a, b = (np.asarray(Image.open(tmp_path / "sweep" / e["file"])).astype(int) for e in entries)
    assert np.abs(a - b).max() > 0


def test_quantize_mode_and_missing_package_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runner.train.config import validate_train

    cfg = _cfg(tmp_path, quantize_base="int4")
    with pytest.raises(ConfigError, match=r"^train.quantize_base='int4' is not valid; valid: null, int8$"):
        validate_train(cfg)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"needs the torchao package.*t2i-runner\[train-quant\]"):
        validate_train(_cfg(tmp_path))
    assert validate_train(_cfg(tmp_path, quantize_base=None)).train.quantize_base is None
