"""Small LyCORIS / kohya / DoRA files for the tiny models, written the way kohya sd-scripts and LyCORIS name them.

`lycoris_state(pipe, kind)` returns a state dict with kohya module names (`lora_unet_…`, `lora_te_…`) and the
tensor names and shapes LyCORIS writes (`hada_w1_a` [out, r], `lokr_w1`, `lora_mid`, `dora_scale` [1, in, …]).
"""

from __future__ import annotations

from pathlib import Path

import torch

UNET_LINEAR = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
               "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
TE_LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
KINDS = ("lora", "locon", "locon_tucker", "loha", "loha_tucker", "lokr", "lokr_full", "full")


def targets(pipe, conv: bool, te: bool = True, sdxl: bool = False) -> dict[str, tuple[str, torch.Tensor]]:
    """kohya module name -> (module path, base weight) for the modules a LyCORIS file would adapt.

    `sdxl`: kohya's SDXL names: UNet modules by their LDM path (`lora_unet_input_blocks_4_1_…`), `lora_te1_`
    and `lora_te2_` for the two text encoders. The UNet names come from the runner's LDM mapper, which
    test_lora_zoo.py::test_kohya_sdxl_names_are_the_real_ones pins to real kohya SDXL names (and diffusers' reader).
    """
    from runner.models.single_file import ldm_module_name, unet_rules

    rules = unet_rules(dict(pipe.unet.config)) if sdxl else None
    out = {}
    for name, module in pipe.unet.named_modules():
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() < 2:
            continue
        linear = name.endswith(UNET_LINEAR) or name.endswith(("proj_in", "proj_out"))
        is_conv = conv and w.dim() == 4 and (name.endswith(("conv1", "conv2", "conv_shortcut", "conv")))
        if linear or is_conv:
            flat = ldm_module_name(name, rules) if rules else name
            out["lora_unet_" + flat.replace(".", "_")] = (f"unet.{name}", w)
    encoders = [("text_encoder", "lora_te1_" if sdxl else "lora_te_")] if te else []
    if te and sdxl:
        encoders.append(("text_encoder_2", "lora_te2_"))
    for comp, prefix in encoders:
        for name, module in getattr(pipe, comp).named_modules():
            if name.endswith(TE_LINEAR):
                flat = name if name.startswith("text_model.") else "text_model." + name
                out[prefix + flat.replace(".", "_")] = (f"{comp}.{name}", module.weight)
    return out


def _factor(n: int) -> int:
    """The largest divisor of `n` up to its square root (LyCORIS' `factorization` picks similar pairs)."""
    for a in range(int(n ** 0.5), 0, -1):
        if n % a == 0:
            return a
    return 1


def module_tensors(kind: str, w: torch.Tensor, rank: int, gen: torch.Generator, std: float) -> dict[str, torch.Tensor]:
    """LyCORIS tensors (names without the module key) for one base weight `w` [out, in, *k]."""
    out_dim, in_dim, *k = w.shape
    conv = bool(k) and k != [1, 1]

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    if kind in ("lora", "locon") or (kind == "locon_tucker" and not conv):
        return {"lora_down.weight": rnd(rank, in_dim, *k), "lora_up.weight": rnd(out_dim, rank, *([1, 1] if k else []))}
    if kind == "locon_tucker":
        return {"lora_down.weight": rnd(rank, in_dim, 1, 1), "lora_mid.weight": rnd(rank, rank, *k),
                "lora_up.weight": rnd(out_dim, rank, 1, 1)}
    if kind == "loha" or (kind == "loha_tucker" and not conv):
        flat_in = in_dim * (k[0] * k[1] if k else 1)
        return {"hada_w1_a": rnd(out_dim, rank), "hada_w1_b": rnd(rank, flat_in),
                "hada_w2_a": rnd(out_dim, rank), "hada_w2_b": rnd(rank, flat_in)}
    if kind == "loha_tucker":
        return {"hada_w1_a": rnd(rank, out_dim), "hada_w1_b": rnd(rank, in_dim), "hada_t1": rnd(rank, rank, *k),
                "hada_w2_a": rnd(rank, out_dim), "hada_w2_b": rnd(rank, in_dim), "hada_t2": rnd(rank, rank, *k)}
    if kind in ("lokr", "lokr_full"):
        a, b = _factor(out_dim), _factor(in_dim)  # w1 [a, b], w2 [out/a, in/b, *k]
        c, d = out_dim // a, in_dim // b
        t = {"lokr_w1": rnd(a, b)}
        if kind == "lokr_full" or conv:
            t["lokr_w2"] = rnd(c, d, *k)
        else:
            t["lokr_w2_a"], t["lokr_w2_b"] = rnd(c, rank), rnd(rank, d)
        return t
    if kind == "full":
        return {"diff": rnd(*w.shape)}
    raise ValueError(kind)


def lycoris_state(pipe, kind: str, rank: int = 2, alpha: float = 1.0, seed: int = 0, dora: bool = False,
                  std: float = 0.3, te: bool = True, sdxl: bool = False) -> dict[str, torch.Tensor]:
    """A whole LyCORIS-style file for `pipe` (tiny SD): UNet attention/FF (+ conv layers except for `lora`),
    text-encoder attention; `dora` adds A1111-style per-input `dora_scale`s."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, (_, w) in targets(pipe, conv=kind != "lora", te=te, sdxl=sdxl).items():
        for name, t in module_tensors(kind, w, rank, gen, std).items():
            state[f"{key}.{name}"] = t.contiguous()
        if kind != "full":
            state[f"{key}.alpha"] = torch.tensor(float(alpha))
        if dora:
            w0 = w.detach().float().cpu()
            norm = w0.transpose(0, 1).reshape(w0.shape[1], -1).norm(dim=1, keepdim=True)
            scale = norm.reshape(w0.shape[1], *[1] * (w0.dim() - 1)).transpose(0, 1)
            state[f"{key}.dora_scale"] = scale * (1 + 0.2 * torch.rand(scale.shape, generator=gen))
    return state


def write(state: dict, path: Path, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata or {"ss_network_module": "lycoris.kohya"})
    return path
