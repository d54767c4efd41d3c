"""A1111's Hires checkpoint (`hires.model`): the second pass of hires. fix on another model of the same family,
resolved and checked before anything loads, loaded once per process next to the first pass's (the process cache
of models/loading.py), and found by the second pass through the first pass's pipeline."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..common.errors import ConfigError


def hires_model_infos(spec: Any, info: Any, where: str = "") -> dict[str, Any]:
    """{hires.model: ModelInfo} of the run for a first pass on `info`: each must be of the same family (the second
    pass continues from the first pass's latents), and, as LoRAs are attached to the first pass's pipeline only,
    a run with LoRAs names none."""
    from .info import model_info

    out: dict[str, Any] = {}
    for hr in spec.hires:
        if hr is None or not hr.model or hr.model in out:
            continue
        cfg = dataclasses.replace(info.config, id=hr.model, revision=None, pipeline="auto", config=None,
                                  family=None, settings={}, transformer=None)
        hinfo = model_info(cfg, "hires.model")
        if hinfo.family.name != info.family.name:
            raise ConfigError(f"{where}hires.model={hr.model!r} is a {hinfo.family.label} model, the first pass's "
                              f"{info.config.id!r} a {info.family.label} one; the hires. fix pass needs a model of "
                              "the same family (it continues from the first pass's latents)")
        if any(loras for loras in spec.lora_sets):
            raise ConfigError(f"{where}hires.model={hr.model!r} with LoRAs: this runner applies LoRAs to the first "
                              "pass's model only; leave hires.model unset (the same checkpoint) or run without LoRAs")
        out[hr.model] = hinfo
    return out


def load_hires_models(loaded: Any, spec: Any, infos: dict[str, Any]) -> None:
    """Load the hires. fix checkpoints (once per process) with the run's embeddings, and attach them to the first
    pass's pipeline for the second pass (generate/hires.py `hires_pipe`)."""
    from .embeddings import apply_embeddings
    from .loading import load_model
    from .memory import apply_memory

    models = {}
    for mid, hinfo in infos.items():
        second = load_model(hinfo.config, spec.device, hinfo, spec.memory.offload)
        second.pipe._t2i_scheduler_for = second.scheduler_for
        apply_memory(second, spec.memory)
        apply_embeddings(second, spec.embeddings)
        models[mid] = second
    loaded.pipe._t2i_hires_models = models


def record(job: Any, loaded: Any) -> dict:
    """The image record's `hires_model` (the Hires checkpoint's id, name, location and sha256)."""
    if job.hires is None or not job.hires.model:
        return {}
    second = loaded.pipe._t2i_hires_models[job.hires.model]
    src = second.source
    return {"hires_model": {"id": job.hires.model, "name": src.display, "location": src.location,
                            "kind": src.kind, "hash": second.sha256}}
