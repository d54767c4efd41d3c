"""peft-keys adapter files (diffusers' `save_lora_weights`: peft key names, the peft config in
`lora_adapter_metadata`, no `.alpha` tensors) apply in this runner at peft's own alpha/r: each weight's change
through the runner's loader and merge engine equals peft's merge of the same adapter, for LoRA, DoRA, LoHa and LoKr
at alpha/r = 0.5, 1 and 2 (and per-module `alpha_pattern`/`rank_pattern`, rsLoRA)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from runner.common.hashing import file_sha256
from runner.lora.adapters import AdapterManager
from runner.lora.files import ResolvedLora

RANK = 4
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _config(kind: str, alpha: float, extra: dict):
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if kind in ("lora", "dora"):
        return LoraConfig(r=RANK, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False,
                          use_dora=kind == "dora", **extra)
    cls = LoHaConfig if kind == "loha" else LoKrConfig
    return cls(r=RANK, alpha=alpha, target_modules=TARGETS, init_weights=False, **extra)


def _peft_file(folder: Path, kind: str, alpha: float, extra: dict) -> tuple[Path, dict[str, torch.Tensor]]:
    """An adapter built and merged by peft on a fresh copy of the tiny UNet: (the diffusers-saved file, each
    module's change by peft's own `merge`)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import get_peft_model_state_dict, inject_adapter_in_model

    from runner.models.tiny import ensure_tiny

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(str(ensure_tiny("sd15") / "unet"))
    config = _config(kind, alpha, extra)
    inject_adapter_in_model(config, unet, "default")
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_magnitude_vector" in name:  # a trained magnitude, not ||W||: the decomposition matters
                p.mul_(1 + 0.3 * torch.rand_like(p))
    changes = {}
    for name, module in unet.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "merge"):
            w0 = module.get_base_layer().weight.detach().clone()
            module.merge(adapter_names=["default"])
            changes[f"unet.{name}"] = module.get_base_layer().weight.detach().float() - w0.float()
            module.unmerge()
    meta = config.to_dict()
    meta["target_modules"] = sorted(meta["target_modules"])
    StableDiffusionPipeline.save_lora_weights(folder, weight_name=f"{kind}.safetensors",
                                              unet_lora_layers=get_peft_model_state_dict(unet),
                                              unet_lora_adapter_metadata=meta)
    return folder / f"{kind}.safetensors", changes


@pytest.fixture(scope="module")
def pipe():
    from runner.config import ModelConfig
    from runner.models.loading import load_model

    return load_model(ModelConfig(id="builtin:tiny"), "cpu").pipe


CASES = [(k, s, {}) for k in ("dora", "loha", "lokr") for s in (0.5, 1.0, 2.0)] + [
    ("lora", 2.0, {}),  # plain LoRA: diffusers' loader gets no file metadata from a state dict
    ("lora", 2.0, {"use_rslora": True}),  # alpha/sqrt(r) = 4, not alpha/r = 2
    ("dora", 1.0, {"alpha_pattern": {"to_k": 8.0}, "rank_pattern": {"to_v": 2}}),
    ("loha", 2.0, {"alpha_pattern": {"to_out.0": 1.0}}),
]


@pytest.mark.parametrize(("kind", "scale", "extra"), CASES)
def test_peft_file_applies_at_peft_scale(pipe, kind: str, scale: float, extra: dict, tmp_path: Path) -> None:
    file, want = _peft_file(tmp_path, kind, scale * RANK, extra)
    with open(file, "rb") as f:  # the file is what diffusers writes: peft keys, the config in the metadata
        assert b"lora_adapter_metadata" in f.read(20000)
    r = ResolvedLora(kind, str(file), None, str(file), file_sha256(file))
    modules = {p: pipe.unet.get_submodule(p.removeprefix("unet.")) for p in want}
    before = {p: m.weight.detach().clone() for p, m in modules.items()}
    manager = AdapterManager(pipe)
    manager.merge = True  # a plain LoRA loads into peft layers: the engine multiplies it out at peft's scale
    try:
        for weight in (1.0, 2.0) if kind in ("lora", "loha", "lokr") else (1.0,):
            manager.activate((r,), (weight,))
            for p, m in modules.items():
                base = m.get_base_layer() if hasattr(m, "get_base_layer") else m
                got = base.weight.detach().float() - before[p].float()
                torch.testing.assert_close(got, weight * want[p], rtol=1e-4, atol=1e-6,
                                           msg=lambda e, p=p: f"{kind} alpha/r={scale} {p}: {e}")
    finally:
        manager.activate((), ())
        manager._forget(r.adapter)
    assert max(float(w.abs().max()) for w in want.values()) > 1e-3
    for p, m in modules.items():
        assert torch.equal(m.weight, before[p])


def test_inspect_reports_peft_alpha(tmp_path: Path) -> None:
    from runner.lora.detect import detect_file

    file, _ = _peft_file(tmp_path, "loha", 2.0, {})
    info = detect_file(file)
    assert info.alphas == [2.0] and {m.scale for m in info.modules.values()} == {0.5}
    assert json.loads(info.metadata["lora_adapter_metadata"])["unet.alpha"] == 2.0
