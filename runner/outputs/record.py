"""The per-image record: every knob that changes pixels, plus provenance (stored in the PNG and the manifest).

Only what the image is goes into the PNG, so the same config on the same machine and versions gives the same
bytes; where and when it was written (file name, number, time) is in its manifest line only (writer.py)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..plan import ImageJob

# What from_image compares. Settings decide the pixels; derived keys follow from settings and the model; the rest
# is provenance. Every record key is in exactly one group (tests/test_reproduce.py checks it), so a new knob
# cannot be left out of the comparison unnoticed. loras, model, device, threads and batch are compared by rules of
# their own (reproduce/from_image.py: Original.differences).
SETTINGS = ("prompt", "negative_prompt", "prompt_syntax", "seed", "steps", "guidance_scale", "width", "height",
            "scheduler", "schedule", "clip_skip", "perf", "true_cfg_scale", "max_sequence_length", "memory",
            "hires_scale", "hires_steps", "hires_denoise", "hires_upscaler", "hires_resize", "hires_prompt",
            "hires_negative_prompt", "hires_scheduler", "hires_schedule", "hires_model", "embeddings", "emphasis",
            "pad_conds", "refiner_switch_at")
SPECIAL = ("loras", "model", "device", "threads", "batch_size", "batch_invariant", "refiner")
DERIVED = ("sampler", "schedule_type", "scheduler_class", "clip_skip_applied", "lora_set", "lora_set_name",
           "lora_scale", "lora_blocks", "key", "file", "index",  # lora_blocks: the swept label; loras hold each one
           "prompt_syntax_applied", "prompt_sr", "prompt_sr_base", "emphasis_mean_restored", "refiner_switch_call",
           "hires_sampler", "hires_schedule_type", "hires_upscaler_file")
# `file`, `index`, `created` and `adopted` are in manifest lines only (the PNG holds no run-dir facts)
PROVENANCE = ("record_version", "generator", "versions", "created", "adopted", "faults", "reproduced", "run_seed",
              "prompt_template", "prompt_seed")


def perf_record(loaded: Any) -> dict:
    """The fast-path state that can change pixels (float rounding), as applied to this pipeline."""
    state = getattr(loaded, "perf_state", None)
    return {"channels_last": bool(state and state.channels_last), "fuse_qkv": bool(state and state.fused_qkv),
            "fuse_lora": bool(loaded.adapters is not None and loaded.adapters.merge),
            "compile": bool(state and state.compiled)}


def build_record(job: ImageJob, loaded: Any, loras: tuple, width: int, height: int, batch: int,
                 invariant: bool, config_hash: str = "", refiner_call: int = -1) -> dict:
    """The full per-image record: every knob that changes pixels, plus provenance. `config_hash`: the model's
    pixel-changing configs (common.hashing.config_sha256); `refiner_call`: the denoiser call the refiner took
    over at (-1: never)."""
    from ..generate.prompt_embeds import clip_skip_applies, prompt_embeds, syntax_applies
    from ..models.hires_model import record as hires_model_record
    from ..models.memory import record as memory_record
    from .metadata import RECORD_VERSION, versions

    src = loaded.source
    sampler, schedule_type = loaded.sampler_name(job.scheduler, job.schedule)
    return {
        "record_version": RECORD_VERSION,
        "key": job.key,
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "prompt_syntax": job.prompt_syntax,
        # False: a family whose text encoders are not CLIP got the words without the syntax (one warning)
        "prompt_syntax_applied": job.prompt_syntax == "a1111" and syntax_applies(loaded.pipe),
        **({"prompt_template": job.template} if job.template else {}),
        # A1111's emphasis mode and "Pad prompt/negative prompt" (prompt/clip.py, generate/scheduled.py)
        "emphasis": job.emphasis,
        "pad_conds": job.pad_conds,
        # False: the text encoder's mean was ~0, so A1111's mean restore was left out (prompt/clip.py)
        **({"emphasis_mean_restored": False} if (job.prompt, job.negative_prompt) in prompt_embeds(loaded).unrestored
           else {}),
        **({"prompt_sr": job.prompt_sr, "prompt_sr_base": job.base_prompt} if job.prompt_sr is not None else {}),
        "seed": job.seed,
        "steps": job.steps,
        "guidance_scale": job.guidance_scale,
        "width": width,
        "height": height,
        "scheduler": job.scheduler,
        "schedule": job.schedule,
        "clip_skip": job.clip_skip,
        # A1111 applies Clip skip per family (SD 1.x only); False: the model's normal conditioning was used
        "clip_skip_applied": bool(job.clip_skip and job.clip_skip > 1 and clip_skip_applies(loaded.pipe)),
        "true_cfg_scale": job.true_cfg_scale,
        "max_sequence_length": job.max_sequence_length,
        **(job.hires.record() if job.hires is not None else {}),  # width/height stay the first pass's (A1111)
        **(dict(zip(("hires_sampler", "hires_schedule_type"), loaded.sampler_name(
            *job.hires.second_scheduler(job.scheduler, job.schedule)), strict=True))
           if job.hires is not None and (job.hires.scheduler or job.hires.schedule) else {}),
        **hires_model_record(job, loaded),
        **({"embeddings": [e.record() for e in job.embeddings]} if job.embeddings else {}),
        # A1111's Refiner: the second model and where it took over (the denoiser call; -1: it never did)
        **({"refiner": loaded.refiner.record(), **job.refiner.record(),
            "refiner_switch_call": refiner_call} if job.refiner is not None else {}),
        "sampler": sampler,
        "schedule_type": schedule_type,
        "scheduler_class": type(loaded.pipe.scheduler).__name__,
        "lora_set": job.lora_set,
        "lora_set_name": job.set_label,
        "lora_scale": job.lora_scale,
        "loras": [r.record(w, b) for r, w, b in zip(loras, job.adapter_weights, job.adapter_blocks, strict=True)],
        "lora_blocks": job.blocks_label,
        "model": {"id": loaded.config.id, "name": src.display, "kind": src.kind, "location": src.location,
                  "revision": src.revision, "hash": loaded.sha256, "config_hash": config_hash,
                  "pipeline": type(loaded.pipe).__name__,
                  "dtype": loaded.dtype_name, "variant": loaded.config.variant, "config": loaded.config.config,
                  "family": loaded.family.name if loaded.family else None,
                  "transformer": loaded.config.transformer},
        "perf": perf_record(loaded),
        "memory": {**memory_record(loaded.memory), "offload": loaded.offload},
        "device": loaded.device,
        "threads": getattr(loaded, "threads", None),  # torch CPU threads: they change float rounding on CPU
        "generator": "cpu",
        "batch_size": batch,
        "batch_invariant": invariant,
        "versions": versions(),
    }


def summary_note(entries: Iterable[dict]) -> str:
    """The summary-line suffix of a from_image run: `identical` / `max pixel diff N`."""
    reps = [e["reproduced"] for e in entries if isinstance(e.get("reproduced"), dict)]
    if not reps:
        return ""
    done = [r for r in reps if r.get("compared")]
    if not done:
        return f"; compared with {reps[0]['source']}: none ({reps[0].get('reason', 'not comparable')})"
    worst = max(r["max_pixel_diff"] for r in done)
    verdict = "identical" if worst == 0 else f"max pixel diff {worst}"
    count = f" ({len(done)} images)" if len(done) > 1 else ""
    return f"; compared with {reps[0]['source']}{count}: {verdict}"
