"""Validation images at checkpoints, rendered by the shared runner (`runner.run.run`) like any t2i output."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import validate
from .config import TrainSpec


def default_prompts(spec: TrainSpec, captions: list[str]) -> list[str]:
    """The configured validation prompts, else up to two distinct captions of the data set."""
    if spec.validation.prompts is not None:
        return list(spec.validation.prompts)
    return list(dict.fromkeys(captions))[:2]


def render(spec: TrainSpec, prompts: list[str], lora_file: Path, name: str, size: int, out: Path) -> int:
    """Generate the validation prompts x seeds with the LoRA (and base model if asked); return the count."""
    import torch

    from ..run import run

    if not prompts:
        return 0
    v = spec.validation
    lora = {"source": str(lora_file), "name": name}
    cfg = {
        "model": dataclasses.asdict(spec.model),
        "prompts": prompts,
        "seeds": list(v.seeds),
        "steps": v.steps,
        "guidance_scale": v.guidance_scale,
        "scheduler": v.scheduler,
        "width": size,
        "height": size,
        "device": spec.device,
        "lora_sets": ([[]] if v.include_base else []) + [[lora]],
        "max_loaded_loras": 1,
        "resume": True,
        "grid": {"enabled": False},
    }
    grad = torch.is_grad_enabled()
    try:
        result = run(validate(cfg), out, progress=False)
    finally:
        torch.set_grad_enabled(grad)  # the runner turns autograd off for inference
    return result.generated
