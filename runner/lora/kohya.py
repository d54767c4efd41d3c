"""The kohya/A1111 LoRA key layout (what A1111, Forge and ComfyUI read and write).

kohya names a module by its path with dots as underscores behind a component prefix (`lora_unet_`, `lora_te_`,
`lora_te1_`/`lora_te2_` for SDXL); SDXL files (and some SD 1.x ones) name UNet modules by their original LDM path
(`lora_unet_input_blocks_4_1_…`). `module_index` answers both for a loaded pipeline, the way A1111 does it: list
the model's own modules under every name a file may use for them.
"""

from __future__ import annotations

from typing import Any

from .detect import component_of

DENOISERS = ("unet", "transformer")  # the pipeline attribute of the denoiser, in the order looked up


def to_kohya(unet_state: dict, te_state: dict | None, alpha: float) -> dict:
    """Rename peft LoRA keys to the kohya/A1111 layout (`lora_unet_…`, `lora_te_…`, `.alpha` = `alpha`)."""
    import torch

    out = {}
    for prefix, state in (("lora_unet_", unet_state), ("lora_te_", te_state or {})):
        for key, value in state.items():
            module, kind = key.rsplit(".lora_", 1)
            if prefix == "lora_te_" and not module.startswith("text_model."):
                module = "text_model." + module  # kohya files use transformers-4 names
            stem = prefix + module.replace(".", "_")
            out[f"{stem}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value.contiguous()
            out[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return out


def _flat_names(comp: str, model: Any) -> dict[str, str]:
    """flat name -> module path (`comp.` first) for every module of `model` that has a weight."""
    import torch

    names: dict[str, str] = {}
    ldm_rules = None
    if comp == "unet" and hasattr(model, "config") and "block_out_channels" in model.config:
        from ..models.single_file import unet_rules

        try:
            ldm_rules = unet_rules(dict(model.config))
        except (KeyError, ValueError):  # per-block layer counts: no LDM layout, diffusers names only
            ldm_rules = None
    for name, module in model.named_modules():
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        path = f"{comp}.{name}"
        names.setdefault(name.replace(".", "_"), path)
        if comp.startswith("text_encoder") and not name.startswith("text_model."):
            names.setdefault("text_model_" + name.replace(".", "_"), path)  # transformers-4 CLIP names
        if ldm_rules is not None:
            from ..models.single_file import ldm_module_name

            ldm = ldm_module_name(name, ldm_rules)
            if ldm:
                names.setdefault(ldm.replace(".", "_"), path)
    return names


def module_index(pipe: Any) -> dict[str, dict[str, str]]:
    """Per component (`denoiser`, `text_encoder`, …): flat module name -> module path in the pipeline."""
    index: dict[str, dict[str, str]] = {}
    for comp in (*DENOISERS, "text_encoder", "text_encoder_2", "text_encoder_3"):
        model = getattr(pipe, comp, None)
        if model is None or not hasattr(model, "named_modules"):
            continue
        key = "denoiser" if comp in DENOISERS else comp
        if key not in index:
            index[key] = _flat_names(comp, model)
    return index


def module_path(index: dict[str, dict[str, str]], module_key: str) -> str | None:
    """The pipeline module path of a file's module key (kohya, LDM, diffusers or peft naming); None if absent."""
    comp, flat = component_of(module_key)
    return index.get(comp, {}).get(flat)
