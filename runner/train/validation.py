"""Samples while training: at every checkpoint, the sample prompts x seeds rendered by the shared runner
(`runner.run.run`) into ONE run dir, `samples/`, in which `step` is a sweep axis: each image's manifest line holds
the training step of its LoRA (`step: 20`; the base model is step 0 with `validation.include_base`), the grids put
the steps across and the prompts down, and the viewer offers `step` as an axis. Each checkpoint's LoRA is copied
into `samples/loras/` (pruned checkpoints keep their samples' LoRA source), with the same seeds each time."""

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
    from ..common.io import atomic_write_bytes
    from ..outputs.manifest import Manifest

    if not prompts:
        return 0
    loras = out / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    kept = loras / f"step-{step:06d}.safetensors"  # the images' LoRA source stays when the checkpoint is pruned
    atomic_write_bytes(kept, lora_file.read_bytes())
    made = 0
    if spec.validation.include_base and not any(e.get("step") == 0 for e in Manifest(out).entries()):
        made += _sweep(spec, prompts, [], size, out, 0)  # the base model: step 0
    return made + _sweep(spec, prompts, [{"source": str(kept), "name": kept.stem}], size, out, step)


def _sweep(spec: TrainSpec, prompts: list[str], loras: list[dict], size: int, out: Path, step: int) -> int:
    """The prompts x seeds with one LoRA set into `out`, each image's manifest line labelled `step`."""
    import torch

    from ..run import run

    v = spec.validation
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
        "lora_sets": [loras],
        "max_loaded_loras": 1,
        "resume": True,
        "grid": {"enabled": True, "x": "step", "y": "prompt"},
    }
    run_spec = validate(cfg)
    run_spec = dataclasses.replace(run_spec, extra={**run_spec.extra, "labels": {"step": step}})
    grad = torch.is_grad_enabled()
    try:
        result = run(run_spec, out, progress=False)
    finally:
        torch.set_grad_enabled(grad)  # the runner turns autograd off for inference
    return result.generated
