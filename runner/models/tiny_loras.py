"""Example LoRAs for the tiny families (fixtures): one in diffusers format, one in the family's commonest foreign
format, with random weights shaped from the tiny model's own layers.

Foreign layouts (what diffusers' converters in `loaders/lora_conversion_utils.py` read for each family):
  sd15/sdxl  kohya/A1111 `lora_unet_…` + `lora_te_…` (`lora_te1_`/`lora_te2_` for SDXL), `.alpha`
  flux1      kohya sd-scripts, BFL block names: `lora_unet_double_blocks_0_img_attn_qkv` (fused q/k/v), `.alpha`
  flux2      ai-toolkit, BFL block names under `diffusion_model.`: `double_blocks.0.img_attn.qkv.lora_A.weight`
  qwenimage  kohya-style `lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight`, `.alpha`
  zimage     ai-toolkit/musubi `diffusion_model.layers.0.attention.to_q.lora_A.weight`
  sd3        diffusers only (diffusers converts no other SD3 layout)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

RANK = 4
ATTN = re.compile(r"\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$")
FOREIGN = {"sd15": "kohya", "sdxl": "kohya", "flux1": "kohya", "flux2": "aitoolkit", "qwenimage": "kohya",
           "zimage": "aitoolkit", "sd3": None}


def _pair(gen: Any, d_in: int, d_out: int, std: float = 0.5) -> tuple[Any, Any]:
    import torch

    return torch.randn(RANK, d_in, generator=gen) * std, torch.randn(d_out, RANK, generator=gen) * std


def _linears(module: Any, pattern: re.Pattern) -> dict[str, tuple[int, int]]:
    """name -> (in, out) of the Linear layers of `module` whose name matches `pattern`."""
    import torch

    return {n: (m.in_features, m.out_features) for n, m in module.named_modules()
            if isinstance(m, torch.nn.Linear) and pattern.search(n)}


def diffusers_lora(pipe: Any, seed: int) -> dict[str, Any]:
    """A diffusers-format LoRA (`transformer.<module>.lora_A/B.weight`) on the denoiser's attention layers."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (d_in, d_out) in sorted(_linears(pipe.transformer, ATTN).items()):
        down, up = _pair(gen, d_in, d_out)
        out[f"transformer.{name}.lora_A.weight"], out[f"transformer.{name}.lora_B.weight"] = down, up
    return out


def _kohya_pair(out: dict, stem: str, down: Any, up: Any) -> None:
    import torch

    out[f"{stem}.lora_down.weight"], out[f"{stem}.lora_up.weight"] = down, up
    out[f"{stem}.alpha"] = torch.tensor(float(RANK))


def foreign_lora(family: str, pipe: Any, seed: int) -> dict[str, Any]:
    """A LoRA in `family`'s commonest non-diffusers layout (see the module docstring)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    tr = pipe.transformer
    if family == "flux1":
        for i, block in enumerate(tr.transformer_blocks):
            inner = block.attn.to_q.in_features
            for part in ("img", "txt"):
                _kohya_pair(out, f"lora_unet_double_blocks_{i}_{part}_attn_qkv", *_pair(gen, inner, 3 * inner))
                _kohya_pair(out, f"lora_unet_double_blocks_{i}_{part}_attn_proj", *_pair(gen, inner, inner))
        for i, block in enumerate(tr.single_transformer_blocks):
            lin = block.proj_out
            _kohya_pair(out, f"lora_unet_single_blocks_{i}_linear2", *_pair(gen, lin.in_features, lin.out_features))
    elif family == "flux2":
        for i, block in enumerate(tr.transformer_blocks):
            inner = block.attn.to_q.in_features
            for part in ("img", "txt"):
                for name, d_out in (("qkv", 3 * inner), ("proj", inner)):
                    down, up = _pair(gen, inner, d_out)
                    stem = f"diffusion_model.double_blocks.{i}.{part}_attn.{name}"
                    out[f"{stem}.lora_A.weight"], out[f"{stem}.lora_B.weight"] = down, up
        for i, block in enumerate(tr.single_transformer_blocks):
            for name, lin in (("linear1", block.attn.to_qkv_mlp_proj), ("linear2", block.attn.to_out)):
                down, up = _pair(gen, lin.in_features, lin.out_features)
                stem = f"diffusion_model.single_blocks.{i}.{name}"
                out[f"{stem}.lora_A.weight"], out[f"{stem}.lora_B.weight"] = down, up
    elif family == "qwenimage":
        for name, (d_in, d_out) in sorted(_linears(tr, ATTN).items()):
            _kohya_pair(out, "lora_unet_" + name.replace(".", "_"), *_pair(gen, d_in, d_out))
    elif family == "zimage":
        for name, (d_in, d_out) in sorted(_linears(tr, ATTN).items()):
            down, up = _pair(gen, d_in, d_out)
            out[f"diffusion_model.{name}.lora_A.weight"], out[f"diffusion_model.{name}.lora_B.weight"] = down, up
    else:
        raise ValueError(f"no foreign LoRA layout for family {family!r}")
    return {k: v.contiguous() for k, v in out.items()}


def write_family_loras(family: str, pipe: Any, out: Path) -> list[Path]:
    """Write `out/tiny_style/tiny_style.safetensors` (diffusers) and `out/tiny_<format>.safetensors` (foreign)."""
    from safetensors.torch import save_file

    from .tiny import DIFFUSERS_LORA

    (out / DIFFUSERS_LORA[0]).mkdir(parents=True, exist_ok=True)
    style = out / DIFFUSERS_LORA[0] / DIFFUSERS_LORA[1]
    save_file(diffusers_lora(pipe, seed=1), str(style), metadata={"format": "pt"})
    files = [style]
    fmt = FOREIGN.get(family)
    if fmt:
        files.append(out / f"tiny_{fmt}.safetensors")
        save_file(foreign_lora(family, pipe, seed=2), str(files[-1]), metadata={"format": "pt"})
    return files
