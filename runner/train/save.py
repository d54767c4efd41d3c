"""Write a trained LoRA twice: diffusers/peft format and the A1111/Forge/ComfyUI (kohya) format of its family.

- `NAME.safetensors`: the pipeline class's own `save_lora_weights` (`unet.`/`transformer.`/`text_encoder.` keys,
  peft `lora_A`/`lora_B`, the peft config as `lora_adapter_metadata`), what diffusers' `load_lora_weights` reads.
- `NAME_kohya.safetensors`: kohya names (`lora_unet_…`, `lora_te_…`/`lora_te1_…`, `lora_down`/`lora_up`/`alpha`)
  with the module naming A1111/Forge/ComfyUI resolve for the family: diffusers paths for SD 1.x (kohya's own
  SD 1.x names), the original LDM paths for SDXL (kohya's SDXL names), the BFL names for Flux.1 and Flux.2 (fused
  `img_attn_qkv`/`txt_attn_qkv` and Flux.1's `linear1`, block-diagonal, as kohya's `split_qkv=False` files),
  Z-Image's original names behind `diffusion_model.` (fused `attention.qkv`, `attention.out`; see
  `_zimage_native`), and the diffusers paths as flat kohya names for SD3 and Qwen-Image (ComfyUI's
  `lora_transformer_`/`lora_unet_<diffusers path>` keys for them).
  Both files carry kohya's `ss_*` training metadata.
Written to a temp folder and renamed, so a reader never sees half a LoRA.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

TE_PREFIX = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"}
SAVE_KWARG = {"unet": "unet_lora_layers", "transformer": "transformer_lora_layers",
              "text_encoder": "text_encoder_lora_layers", "text_encoder_2": "text_encoder_2_lora_layers"}


def lora_states(modules: dict[str, Any]) -> dict[str, dict]:
    """Per component (`unet`/`transformer`/`text_encoder…`), its adapter weights in peft naming."""
    from peft import get_peft_model_state_dict

    return {name: get_peft_model_state_dict(m) for name, m in modules.items()}


def save_lora(folder: Path, name: str, pipe: Any, family: str, modules: dict[str, Any], metadata: dict[str, str],
              alpha: float, rank: int) -> Path:
    """Write `name.safetensors` (diffusers) and `name_kohya.safetensors` into `folder` atomically."""
    from safetensors.torch import save_file

    states = lora_states(modules)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".lora-", dir=folder))
    try:
        kwargs: dict[str, Any] = {}
        for comp, state in states.items():
            kwargs[SAVE_KWARG[comp]] = state  # peft `lora_A`/`lora_B` names, as train_dreambooth_lora_* save them
            config = modules[comp].peft_config["default"].to_dict()
            if isinstance(config.get("target_modules"), (set, list)):  # a set: its order varies between runs
                config["target_modules"] = sorted(config["target_modules"])
            kwargs[SAVE_KWARG[comp].replace("_layers", "_adapter_metadata")] = config
        type(pipe).save_lora_weights(tmp, weight_name=f"{name}.safetensors", **kwargs)
        _add_metadata(tmp / f"{name}.safetensors", metadata)
        kohya = to_kohya_family(family, pipe, states, alpha, rank)
        save_file({k: v.detach().float().contiguous() for k, v in kohya.items()},
                  str(tmp / f"{name}_kohya.safetensors"), metadata=metadata)
        for f in tmp.iterdir():
            f.replace(folder / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / f"{name}.safetensors"


def _add_metadata(path: Path, extra: dict[str, str]) -> None:
    """Add the `ss_*` keys to a safetensors file diffusers wrote (it keeps its own metadata)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    save_file(tensors, str(path), metadata={**meta, **extra})


# peft key suffix -> kohya/LyCORIS suffix (DoRA's magnitude becomes a per-output `dora_scale`, LyCORIS wd_on_out)
_KOHYA_SUFFIX = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                 "lora_magnitude_vector.weight": "dora_scale", "lora_magnitude_vector": "dora_scale",
                 **{f"hada_{p}": f"hada_{p}" for p in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
                 **{f"lokr_{p}": f"lokr_{p}" for p in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")}}


def _modules(state: dict) -> dict[str, dict[str, Any]]:
    """peft state -> {module path: {kohya suffix: tensor}}."""
    out: dict[str, dict] = {}
    for key, value in state.items():
        suffix = next((s for s in sorted(_KOHYA_SUFFIX, key=len, reverse=True) if key.endswith("." + s)), None)
        if suffix is None:
            continue
        module = key[: -len(suffix) - 1]
        if _KOHYA_SUFFIX[suffix] == "dora_scale":
            value = value.reshape(-1, 1)
        out.setdefault(module, {})[_KOHYA_SUFFIX[suffix]] = value
    return out


def to_kohya_family(family: str, pipe: Any, states: dict[str, dict], alpha: float, rank: int) -> dict:
    """The kohya/A1111 state dict of a trained adapter (see the module docstring for the naming per family).

    LoHa/LoKr/DoRA modules keep LyCORIS suffixes (`hada_w1_a`, `lokr_w1`, `dora_scale`) and diffusers module
    paths (no BFL fusion: a fused DoRA or Kronecker factor is not a sum of parts)."""
    import torch

    out: dict[str, Any] = {}
    denoiser = "unet" if "unet" in states else "transformer"
    mods = _modules(states.get(denoiser, {}))
    plain = all(set(t) == {"lora_down.weight", "lora_up.weight"} for t in mods.values())

    def put(stem: str, tensors: dict[str, Any], al: float) -> None:
        for suffix, value in tensors.items():
            out[f"{stem}.{suffix}"] = value
        if "lokr_w1" in tensors and "lokr_w2" in tensors:
            # A1111/LyCORIS ignore alpha for two full Kronecker factors: peft's alpha/r goes into w1
            out[f"{stem}.lokr_w1"] = tensors["lokr_w1"] * (al / rank)
        else:
            out[f"{stem}.alpha"] = torch.tensor(float(al))

    if family == "zimage":
        return _zimage_native(pipe.transformer, mods, alpha, put, plain, out)
    if family in ("flux1", "flux2") and plain:
        from ..lora.kohya import _flux2_bfl_names, _flux_bfl_names

        names = (_flux_bfl_names if family == "flux1" else _flux2_bfl_names)(pipe.transformer)
        mods = _fused(names, mods, alpha, put, "lora_unet_")
    rename = _ldm_names(pipe.unet) if family == "sdxl" else {}
    prefix = "lora_transformer_" if family == "sd3" else "lora_unet_"  # ComfyUI's kohya-style SD3 prefix
    for module, tensors in mods.items():
        put(prefix + rename.get(module, module).replace(".", "_"), tensors, alpha)
    te_count = sum(1 for c in states if c.startswith("text_encoder"))
    for comp, state in states.items():
        if not comp.startswith("text_encoder"):
            continue
        te_prefix = "lora_te_" if te_count == 1 and family == "sd15" else TE_PREFIX[comp]
        for module, tensors in _modules(state).items():
            module = module if module.startswith("text_model.") else "text_model." + module
            put(te_prefix + module.replace(".", "_"), tensors, alpha)
    return out


def _ldm_names(unet: Any) -> dict[str, str]:
    """diffusers UNet module path -> the original (LDM) path, as kohya's SDXL files name them."""
    from ..models.single_file import ldm_module_name, unet_rules

    rules = unet_rules(dict(unet.config))
    out = {}
    for name, _ in unet.named_modules():
        ldm = ldm_module_name(name, rules)
        if ldm:
            out[name] = ldm
    return out


def _zimage_native(transformer: Any, mods: dict, alpha: float, put: Any, plain: bool, out: dict) -> dict:
    """Z-Image in its original module names behind `diffusion_model.` (ComfyUI's own Z-Image keys): each block's
    q/k/v fused into `attention.qkv` (block-diagonal) and `to_out.0` as `attention.out`, in the dotted
    `lora.down`/`lora.up` suffixes, the one spelling with a fused `qkv` that diffusers' Z-Image converter splits
    (ComfyUI reads it too). LoHa/LoKr/DoRA modules keep diffusers' paths (which ComfyUI's Z-Image map and
    diffusers' LoKr converter take) behind the same prefix; so do modules outside the blocks (`all_x_embedder…`,
    `t_embedder…`), which diffusers' converter knows only by those names."""
    from ..lora.kohya import zimage_native_names

    if plain:
        def put_dotted(stem: str, tensors: dict, al: float) -> None:
            put(stem, {"lora.down.weight": tensors["lora_down.weight"], "lora.up.weight": tensors["lora_up.weight"]},
                al)

        for module, tensors in _fused(zimage_native_names(transformer), mods, alpha, put_dotted,
                                      "diffusion_model.").items():
            put_dotted("diffusion_model." + module, tensors, alpha)
        return out
    for module, tensors in mods.items():
        put("diffusion_model." + module, tensors, alpha)
    return out


def _fused(names: dict, mods: dict, alpha: float, put: Any, prefix: str) -> dict:
    """Write the modules `names` (original name -> diffusers module or fused `Rows`) covers under `prefix` + the
    original name, fusing split projections block-diagonally (kohya's `split_qkv=False` layout); return the rest.

    A fused module's rank is r x parts, so its alpha is multiplied by the parts: alpha / rank stays the trained
    scale. A part the adapter does not train is a zero block."""
    import torch

    rest = {m: (t["lora_down.weight"], t["lora_up.weight"]) for m, t in mods.items()}
    for native, target in names.items():
        if isinstance(target, str):
            module = target.removeprefix("transformer.")
            if module in rest:
                a, b = rest.pop(module)
                put(prefix + native, {"lora_down.weight": a, "lora_up.weight": b}, alpha)
            continue
        parts = [(p.removeprefix("transformer."), rows) for p, rows in target.parts]
        if len(parts) < 2 or not any(p in rest for p, _ in parts):
            continue
        r = next(rest[p][0].shape[0] for p, _ in parts if p in rest)
        width = next(rest[p][0].shape[1] for p, _ in parts if p in rest)
        downs, up = [], torch.zeros(target.rows, r * len(parts))
        for i, (p, rows) in enumerate(parts):
            a, b = rest.pop(p) if p in rest else (torch.zeros(r, width), None)
            downs.append(a)
            if b is not None:
                (lo, hi), = rows
                up[lo:hi, i * r:(i + 1) * r] = b
        put(prefix + native, {"lora_down.weight": torch.cat(downs), "lora_up.weight": up}, alpha * len(parts))
    return {m: {"lora_down.weight": a, "lora_up.weight": b} for m, (a, b) in rest.items()}
