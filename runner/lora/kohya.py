"""The kohya/A1111 LoRA key layout (what A1111, Forge and ComfyUI read and write).

kohya names a module by its path with dots as underscores behind a component prefix (`lora_unet_`, `lora_te_`,
`lora_te1_`/`lora_te2_` for SDXL); SDXL files (and some SD 1.x ones) name UNet modules by their original LDM path
(`lora_unet_input_blocks_4_1_…`). `module_index` answers both for a loaded pipeline, the way A1111 does it: list
the model's own modules under every name a file may use for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .detect import component_of

DENOISERS = ("unet", "transformer")  # the pipeline attribute of the denoiser, in the order looked up


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


@dataclass(frozen=True)
class Rows:
    """A file module whose weight stacks several model modules by rows (BFL's fused `qkv`, `linear1`): each part
    is a module path and the row ranges of the file's weight it takes, in order."""

    rows: int  # rows of the file's (fused) weight
    parts: tuple[tuple[str, tuple[tuple[int, int], ...]], ...]


Target = str | Rows


def _split(path: str, names: list[str], widths: list[int]) -> Rows:
    """The `Rows` of a fused module stacking `path.name` modules of these widths, in order."""
    parts, start = [], 0
    for name, width in zip(names, widths, strict=True):
        parts.append((f"{path}.{name}", ((start, start + width),)))
        start += width
    return Rows(start, tuple(parts))


def _flux2_bfl_names(transformer: Any) -> dict[str, Target]:
    """Flux.2's original (BFL) module names (flat) -> diffusers modules, as diffusers' own Flux.2 converters map
    them (`_convert_kohya_flux2_lora_to_diffusers`, `_convert_non_diffusers_flux2_lora_to_diffusers`); the
    single-block `linear1` is fused in diffusers too (`attn.to_qkv_mlp_proj`), so only the double-block q/k/v fuse."""
    t = "transformer."
    out: dict[str, Target] = {}
    for i, block in enumerate(transformer.transformer_blocks):
        b, db, attn = f"{t}transformer_blocks.{i}", f"double_blocks_{i}_", block.attn
        out[db + "img_attn_qkv"] = _split(f"{b}.attn", ["to_q", "to_k", "to_v"],
                                          [attn.to_q.out_features, attn.to_k.out_features, attn.to_v.out_features])
        out[db + "txt_attn_qkv"] = _split(f"{b}.attn", ["add_q_proj", "add_k_proj", "add_v_proj"],
                                          [attn.add_q_proj.out_features, attn.add_k_proj.out_features,
                                           attn.add_v_proj.out_features])
        for bfl, diffusers in (("img_attn_proj", "attn.to_out.0"), ("txt_attn_proj", "attn.to_add_out"),
                               ("img_mlp_0", "ff.linear_in"), ("img_mlp_2", "ff.linear_out"),
                               ("txt_mlp_0", "ff_context.linear_in"), ("txt_mlp_2", "ff_context.linear_out")):
            out[db + bfl] = f"{b}.{diffusers}"
    for i, _ in enumerate(transformer.single_transformer_blocks):
        b = f"{t}single_transformer_blocks.{i}.attn"
        out[f"single_blocks_{i}_linear1"] = f"{b}.to_qkv_mlp_proj"
        out[f"single_blocks_{i}_linear2"] = f"{b}.to_out"
    for bfl, diffusers in (("img_in", "x_embedder"), ("txt_in", "context_embedder"),
                           ("time_in_in_layer", "time_guidance_embed.timestep_embedder.linear_1"),
                           ("time_in_out_layer", "time_guidance_embed.timestep_embedder.linear_2"),
                           ("guidance_in_in_layer", "time_guidance_embed.guidance_embedder.linear_1"),
                           ("guidance_in_out_layer", "time_guidance_embed.guidance_embedder.linear_2"),
                           ("final_layer_linear", "proj_out"),
                           ("double_stream_modulation_img_lin", "double_stream_modulation_img.linear"),
                           ("double_stream_modulation_txt_lin", "double_stream_modulation_txt.linear"),
                           ("single_stream_modulation_lin", "single_stream_modulation.linear")):
        try:
            transformer.get_submodule(diffusers)
        except AttributeError:  # guidance-distilled Klein models have no guidance embedder
            continue
        out[bfl] = t + diffusers
    return out


def zimage_native_names(transformer: Any) -> dict[str, Target]:
    """Z-Image's original module names (dotted; ComfyUI's and the original checkpoint's) -> diffusers modules:
    each block's fused `attention.qkv` (diffusers' to_q/to_k/to_v) and `attention.out` (`to_out.0`); the rest of
    a block has the same path in both."""
    t = "transformer."
    out: dict[str, Target] = {}
    for name, module in transformer.named_modules():
        if name.endswith(".attention") and all(hasattr(module, p) for p in ("to_q", "to_k", "to_v", "to_out")):
            out[f"{name}.qkv"] = _split(f"{t}{name}", ["to_q", "to_k", "to_v"],
                                        [module.to_q.out_features, module.to_k.out_features,
                                         module.to_v.out_features])
            out[f"{name}.out"] = f"{t}{name}.to_out.0"
    return out


def _flux_bfl_names(transformer: Any) -> dict[str, Target]:
    """Flux.1's original (BFL / kohya) module names -> diffusers modules, as diffusers' own kohya/BFL converters
    map them (`_convert_kohya_flux_lora_to_diffusers`), from the model's real widths."""
    t = "transformer."
    inner = int(transformer.inner_dim) if hasattr(transformer, "inner_dim") else int(
        transformer.config.num_attention_heads * transformer.config.attention_head_dim)
    out: dict[str, Target] = {}
    split = _split
    for i, _ in enumerate(transformer.transformer_blocks):
        b, db = f"{t}transformer_blocks.{i}", f"double_blocks_{i}_"
        out[db + "img_attn_qkv"] = split(f"{b}.attn", ["to_q", "to_k", "to_v"], [inner] * 3)
        out[db + "txt_attn_qkv"] = split(f"{b}.attn", ["add_q_proj", "add_k_proj", "add_v_proj"], [inner] * 3)
        for bfl, diffusers in (("img_attn_proj", "attn.to_out.0"), ("txt_attn_proj", "attn.to_add_out"),
                               ("img_mlp_0", "ff.net.0.proj"), ("img_mlp_2", "ff.net.2"),
                               ("txt_mlp_0", "ff_context.net.0.proj"), ("txt_mlp_2", "ff_context.net.2"),
                               ("img_mod_lin", "norm1.linear"), ("txt_mod_lin", "norm1_context.linear")):
            out[db + bfl] = f"{b}.{diffusers}"
    for i, block in enumerate(transformer.single_transformer_blocks):
        b, sb = f"{t}single_transformer_blocks.{i}", f"single_blocks_{i}_"
        mlp = int(block.proj_mlp.out_features)
        out[sb + "linear1"] = split(b, ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], [inner] * 3 + [mlp])
        out[sb + "linear2"] = f"{b}.proj_out"
        out[sb + "modulation_lin"] = f"{b}.norm.linear"
    for bfl, diffusers in (("img_in", "x_embedder"), ("txt_in", "context_embedder"),
                           ("time_in_in_layer", "time_text_embed.timestep_embedder.linear_1"),
                           ("time_in_out_layer", "time_text_embed.timestep_embedder.linear_2"),
                           ("vector_in_in_layer", "time_text_embed.text_embedder.linear_1"),
                           ("vector_in_out_layer", "time_text_embed.text_embedder.linear_2"),
                           ("guidance_in_in_layer", "time_text_embed.guidance_embedder.linear_1"),
                           ("guidance_in_out_layer", "time_text_embed.guidance_embedder.linear_2"),
                           ("final_layer_linear", "proj_out")):
        out[bfl] = t + diffusers
    # BFL's final modulation is (shift, scale), diffusers' norm_out (scale, shift): the halves swap
    out["final_layer_adaLN_modulation_1"] = Rows(2 * inner, ((f"{t}norm_out.linear",
                                                              ((inner, 2 * inner), (0, inner))),))
    return out


def t5_component(pipe: Any) -> str | None:
    """The pipeline attribute holding the T5 encoder (Flux.1: `text_encoder_2`, SD3: `text_encoder_3`), or None."""
    for comp in ("text_encoder_3", "text_encoder_2"):
        model = getattr(pipe, comp, None)
        if model is not None and type(model).__name__.startswith(("T5", "UMT5")):
            return comp
    return None


def module_index(pipe: Any) -> dict[str, dict[str, Target]]:
    """Per component (`denoiser`, `text_encoder`, …): flat module name -> module path in the pipeline (or the
    `Rows` of a fused original-layout module).

    kohya's `lora_te3_` is the T5 encoder wherever the pipeline keeps it (sd-scripts writes Flux.1's T5 as
    `lora_te3_`, and A1111/Forge/ComfyUI apply it there), so `text_encoder_3` names the T5 component."""
    index: dict[str, dict[str, Target]] = {}
    t5 = t5_component(pipe)
    for comp in (*DENOISERS, "text_encoder", "text_encoder_2", "text_encoder_3"):
        model = getattr(pipe, comp, None)
        if model is None or not hasattr(model, "named_modules"):
            continue
        key = "denoiser" if comp in DENOISERS else comp
        if key not in index:
            index[key] = dict(_flat_names(comp, model))
        if comp == t5 and comp != "text_encoder_3":
            index["text_encoder_3"] = dict(_flat_names(comp, model))
        name = type(model).__name__
        if comp == "transformer" and name.startswith("Flux2"):
            index[key].update(_flux2_bfl_names(model))
        elif comp == "transformer" and name.startswith("Flux"):
            index[key].update(_flux_bfl_names(model))
        elif comp == "transformer" and name.startswith("ZImage"):
            index[key].update({k.replace(".", "_"): v for k, v in zimage_native_names(model).items()})
    return index


def module_path(index: dict[str, dict[str, Target]], module_key: str) -> Target | None:
    """The pipeline module path (or fused `Rows`) of a file's module key (kohya, LDM, BFL, diffusers or peft
    naming); None if absent."""
    comp, flat = component_of(module_key)
    return index.get(comp, {}).get(flat)
