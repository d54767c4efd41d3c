"""t2i-train's adapter types (peft's DoRA, LoHa, LoKr) on an SD UNet and a Flux transformer: the LyCORIS/kohya
file's change of every weight equals peft's own merge of the saved peft file (alpha != rank, so the scale is
checked), and the LyCORIS file changes the runner's image; text-encoder LoRAs: both files give the same pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from runner.config import ModelConfig, validate

CASES = [("sd15", "tiny", t) for t in ("dora", "loha", "lokr")] + [("flux1", "tiny-flux1", t)
                                                                   for t in ("dora", "loha", "lokr")]


def _data(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rgb in {"red": (220, 30, 30), "blue": (30, 40, 220)}.items():
        Image.new("RGB", (32, 32), rgb).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {name} square")
    return folder


def _peft_deltas(family: str, model: str, lora: Path, kind: str) -> dict[str, torch.Tensor]:
    """Every adapted weight's change, by peft itself, from the saved peft-format (diffusers) file."""
    from diffusers import DiffusionPipeline
    from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import safe_open

    from runner.models.tiny import ensure_tiny

    pipe = DiffusionPipeline.from_pretrained(str(ensure_tiny(family)))
    denoiser = pipe.unet if family == "sd15" else pipe.transformer
    prefix = "unet." if family == "sd15" else "transformer."
    with safe_open(str(lora), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118
    conf = {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}
    cls = {"loha": LoHaConfig, "lokr": LoKrConfig}.get(kind, LoraConfig)
    config = cls(**{k: v for k, v in conf.items() if k in cls.__dataclass_fields__ and k != "peft_type"})
    inject_adapter_in_model(config, denoiser, "t")
    set_peft_model_state_dict(denoiser, state, "t")
    out = {}
    for name, module in denoiser.named_modules():
        if hasattr(module, "get_delta_weight") and "t" in getattr(module, "active_adapters", ["t"]):
            w0 = module.get_base_layer().weight.detach().clone()
            module.merge(adapter_names=["t"])
            out[f"{prefix}{name}"] = module.get_base_layer().weight.detach() - w0
            module.unmerge()
    return out


@pytest.mark.parametrize(("family", "model", "kind"), CASES)
@pytest.mark.slow
def test_adapter_type_trains_and_matches_peft(family: str, model: str, kind: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from runner.lora.detect import detect_state
    from runner.lora.lycoris import file_deltas
    from runner.models.loading import load_model
    from runner.run import run
    from runner.train.loop import train

    cfg = {"model": {"id": f"builtin:{model}"}, "data": {"dir": str(_data(tmp_path / "d")), "resolution": 32},
           "lora": {"type": kind, "rank": 4, "alpha": 2.0, "name": "x"},  # scale 0.5: alpha is applied
           "train": {"steps": 2, "lr": 5e-2, "batch_size": 2, "checkpoint_every": 2},
           "validation": {"prompts": []}, "progress": False}
    result = train(cfg, tmp_path / "run")
    kohya = load_file(str(result.kohya_file))
    suffix = {"dora": ".dora_scale", "loha": ".hada_w1_a", "lokr": ".lokr_w1"}[kind]
    assert any(k.endswith(suffix) for k in kohya), sorted(kohya)[:4]

    # 1. The LyCORIS/kohya file's maths (the runner's merge engine) equals peft's merge of the peft file.
    want = _peft_deltas(family, model, result.lora_file, kind)
    pipe = load_model(ModelConfig(id=f"builtin:{model}"), "cpu").pipe
    got = file_deltas(pipe, kohya, detect_state(kohya), str(result.kohya_file))
    assert set(got) == set(want) and want
    for path, delta in got.items():
        base = pipe
        for part in path.split("."):
            base = getattr(base, part)
        torch.testing.assert_close(delta(base.weight.detach()), want[path], atol=1e-5, rtol=1e-4)
    assert max(float(w.abs().max()) for w in want.values()) > 1e-4  # trained: not the zero change

    # 2. The LyCORIS/kohya file in the runner changes the image. (The peft-keys file's scale, from its peft
    # config, is checked against peft in tests/test_lora_peft_scale.py.)
    sets = [[], [{"source": str(result.kohya_file)}]]
    r = run(validate({"model": {"id": f"builtin:{model}"}, "prompts": ["a red square"], "seeds": [0], "steps": 2,
                      "width": 32, "height": 32, "lora_sets": sets, "grid": {"enabled": False}}),
            tmp_path / "out", progress=False)
    img = {e["lora_set"]: np.asarray(Image.open(tmp_path / "out" / e["file"]).convert("RGB")).astype(int)
           for e in r.entries}
    assert np.abs(img[0] - img[1]).mean() > 0.1  # small (2 steps at scale 0.5), but there

@pytest.mark.parametrize("model", ["tiny-flux1", "tiny-sdxl"])
@pytest.mark.slow
def test_text_encoder_lora_both_files_equal(model: str, tmp_path: Path) -> None:
    from safetensors import safe_open

    from runner.run import run
    from runner.train.loop import train

    cfg = {"model": {"id": f"builtin:{model}"}, "data": {"dir": str(_data(tmp_path / "d")), "resolution": 32},
           "lora": {"rank": 4, "text_encoder": True, "name": "te"},
           "train": {"steps": 2, "lr": 5e-2, "batch_size": 2, "checkpoint_every": 2},
           "validation": {"prompts": []}, "progress": False}
    result = train(cfg, tmp_path / "run")
    with safe_open(str(result.kohya_file), "pt") as f:
        assert any(k.startswith("lora_te1_text_model_") for k in f.keys())  # noqa: SIM118
    with safe_open(str(result.lora_file), "pt") as f:
        assert any(k.startswith("text_encoder.") for k in f.keys())  # noqa: SIM118
    sets = [[], [{"source": str(result.lora_file)}], [{"source": str(result.kohya_file)}]]
    r = run(validate({"model": {"id": f"builtin:{model}"}, "prompts": ["a red square"], "seeds": [0], "steps": 2,
                      "width": 32, "height": 32, "lora_sets": sets, "grid": {"enabled": False}}),
            tmp_path / "out", progress=False)
    img = {e["lora_set"]: np.asarray(Image.open(tmp_path / "out" / e["file"]).convert("RGB")).astype(int)
           for e in r.entries}
    assert np.abs(img[1] - img[2]).max() <= 1 and np.abs(img[0] - img[1]).mean() > 0.5
