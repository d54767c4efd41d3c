"""kohya's `ss_*` training metadata, written into both LoRA files (what `t2i-inspect`, A1111's and ComfyUI's
LoRA browsers and civitai read: network module/dim/alpha, base model, resolution, steps, optimizer, tags)."""

from __future__ import annotations

import json

from .config import TrainSpec

BASE_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0", "flux1": "flux1", "sd3": "sd3", "qwenimage": "qwen_image",
                "zimage": "z_image", "flux2": "flux2"}
NETWORK_MODULE = {"lora": "networks.lora", "dora": "networks.lora", "loha": "lycoris.kohya",
                  "lokr": "lycoris.kohya"}


def kohya_metadata(spec: TrainSpec, family: str, name: str, tags: dict[str, int] | None = None) -> dict[str, str]:
    """The `ss_*` keys (strings, as kohya writes them) for a LoRA trained by `spec` on a `family` model."""
    lo, t, d = spec.lora, spec.train, spec.data
    kind = getattr(lo, "type", "lora")
    meta = {
        "ss_network_module": NETWORK_MODULE.get(kind, "networks.lora"),
        "ss_network_dim": str(lo.rank),
        "ss_network_alpha": f"{spec.alpha:g}",
        "ss_network_dropout": f"{lo.dropout:g}",
        "ss_base_model_version": BASE_VERSION.get(family, family),
        "ss_sd_model_name": str(spec.model.id),
        "ss_output_name": name,
        "ss_training_comment": "t2i-train",
        "ss_resolution": str(d.resolution) if d.resolution else "native",
        "ss_max_train_steps": str(t.steps),
        "ss_learning_rate": f"{t.lr:g}",
        "ss_unet_lr": f"{t.lr:g}",
        "ss_text_encoder_lr": f"{t.lr:g}" if lo.text_encoder else "0",
        "ss_lr_scheduler": t.lr_scheduler,
        "ss_lr_warmup_steps": str(t.lr_warmup_steps),
        "ss_batch_size_per_device": str(t.batch_size),
        "ss_gradient_accumulation_steps": str(t.gradient_accumulation),
        "ss_gradient_checkpointing": str(bool(t.gradient_checkpointing)),
        "ss_mixed_precision": t.mixed_precision,
        "ss_optimizer": getattr(t, "optimizer", "adamw"),
        "ss_max_grad_norm": f"{t.max_grad_norm:g}",
        "ss_noise_offset": f"{t.noise_offset:g}",
        "ss_seed": str(t.seed),
        "ss_timestep_sampling": t.timestep_sampling if family not in ("sd15", "sdxl") else "uniform",
        "ss_guidance_scale": f"{t.guidance_scale:g}",
        "ss_ema_decay": f"{t.ema_decay:g}" if t.ema_decay else "none",
        "ss_quantize_base": getattr(t, "quantize_base", None) or "none",
        "ss_cache_latents": str(bool(getattr(d, "cache_latents", False))),
        "ss_cache_text_encoder_outputs": str(bool(getattr(d, "cache_text", False))),
        "ss_network_args": json.dumps({"preset": lo.preset, "target_modules": lo.target_modules,
                                       "algo": kind}),
        "modelspec.architecture": f"{BASE_VERSION.get(family, family)}/lora",
    }
    if tags:
        meta["ss_tag_frequency"] = json.dumps({name: tags})
    return meta
