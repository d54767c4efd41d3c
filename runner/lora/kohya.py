"""The kohya/A1111 LoRA key layout (what A1111, Forge and ComfyUI read)."""

from __future__ import annotations


def to_kohya(unet_state: dict, te_state: dict | None, alpha: float, te2_state: dict | None = None) -> dict:
    """Rename peft LoRA keys to the kohya/A1111 layout (`lora_unet_…`, `lora_te_…`, `.alpha` = `alpha`); with
    `te2_state` (SDXL) the two text encoders are `lora_te1_…` and `lora_te2_…`."""
    import torch

    out = {}
    te = (("lora_te1_", te_state or {}), ("lora_te2_", te2_state)) if te2_state else (("lora_te_", te_state or {}),)
    for prefix, state in (("lora_unet_", unet_state), *te):
        for key, value in state.items():
            module, kind = key.rsplit(".lora_", 1)
            if prefix.startswith("lora_te") and not module.startswith("text_model."):
                module = "text_model." + module  # kohya files use transformers-4 names
            stem = prefix + module.replace(".", "_")
            out[f"{stem}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value.contiguous()
            out[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return out
