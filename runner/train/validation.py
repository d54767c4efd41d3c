"""Samples while training: at every checkpoint, the sample prompts x seeds rendered by the shared runner
(`runner.run.run`) into ONE run dir, `samples/`, whose LoRA-set axis is the training step (`step-000020`,
`step-000040`, …; the base model first with `validation.include_base`). Each checkpoint's LoRA is copied into
`samples/loras/` (pruned checkpoints keep their samples), and the runner's resume makes only the new step's
images, with the same seeds each time, so the viewer shows the training progress as a grid."""

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


def render(spec: TrainSpec, prompts: list[str], lora_file: Path, name: str, size: int, out: Path, step: int) -> int:
    """Add step `step` (the LoRA `lora_file`) to the sample run dir `out`; return how many images were made."""

    import torch

    from ..common.io import atomic_write_bytes
    from ..run import run

    if not prompts:
        return 0
    v = spec.validation
    loras = out / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(loras / f"step-{step:06d}.safetensors", lora_file.read_bytes())
    steps = sorted(p.stem for p in loras.glob("step-*.safetensors"))
    sets = [[{"source": str(loras / f"{s}.safetensors"), "name": s}] for s in steps]
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
        "lora_sets": ([[]] if v.include_base else []) + sets,
        "max_loaded_loras": 1,
        "resume": True,
        "grid": {"enabled": True, "x": "lora_set", "y": "prompt"},
    }
    grad = torch.is_grad_enabled()
    try:
        result = run(validate(cfg), out, progress=False)
    finally:
        torch.set_grad_enabled(grad)  # the runner turns autograd off for inference
    return result.generated
