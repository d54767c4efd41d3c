"""Which model family a transformer checkpoint (`model.transformer`: GGUF, single file) is for, from its key names.

A LoRA file's family is lora/detect.py's rule (names, shapes, metadata; `detect.check_family` before loading,
`detect.check_base` after). A result here is a family name, or a group of families the keys cannot tell apart
("sd" = SD1.5 or SDXL, "flux" = Flux.1 or Flux.2, None = unknown).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# (family or group, pattern over a key), first match wins. Only denoiser keys decide (text-encoder keys are
# shared: Flux and SD3 LoRAs may carry `lora_te1_`/`text_encoder` parts too). Patterns cover diffusers/peft names
# and the foreign layouts diffusers converts (kohya `lora_unet_`, BFL/ai-toolkit `diffusion_model.`, XLabs).
_RULES: tuple[tuple[str, re.Pattern], ...] = tuple((fam, re.compile(p)) for fam, p in (
    ("sd", r"^(lora_unet_(down|up|mid|input|output|middle)_block|unet\.|base_model\.model\.(down|up|mid)_block|"
           r"(down|up)_blocks\.\d+\.(attentions|resnets)\.|mid_block\.|"
           r"model\.diffusion_model\.(input|middle|output)_blocks)"),
    ("zimage", r"(^|[._])(layers[._]\d+[._]attention[._]|noise_refiner|context_refiner|"
               r"layers[._]\d+[._]feed_forward)"),
    ("flux2", r"(to_qkv_mlp_proj|double_stream_modulation|single_stream_modulation|ff(_context)?\.linear_(in|out))"),
    ("qwenimage", r"(^|[._])(img_mlp|txt_mlp|img_mod[._]1|txt_mod[._]1)([._]|$)"),
    ("sd3", r"(joint_blocks|transformer_blocks\.\d+\.attn2\.|context_block|^pos_embed\.proj)"),
    ("flux1", r"(proj_lora\d|single_transformer_blocks\.\d+\.(proj_mlp|norm\.linear|attn\.to_[qkv]\.)|"
              r"double_blocks[._]\d+[._](img|txt)_mod|single_blocks[._]\d+[._]modulation)"),
    ("flux", r"(double_blocks|single_blocks)"),
))
_SDXL = re.compile(r"^(lora_te2_|text_encoder_2\.|lora_unet_(input|output)_blocks_[478]_1_transformer_blocks_[1-9])")
GROUPS = {"sd": ("sd15", "sdxl"), "flux": ("flux1", "flux2")}


def keys_family(keys: Iterable[str]) -> str | None:
    """The family (or group, see GROUPS) a checkpoint's tensor names belong to, or None when they do not tell."""
    keys = list(keys)
    for fam, pattern in _RULES:
        if any(pattern.search(k) for k in keys):
            if fam == "sd" and any(_SDXL.search(k) for k in keys):
                return "sdxl"  # a second CLIP text encoder or SDXL's deeper transformer stacks
            return fam
    return None


def fits(found: str | None, family: str) -> bool:
    """True unless the keys clearly belong to another family than `family`."""
    if found is None or family.startswith("other:"):
        return True
    return family == found or family in GROUPS.get(found, ())


def label(found: str) -> str:
    from .families import FAMILIES

    return {"sd": "Stable Diffusion 1.x/XL", "flux": "Flux"}.get(found) or FAMILIES[found].label
