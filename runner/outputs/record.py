"""The per-image record: every knob that changes pixels, plus provenance (stored in the PNG and the manifest)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from ..plan import ImageJob


def perf_record(loaded: Any) -> dict:
    """The fast-path state that can change pixels (float rounding), as applied to this pipeline."""
    state = getattr(loaded, "perf_state", None)
    return {"channels_last": bool(state and state.channels_last), "fuse_qkv": bool(state and state.fused_qkv),
            "fuse_lora": bool(loaded.adapters is not None and loaded.adapters.merge),
            "compile": bool(state and state.compiled)}


def build_record(job: ImageJob, loaded: Any, loras: tuple, width: int, height: int, batch: int,
                 invariant: bool) -> dict:
    """The full per-image record: every knob that changes pixels, plus provenance."""
    from .metadata import RECORD_VERSION, versions

    src = loaded.source
    return {
        "record_version": RECORD_VERSION,
        "file": job.filename,
        "key": job.key,
        "index": job.index,
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "seed": job.seed,
        "steps": job.steps,
        "guidance_scale": job.guidance_scale,
        "width": width,
        "height": height,
        "scheduler": job.scheduler,
        "clip_skip": job.clip_skip,
        "sampler": loaded.sampler_name(job.scheduler),
        "scheduler_class": type(loaded.pipe.scheduler).__name__,
        "lora_set": job.lora_set,
        "lora_scale": job.lora_scale,
        "loras": [r.record(w, b) for r, w, b in zip(loras, job.adapter_weights, job.adapter_blocks, strict=True)],
        "lora_blocks": job.blocks_label,
        "model": {"id": loaded.config.id, "name": src.display, "kind": src.kind, "location": src.location,
                  "revision": src.revision, "hash": loaded.sha256, "pipeline": type(loaded.pipe).__name__,
                  "dtype": loaded.dtype_name, "variant": loaded.config.variant, "config": loaded.config.config},
        "perf": perf_record(loaded),
        "device": loaded.device,
        "generator": "cpu",
        "batch_size": batch,
        "batch_invariant": invariant,
        "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
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
