"""Export a diffusers StableDiffusionPipeline to ONE original-LDM-layout `.safetensors` checkpoint.

The inverse of diffusers' single-file conversion (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint`): UNet under `model.diffusion_model.`, VAE under `first_stage_model.`, CLIP text
encoder under `cond_stage_model.transformer.text_model.`. Block indices are derived from the UNet/VAE
configs (`block_out_channels`, `layers_per_block`, attention blocks), so it works for the tiny model and for
full SD1.x/2.x.
Every weight must map to an LDM key: an unknown key raises instead of being dropped.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
               "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_VAE_FIXED = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out",
              **{k: k for k in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                                "quant_conv", "post_quant_conv")}}

# (diffusers module prefix, LDM module prefix, renames of the sub-module names inside it)
Rule = tuple[str, str, dict[str, str]]


def _layers_per_block(config: dict, n: int) -> list[int]:
    lpb = config["layers_per_block"]
    return list(lpb) if isinstance(lpb, (list, tuple)) else [int(lpb)] * n


def unet_rules(config: dict) -> list[Rule]:
    """Module-prefix renames for a UNet2DConditionModel config (down/mid/up blocks -> input/middle/output)."""
    n = len(config["block_out_channels"])
    lpb = _layers_per_block(config, n)
    if len(set(lpb)) != 1:
        raise ValueError(f"layers_per_block={lpb}: per-block layer counts have no LDM layout")
    per = lpb[0]
    rules: list[Rule] = [(d, ld, {}) for d, ld in _UNET_FIXED.items()]
    for b in range(n):
        for j in range(per):
            i = 1 + b * (per + 1) + j
            rules.append((f"down_blocks.{b}.resnets.{j}", f"input_blocks.{i}.0", _UNET_RESNET))
            rules.append((f"down_blocks.{b}.attentions.{j}", f"input_blocks.{i}.1", {}))
        down = 1 + b * (per + 1) + per
        rules.append((f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{down}.0.op", {}))
    rules += [("mid_block.resnets.0", "middle_block.0", _UNET_RESNET),
              ("mid_block.attentions.0", "middle_block.1", {}),
              ("mid_block.resnets.1", "middle_block.2", _UNET_RESNET)]
    up_types = config.get("up_block_types") or ()
    for b in range(n):
        for j in range(per + 1):
            i = b * (per + 1) + j
            rules.append((f"up_blocks.{b}.resnets.{j}", f"output_blocks.{i}.0", _UNET_RESNET))
            rules.append((f"up_blocks.{b}.attentions.{j}", f"output_blocks.{i}.1", {}))
        attn = b < len(up_types) and "CrossAttn" in up_types[b]
        last = f"output_blocks.{b * (per + 1) + per}.{2 if attn else 1}.conv"
        rules.append((f"up_blocks.{b}.upsamplers.0.conv", last, {}))
    return rules


def vae_rules(config: dict) -> list[Rule]:
    """Module-prefix renames for an AutoencoderKL config (decoder up blocks are stored in reverse order)."""
    n, per = len(config["block_out_channels"]), int(config["layers_per_block"])
    rules: list[Rule] = [(d, ld, {}) for d, ld in _VAE_FIXED.items()]
    for b in range(n):
        enc, dec = f"encoder.down_blocks.{b}", f"decoder.up_blocks.{b}"
        rules += [(f"{enc}.resnets.{j}", f"encoder.down.{b}.block.{j}", _VAE_RESNET) for j in range(per)]
        rules.append((f"{enc}.downsamplers.0.conv", f"encoder.down.{b}.downsample.conv", {}))
        up = f"decoder.up.{n - 1 - b}"
        rules += [(f"{dec}.resnets.{j}", f"{up}.block.{j}", _VAE_RESNET) for j in range(per + 1)]
        rules.append((f"{dec}.upsamplers.0.conv", f"{up}.upsample.conv", {}))
    for part in ("encoder", "decoder"):
        rules += [(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET),
                  (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET),
                  (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTN)]
    return rules


def _rename(key: str, rules: list[Rule]) -> str | None:
    """Rename a diffusers key by its longest matching module prefix; None when no rule matches."""
    best = None
    for src, dst, subs in rules:
        if key.startswith(src + ".") and (best is None or len(src) > len(best[0])):
            best = (src, dst, subs)
    if best is None:
        return None
    src, dst, subs = best
    rest = key[len(src) + 1:]
    for old, new in subs.items():
        if rest.startswith(old + "."):
            rest = new + rest[len(old):]
            break
    return f"{dst}.{rest}"


def _renamed(state: dict[str, Any], rules: Any, what: str) -> Iterator[tuple[str, Any]]:
    """(LDM name, tensor) of each weight of a diffusers component; a weight with no LDM name is an error."""
    for key, value in state.items():
        new = _rename(key, rules)
        if new is None:
            raise ValueError(f"{what} weight {key!r} has no LDM equivalent")
        yield new, value


def unet_to_ldm(state: dict[str, Any], config: dict) -> dict[str, Any]:
    """UNet2DConditionModel state dict -> LDM `model.diffusion_model.*` keys."""
    return {UNET_PREFIX + new: value for new, value in _renamed(state, unet_rules(config), "UNet")}


def vae_to_ldm(state: dict[str, Any], config: dict) -> dict[str, Any]:
    """AutoencoderKL state dict -> LDM `first_stage_model.*` keys (attention projections as 1x1 convs)."""
    out = {}
    for new, value in _renamed(state, vae_rules(config), "VAE"):
        if ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[VAE_PREFIX + new] = value
    return out


def clip_to_ldm(state: dict[str, Any]) -> dict[str, Any]:
    """CLIPTextModel state dict (transformers 4 `text_model.*` or 5 flattened names) -> LDM CLIP keys."""
    return {CLIP_PREFIX + k.removeprefix("text_model."): v for k, v in state.items()}


def pipeline_to_ldm(pipe: Any) -> dict[str, Any]:
    """The LDM state dict of a StableDiffusionPipeline (UNet + VAE + CLIP text encoder), contiguous on CPU."""
    clip = type(pipe.text_encoder).__name__ == "CLIPTextModel"
    if not clip or getattr(pipe, "text_encoder_2", None) is not None:
        raise ValueError(f"{type(pipe).__name__} with {type(pipe.text_encoder).__name__}: only SD1.x-style "
                         "pipelines (one CLIPTextModel) can be exported to a single file")
    state = {**unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config)),
             **vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)),
             **clip_to_ldm(pipe.text_encoder.state_dict())}
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def export_single_file(pipe_or_dir: Any, dest: str | os.PathLike) -> Path:
    """Write a pipeline (or a diffusers folder's pipeline) to `dest` as one LDM `.safetensors`, atomically."""
    from safetensors.torch import save_file

    pipe = pipe_or_dir
    if isinstance(pipe_or_dir, (str, os.PathLike)):
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(str(pipe_or_dir), safety_checker=None,
                                                       requires_safety_checker=False)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        save_file(pipeline_to_ldm(pipe), tmp, metadata={"format": "pt"})  # 1 key: bytes stay deterministic
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def ldm_module_name(path: str, rules: list[Rule]) -> str | None:
    """The LDM name of a diffusers module path (`down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in`
    for SD 1.x) under `unet_rules(config)`; None when it has none."""
    new = _rename(path + ".weight", rules)
    return new[: -len(".weight")] if new else None
