"""What is this LoRA file: format, target family and base model, ranks and alphas, components (the ONE home).

Everything here works on key names and tensor shapes only (a safetensors header is enough), so it runs before
any model loads and costs nothing for big files. Users: the LoRA loader (format routing, the base-model check),
`t2i-inspect FILE.safetensors`, and the model-families work ("a LoRA for another family is one line naming both").

Vocabulary:
- a *module key* is the part of a tensor key before its adapter suffix (`lora_unet_…_to_q` of
  `lora_unet_…_to_q.hada_w1_a`); its *flat name* is the module key without its component prefix, dots as `_`;
- a *kind* is what one module holds: `lora` (up/down, kohya or peft names), `locon` (a LoRA on a conv layer),
  `loha`, `lokr`, `full` (a stored difference), plus a DoRA flag (`dora_scale` / `lora_magnitude_vector`);
- a *family* is a model family id (`FAMILIES`), the same ids the model-families work uses.
"""

from __future__ import annotations

import json
import re
import struct
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.errors import ConfigError

# 1. Adapter suffixes: the last part of a tensor key -> (kind, role). Longest suffix wins.
SUFFIXES: dict[str, tuple[str, str]] = {
    **{s: ("lora", "down") for s in ("lora_down.weight", "lora_A.weight", "lora.down.weight",
                                     "lora_linear_layer.down.weight", "lora_A.default.weight")},
    **{s: ("lora", "up") for s in ("lora_up.weight", "lora_B.weight", "lora.up.weight",
                                   "lora_linear_layer.up.weight", "lora_B.default.weight")},
    "lora_mid.weight": ("lora", "mid"),
    **{f"hada_{p}": ("loha", p) for p in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f"lokr_{p}": ("lokr", p) for p in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
    "diff": ("full", "diff"),
    "diff_b": ("full", "diff_b"),
    "alpha": ("meta", "alpha"),
    "scale": ("meta", "scale"),
    "dora_scale": ("dora", "dora"),
    "lora_magnitude_vector": ("dora", "dora"),
    "lora_magnitude_vector.weight": ("dora", "dora"),
    "wd_for_diff": ("unknown", "DoRA on the difference weight (wd_for_diff)"),
    # LyCORIS / kohya algorithms this runner does not apply: named in the error
    "oft_blocks": ("unknown", "OFT/BOFT (oft_blocks)"),
    "oft_diag": ("unknown", "OFT (oft_diag)"),
    "rescale": ("unknown", "OFT/BOFT (rescale)"),
    "on_input": ("unknown", "(IA)³ (on_input)"),
    **{f"{p}.weight": ("unknown", "GLoRA (a1/a2/b1/b2)") for p in ("a1", "a2", "b1", "b2", "bm")},
    "w_norm": ("unknown", "norm (w_norm)"),
    "b_norm": ("unknown", "norm (b_norm)"),
    "bias": ("unknown", "bias (a stored bias change)"),
}
# XLabs Flux LoRAs name their factors `…processor.proj_lora1.down.weight` / `qkv_lora2.up.weight`
_XLABS = re.compile(r"^(.*\.processor\.(?:proj|qkv)_lora\d)\.(down|up)\.weight$")

# 2. Component prefixes, kohya-style (flat) and dotted. The denoiser (`unet` / `transformer`) is "denoiser".
FLAT_PREFIXES = (("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"), ("lora_te3_", "text_encoder_3"),
                 ("lora_te_", "text_encoder"), ("lora_unet_", "denoiser"), ("lora_transformer_", "denoiser"),
                 ("lycoris_", "denoiser"))
DOTTED_PREFIXES = (("text_encoder_2.", "text_encoder_2"), ("text_encoder_3.", "text_encoder_3"),
                   ("text_encoder.", "text_encoder"), ("unet.", "denoiser"), ("transformer.", "denoiser"),
                   ("model.diffusion_model.", "denoiser"), ("diffusion_model.", "denoiser"),
                   ("base_model.model.", "denoiser"))


@dataclass(frozen=True)
class Family:
    """A model family: its id, display name, and the flat denoiser names its LoRAs target (regexes)."""

    id: str
    name: str
    patterns: tuple[str, ...]  # regexes on flat denoiser names (component prefix removed, dots as `_`)
    formats: str  # LoRA key layouts seen for this family (for docs and `t2i-inspect`)


# 3. The per-family key-pattern table. A pattern that several families share (plain attention projections)
# is not listed: each pattern here points at one family (or, for the SD UNets, at the UNet layout).
FAMILIES: tuple[Family, ...] = (
    Family("sd15", "SD 1.x", (r"^(down|up)_blocks_\d_(attentions|resnets)_\d", r"^mid_block_",
                             r"^(input_blocks_(1[01]|[0-9])|output_blocks_(1[01]|[0-9])|middle_block)_\d"),
           "diffusers (unet.…), kohya/A1111 (lora_unet_…, lora_te_…), LyCORIS"),
    Family("sd2", "SD 2.x", (), "as SD 1.x; told apart by the cross-attention width (1024) and OpenCLIP-H"),
    Family("sdxl", "SDXL", (), "diffusers (unet.…, text_encoder_2.…), kohya (lora_unet_input_blocks_…, "
                               "lora_te1_…, lora_te2_…), LyCORIS"),
    Family("sd3", "SD3/3.5", (r"^joint_blocks_\d+_(x|context)_block_",),
           "diffusers (transformer.transformer_blocks.…), kohya/SAI (lora_unet_joint_blocks_…)"),
    Family("flux1", "Flux.1", (r"^double_blocks_\d+_(img|txt)_(attn_(qkv|proj)|mlp_[02]|mod_lin)$",
                               r"^single_blocks_\d+_(linear[12]|modulation_lin)$",
                               r"^double_blocks_\d+_processor_(proj|qkv)_lora\d$",
                               r"^single_transformer_blocks_\d+_(proj_mlp|proj_out|norm_linear|attn_to_[qkv])$"),
           "diffusers, kohya (lora_unet_double_blocks_…), XLabs (…processor.proj_lora1…), BFL "
           "(diffusion_model.double_blocks…), ai-toolkit, LyCORIS LoKr"),
    Family("flux2", "Flux.2", (r"^single_transformer_blocks_\d+_attn_to_(qkv_mlp_proj|out)$",
                               r"^transformer_blocks_\d+_(ff|ff_context)_linear_(in|out)$",
                               r"^(double|single)_stream_modulation"),
           "diffusers, BFL/ai-toolkit (diffusion_model.double_blocks…), LyCORIS LoKr (lycoris_…)"),
    Family("qwenimage", "Qwen-Image", (r"^transformer_blocks_\d+_(img|txt)_(mlp_net_(0_proj|2)|mod_1)$",),
           "diffusers, kohya (lora_unet_transformer_blocks_…), ai-toolkit (diffusion_model.…)"),
    Family("zimage", "Z-Image", (r"^(layers|noise_refiner|context_refiner)_\d+_(attention_(to_[qkv]|to_out_0|qkv|out)"
                                 r"|feed_forward_w[123]|adaLN_modulation_0)$",),
           "diffusers, kohya (lora_unet_layers_…), ai-toolkit (diffusion_model.layers…), LoKr"),
)
# Names several DiT families share: they narrow the candidates, and the hidden width narrows them further.
SHARED_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"^transformer_blocks_\d+_(ff|ff_context)_net_(0_proj|2)$", ("flux1", "sd3")),
    (r"^transformer_blocks_\d+_attn_(to_[qkv]|to_out_0|add_[qkv]_proj|to_add_out)$",
     ("flux1", "sd3", "qwenimage", "flux2")),
)
DIT_WIDTHS = {1536: ("sd3",), 2432: ("sd3",), 3072: ("flux1", "qwenimage", "flux2"), 6144: ("flux2",)}
FAMILY_NAMES = {f.id: f.name for f in FAMILIES}
_SD_UNET = ("sd15", "sd2", "sdxl")
DIFFUSERS_LOKR = ("flux2", "zimage")  # families whose LoKr files diffusers 0.42 converts and loads itself
CONTEXT_DIMS = {768: "sd15", 1024: "sd2", 2048: "sdxl"}  # the UNet's cross-attention width per SD family
_BLOCKS_XL = re.compile(r"^(input_blocks_[78]_1|output_blocks_[0-2]_1|(down|up)_blocks_[12]_attentions_\d)"
                        r"_transformer_blocks_[1-9]")  # transformer depth > 1: only SDXL has it
_BLOCKS_SD1 = re.compile(r"^(input_blocks_[12]_1|down_blocks_0_attentions|up_blocks_3_attentions|"
                         r"output_blocks_(9|1[01])_1)_")  # attention at full resolution: SD 1.x/2.x only
_ATTN2_KV = re.compile(r"attn2_to_[kv]$")


@dataclass
class Module:
    """One adapted module of a file: its tensors by role, shapes only (values only for scalars)."""

    key: str  # module key as in the file (`lora_unet_…_to_q`, `unet.down_blocks.0….to_q`)
    component: str  # denoiser, text_encoder, text_encoder_2, text_encoder_3
    flat: str  # component prefix removed, dots as `_`
    kind: str = ""  # lora, locon, loha, lokr, full; "" when it holds no weights
    roles: dict[str, tuple[int, ...]] = field(default_factory=dict)  # role -> shape
    alpha: float | None = None
    dora: bool = False
    unknown: str | None = None  # the algorithm named when this runner cannot apply it
    scale: float | None = None  # peft's alpha/r from the file's peft config (see `peft_scales`); None = from alpha

    @property
    def rank(self) -> int | None:
        r = self.roles
        if self.kind in ("lora", "locon") and "down" in r:
            return r["down"][0]
        if self.kind == "loha" and "w1_b" in r:
            return r["w1_b"][0]
        if self.kind == "lokr":  # low rank only where a factor is decomposed (else a full Kronecker factor)
            for role in ("w2_b", "w1_b"):
                if role in r:
                    return r[role][0]
        return None

    def weight_shape(self) -> tuple[int, ...] | None:
        """The (out, in, *kernel) shape of the weight change this module makes, from its factors' shapes."""
        r = self.roles
        try:
            if self.kind in ("lora", "locon"):
                up, down = r["up"], r["down"]
                if "mid" in r:
                    return (up[0], down[1], *r["mid"][2:])
                return (up[0], down[1], *down[2:])
            if self.kind == "loha":
                if "t1" in r:
                    return (r["w1_a"][1], r["w1_b"][1], *r["t1"][2:])
                return (r["w1_a"][0], r["w1_b"][1], *r["w1_b"][2:])
            if self.kind == "lokr":
                w1 = r["w1"] if "w1" in r else (r["w1_a"][0], r["w1_b"][1])
                if "w2" in r:
                    w2 = r["w2"]
                elif "t2" in r:
                    w2 = (r["w2_a"][1], r["w2_b"][1], *r["t2"][2:])
                else:
                    w2 = (r["w2_a"][0], r["w2_b"][1])
                return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
            if self.kind == "full":
                return r["diff"]
        except (KeyError, IndexError):
            return None
        return None

    def problem(self) -> str | None:
        """Why this module cannot be applied (a missing half of a pair, mismatched ranks), or None."""
        r, name = self.roles, self.key
        if self.unknown:
            return f"module {name} is {self.unknown}, a LyCORIS type this runner does not apply"
        if self.kind in ("lora", "locon"):
            for need in ("down", "up"):
                if need not in r:
                    have = "lora_up" if need == "down" else "lora_down"
                    return f"module {name} has {have} but no lora_{need} (a LoRA needs both halves)"
            if "mid" in r:
                if r["mid"][:2] != (r["up"][1], r["down"][0]):
                    return (f"module {name} has mismatched ranks: lora_up {list(r['up'])}, lora_mid {list(r['mid'])},"
                            f" lora_down {list(r['down'])}")
            elif r["up"][1] != r["down"][0]:
                return (f"module {name} has mismatched ranks: lora_up is {list(r['up'])} but lora_down is "
                        f"{list(r['down'])} (rank {r['up'][1]} vs {r['down'][0]})")
            return None
        if self.kind == "loha":
            missing = [f"hada_{p}" for p in ("w1_a", "w1_b", "w2_a", "w2_b") if p not in r]
            if missing:
                have = ", ".join(f"hada_{p}" for p in sorted(r))
                return f"module {name} has {have} but no {missing[0]} (a LoHa needs hada_w1_a/b and hada_w2_a/b)"
            for i in ("1", "2"):
                a, b, t = r[f"w{i}_a"], r[f"w{i}_b"], r.get(f"t{i}")
                rank_a = a[0] if t is not None else a[1]
                if rank_a != b[0] or (t is not None and t[:2] != (a[0], b[0])):
                    return (f"module {name} has mismatched ranks: hada_w{i}_a {list(a)}, hada_w{i}_b {list(b)}"
                            + (f", hada_t{i} {list(t)}" if t is not None else ""))
            if r["w1_b"][0] != r["w2_b"][0] and "t1" not in r:
                return (f"module {name} has mismatched ranks: hada_w1_b {list(r['w1_b'])} vs hada_w2_b "
                        f"{list(r['w2_b'])}")
            return None
        if self.kind == "lokr":
            for i in ("1", "2"):
                if f"w{i}" in r:
                    continue
                a, b = f"w{i}_a", f"w{i}_b"
                if a not in r or b not in r:
                    have = f"lokr_{a}" if a in r else f"lokr_{b}" if b in r else "neither"
                    return (f"module {name} has {have} but not lokr_w{i} or both lokr_{a} and lokr_{b} "
                            "(a LoKr factor is full or a pair)")
                t = r.get("t2") if i == "2" else None
                rank_a = r[a][0] if t is not None else r[a][1]
                if rank_a != r[b][0]:
                    return f"module {name} has mismatched ranks: lokr_{a} {list(r[a])}, lokr_{b} {list(r[b])}"
            return None
        if self.kind == "full" and "diff" not in r:
            return f"module {name} has diff_b but no diff"
        if not self.kind:
            return f"module {name} has {', '.join(sorted(self.roles)) or 'only an alpha'} but no weights"
        return None


@dataclass
class LoraInfo:
    """What a LoRA file is (see the module docstring); `problem` says why it cannot be applied, if so."""

    modules: dict[str, Module]
    unmatched: list[str]  # keys that are not adapter tensors (a model checkpoint has only these)
    metadata: dict[str, str]
    family: str | None = None  # a FAMILIES id; None = unknown
    family_candidates: tuple[str, ...] = ()  # when the keys fit several families
    context_dim: int | None = None  # SD UNets: the cross-attention width the file was made for
    text_widths: dict[str, int] = field(default_factory=dict)  # text encoder component -> hidden width
    layout: str = ""  # key layout: diffusers, peft, kohya, BFL, XLabs, ai-toolkit, LyCORIS

    @property
    def is_adapter(self) -> bool:
        return bool(self.modules)

    @property
    def kinds(self) -> Counter:
        return Counter(m.kind or "none" for m in self.modules.values())

    @property
    def dora(self) -> bool:
        return any(m.dora for m in self.modules.values())

    @property
    def needs_merge(self) -> bool:
        """True when diffusers cannot load the file faithfully: LoHa, LoKr, full, Tucker LoCon or DoRA — except
        the LoKr files diffusers loads itself (Flux.2 and Z-Image, into peft's LoKr layers)."""
        mods = self.modules.values()
        if self.family in DIFFUSERS_LOKR and all(m.kind == "lokr" and not m.dora for m in mods):
            return False
        return any(m.kind in ("loha", "lokr", "full") or m.dora or "mid" in m.roles for m in mods)

    @property
    def format(self) -> str:
        """`kohya LoRA`, `LyCORIS LoHa`, `kohya LoCon + DoRA`, `diffusers LoRA`, `LyCORIS LoHa + LoRA` …"""
        names = {"lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "full": "full (diff)"}
        kinds = [k for k, _ in self.kinds.most_common() if k in names]
        if "locon" in kinds and "lora" in kinds:
            kinds.remove("lora")  # a LoCon file is a LoRA that also adapts conv layers
        text = " + ".join(names[k] for k in kinds) or "no adapter weights"
        if any("mid" in m.roles for m in self.modules.values()):
            text += " (Tucker)"
        lycoris = any(k in kinds for k in ("loha", "lokr", "full")) or self.layout == "LyCORIS"
        prefix = "LyCORIS" if lycoris else self.layout
        return f"{prefix} {text}".strip() + (" + DoRA" if self.dora else "")

    @property
    def components(self) -> dict[str, int]:
        """Adapted modules per component (`denoiser` named `unet` or `transformer` by family)."""
        out: Counter = Counter()
        denoiser = "unet" if self.family in _SD_UNET or self.context_dim else "transformer"
        for m in self.modules.values():
            out[denoiser if m.component == "denoiser" else m.component] += 1
        return dict(out)

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values() if m.rank is not None})

    @property
    def alphas(self) -> list[float]:
        return sorted({m.alpha for m in self.modules.values() if m.alpha is not None})

    @property
    def unknown_types(self) -> list[str]:
        return sorted({m.unknown for m in self.modules.values() if m.unknown})

    def family_name(self) -> str:
        """`SDXL`, `SD 1.x`, `Flux.1 or SD3/3.5`, `an SD-style UNet (cross-attention width 64)` …"""
        if self.family:
            return FAMILY_NAMES[self.family]
        if self.family_candidates:
            return " or ".join(FAMILY_NAMES[f] for f in self.family_candidates)
        if self.context_dim:
            return f"an SD-style UNet (cross-attention width {self.context_dim})"
        return "an unknown model family"

    def problem(self) -> str | None:
        """The first reason the file cannot be applied as a whole, or None."""
        if not self.modules:
            return "no LoRA weights in it"
        for m in self.modules.values():
            why = m.problem()
            if why:
                return why
        return None


def _split_key(key: str) -> tuple[str, str] | None:
    """(module key, suffix) of an adapter tensor key; None when the key is no adapter tensor."""
    m = _XLABS.match(key)
    if m:
        return m.group(1), f"lora_{m.group(2)}.weight"
    best = None
    for suffix in SUFFIXES:
        if key.endswith("." + suffix) and (best is None or len(suffix) > len(best)):
            best = suffix
    if best is None:
        return None
    return key[: -len(best) - 1], best


def component_of(module_key: str) -> tuple[str, str]:
    """(component, flat name) of a module key: `lora_te2_text_model_…` -> (`text_encoder_2`, `text_model_…`)."""
    for prefix, comp in FLAT_PREFIXES:
        if module_key.startswith(prefix):
            return comp, module_key[len(prefix):]
    for prefix, comp in DOTTED_PREFIXES:
        if module_key.startswith(prefix):
            return comp, module_key[len(prefix):].replace(".", "_")
    return "denoiser", module_key.replace(".", "_")


def parse_modules(shapes: Mapping[str, Iterable[int]], scalars: Mapping[str, float] | None = None,
                  ) -> tuple[dict[str, Module], list[str]]:
    """Group tensor keys into modules (shapes only); return (modules, keys that are no adapter tensors)."""
    modules: dict[str, Module] = {}
    unmatched: list[str] = []
    for key, shape in shapes.items():
        split = _split_key(key)
        if split is None:
            unmatched.append(key)
            continue
        mkey, suffix = split
        kind, role = SUFFIXES[suffix]
        mod = modules.get(mkey)
        if mod is None:
            comp, flat = component_of(mkey)
            mod = modules[mkey] = Module(mkey, comp, flat)
        if kind == "meta":
            if role == "alpha" and scalars is not None and key in scalars:
                mod.alpha = float(scalars[key])
            continue
        if kind == "dora":
            mod.dora = True
            continue
        if kind == "unknown":
            mod.unknown = mod.unknown or role
            continue
        if mod.kind and mod.kind not in (kind, "locon"):
            mod.unknown = f"a mix of {mod.kind} and {kind} tensors"
        mod.kind = kind if mod.kind != "locon" or kind != "lora" else "locon"
        mod.roles[role] = tuple(int(d) for d in shape)
    for mod in modules.values():  # kohya's "LoCon": a LoRA on k×k conv layers (1×1 proj_in/out is plain LoRA)
        if mod.kind == "lora" and any(len(s) == 4 and s[2:] != (1, 1) for s in mod.roles.values()):
            mod.kind = "locon"
    # A checkpoint that happens to hold `….bias`/`….alpha`-like keys is no adapter: keep only modules with
    # adapter weights (or a named unknown algorithm) unless nothing else is there.
    # A model checkpoint's `….bias` / `….scale` keys make no adapter: a file is one when some module holds
    # adapter weights or a named LyCORIS algorithm; then every module with content counts.
    if not any(m.kind or (m.unknown and not m.unknown.startswith("bias")) for m in modules.values()):
        return {}, list(shapes)
    real = {k: m for k, m in modules.items() if m.kind or m.unknown}
    unmatched += [k for k in modules if k not in real]
    return real, unmatched


def _layout(modules: Mapping[str, Module]) -> str:
    keys = list(modules)
    if any(k.startswith(("lycoris_",)) for k in keys):
        return "LyCORIS"
    if any(".processor." in k for k in keys):
        return "XLabs"
    if any(k.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for k in keys):
        return "kohya"
    if any(k.startswith(("diffusion_model.", "model.diffusion_model.")) for k in keys):
        bfl = any(re.match(r"(model\.)?diffusion_model\.(double|single)_blocks\.", k) for k in keys)
        return "BFL" if bfl else "ai-toolkit"
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft"
    if any(k.startswith(("unet.", "transformer.", "text_encoder")) for k in keys):
        return "diffusers"
    return "peft"


def _in_width(mod: Module) -> int | None:
    shape = mod.weight_shape()
    return shape[1] if shape and len(shape) >= 2 else None


def _family(info: LoraInfo) -> None:
    """Fill `family`, `family_candidates`, `context_dim` and `text_widths` from names, shapes and metadata."""
    denoiser = [m for m in info.modules.values() if m.component == "denoiser"]
    for m in info.modules.values():
        if m.component != "denoiser" and m.component not in info.text_widths and m.flat.endswith(
                ("q_proj", "k_proj", "v_proj", "self_attn_out_proj")):
            width = _in_width(m)
            if width:
                info.text_widths[m.component] = width
    # 1. SD UNets: the UNet layout, then the cross-attention width tells SD 1.x / 2.x / XL apart.
    sd_names = [re.compile(p) for p in FAMILIES[0].patterns]
    if any(p.match(m.flat) for m in denoiser for p in sd_names) or (not denoiser and info.modules):
        widths = Counter(w for m in denoiser if _ATTN2_KV.search(m.flat) and (w := _in_width(m)))
        info.context_dim = widths.most_common(1)[0][0] if widths else None
        if info.context_dim in CONTEXT_DIMS:
            info.family = CONTEXT_DIMS[info.context_dim]
        elif info.context_dim is None:
            info.family = _sd_family_without_cross_attention(info, denoiser)
        return
    # 2. Transformer families: count the modules each family's own patterns match.
    scores: Counter = Counter()
    for fam in FAMILIES[3:]:
        pats = [re.compile(p) for p in fam.patterns]
        scores[fam.id] = sum(1 for m in denoiser if any(p.match(m.flat) for p in pats))
    _flux_version(info, denoiser, scores)
    best = [f for f, n in scores.most_common() if n and n == scores.most_common(1)[0][1]]
    if not best:  # only names several families share: narrow by the attention width
        shared = [(re.compile(p), fams) for p, fams in SHARED_PATTERNS]
        hits = [(m, fams) for m in denoiser for p, fams in shared if p.match(m.flat)]
        best = sorted({f for _, fams in hits for f in fams}, key=[f.id for f in FAMILIES].index)
        widths = Counter(w for m, _ in hits if (w := _in_width(m)))
        if widths and best:
            narrowed = [f for f in best if f in DIT_WIDTHS.get(widths.most_common(1)[0][0], ())]
            best = narrowed or best
    if len(best) == 1:
        info.family = best[0]
    elif best:
        info.family_candidates = tuple(best)


def _sd_family_without_cross_attention(info: LoraInfo, denoiser: list[Module]) -> str | None:
    """SD 1.x / 2.x / XL from the weaker hints: text encoders, transformer depth, block layout, metadata."""
    meta, te = info.metadata, info.text_widths.get("text_encoder")
    if not denoiser:  # text encoders only: CLIP-L is in SD 1.x, SDXL and Flux alike; only OpenCLIP-bigG is telling
        return "sdxl" if info.text_widths.get("text_encoder_2") == 1280 else None
    xl = ("text_encoder_2" in info.text_widths or any(m.component == "text_encoder_2" for m in info.modules.values())
          or any(_BLOCKS_XL.match(m.flat) for m in denoiser)
          or str(meta.get("ss_base_model_version", "")).startswith("sdxl")
          or "xl" in str(meta.get("modelspec.architecture", "")))
    if xl:
        return "sdxl"
    if te == 1024 or str(meta.get("ss_v2", "")) == "True":
        return "sd2"
    if te == 768 or (te is None and any(_BLOCKS_SD1.match(m.flat) for m in denoiser)):
        return "sd15"
    return None


def _flux_version(info: LoraInfo, denoiser: list[Module], scores: Counter) -> None:
    """BFL-layout keys are shared by Flux.1 and Flux.2: the fused single-block width tells them apart.

    Flux.1's `linear1` is 3 attention + 4 MLP widths (7x its input), Flux.2's 3 + 2x3 (SwiGLU, 9x).
    """
    for m in denoiser:
        if re.match(r"^single_blocks_\d+_linear1$", m.flat):
            shape = m.weight_shape()
            if shape and shape[1]:
                ratio = shape[0] / shape[1]
                if ratio == 9:
                    scores["flux2"] += scores.pop("flux1", 0) + 1
                return
        if re.match(r"^double_blocks_\d+_img_mlp_0$", m.flat):
            shape = m.weight_shape()
            if shape and shape[1] and shape[0] / shape[1] == 6:
                scores["flux2"] += scores.pop("flux1", 0) + 1
                return


def detect(shapes: Mapping[str, Iterable[int]], scalars: Mapping[str, float] | None = None,
           metadata: Mapping[str, str] | None = None) -> LoraInfo:
    """Describe an adapter from its tensor shapes (`{key: shape}`), `.alpha` values and safetensors metadata."""
    modules, unmatched = parse_modules(shapes, scalars)
    info = LoraInfo(modules, unmatched, dict(metadata or {}))
    info.layout = _layout(modules)
    if modules:
        _family(info)
        peft_scales(info)
    return info


def _peft_configs(meta: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The peft configs diffusers' `save_lora_weights` stores (`lora_adapter_metadata`: `{"unet.r": 4,
    "unet.lora_alpha": 2, …}`), per component prefix; {} when the file has none."""
    try:
        flat = json.loads(meta.get("lora_adapter_metadata") or "{}")
    except ValueError:
        return {}
    out: dict[str, dict[str, Any]] = {}
    if isinstance(flat, dict):
        for key, value in flat.items():
            comp, _, name = str(key).partition(".")
            if name:
                out.setdefault(comp, {})[name] = value
    return out


def _pattern(patterns: Any, name: str, default: Any) -> Any:
    """peft's `get_pattern_key`: the first `rank_pattern`/`alpha_pattern` key matching the module name's end."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def peft_scales(info: LoraInfo) -> None:
    """Set each module's `alpha` and `scale` from the file's peft config where it has no `.alpha` key: peft's
    own rule (`r`/`lora_alpha` for LoRA and DoRA, `r`/`alpha` for LoHa/LoKr, `rank_pattern`/`alpha_pattern` per
    module, rsLoRA's alpha/sqrt(r)). For LoKr the scale is alpha/r even with two full factors (peft applies it;
    A1111/LyCORIS would not), so it is `scale`, not derived from the factors' shapes."""
    configs = _peft_configs(info.metadata)
    if not configs:
        return
    for key, mod in info.modules.items():
        comp, _, name = key.partition(".")
        conf = configs.get(comp)
        if mod.alpha is not None or not conf or not name or "r" not in conf:
            continue
        rank = _pattern(conf.get("rank_pattern"), name, conf["r"])
        alpha = _pattern(conf.get("alpha_pattern"), name, conf.get("lora_alpha", conf.get("alpha", rank)))
        if not rank or alpha is None:
            continue
        mod.alpha = float(alpha)
        mod.scale = float(alpha) / (float(rank) ** 0.5 if conf.get("use_rslora") else float(rank))


def detect_state(state: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> LoraInfo:
    """`detect` on loaded tensors."""
    shapes = {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}
    scalars = {k: float(v) for k, v in state.items() if k.endswith(".alpha") and hasattr(v, "numel")
               and v.numel() == 1}
    return detect(shapes, scalars, metadata)


def read_header(path: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str], dict[str, str]]:
    """(shapes, dtypes, metadata) of a safetensors file from its JSON header, without reading tensors."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > 100_000_000:
                raise ValueError(f"header length {n} is not plausible")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as exc:
        raise ConfigError(f"{path} is not a readable safetensors file ({exc})") from exc
    # the format's rules (safetensors checks them when it loads): an object of {dtype, shape, data_offsets} per
    # tensor and an optional string-to-string __metadata__; anything else is one line here, not a TypeError later
    meta = header.pop("__metadata__", None) if isinstance(header, dict) else None
    bad = not isinstance(header, dict) or not isinstance(meta or {}, dict) or any(
        not isinstance(v, dict) or not isinstance(v.get("dtype"), str) or not isinstance(v.get("shape"), list)
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v["shape"])
        for v in header.values())
    if bad:
        raise ConfigError(f"{path} is not a readable safetensors file (its header is not a map of tensors, each "
                          "with a dtype and a shape, and string metadata)")
    shapes = {k: tuple(v["shape"]) for k, v in header.items()}
    dtypes = {k: v["dtype"] for k, v in header.items()}
    return shapes, dtypes, {str(k): str(v) for k, v in (meta or {}).items()}


def detect_file(path: str | Path) -> LoraInfo:
    """`detect` on a safetensors file: header plus the few scalar `.alpha` tensors."""
    shapes, _, meta = read_header(path)
    scalars: dict[str, float] = {}
    alpha_keys = [k for k, s in shapes.items() if k.endswith(".alpha") and len(s) <= 1]
    if alpha_keys:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            for k in alpha_keys:
                scalars[k] = float(f.get_tensor(k).float().reshape(-1)[0])
    return detect(shapes, scalars, meta)


# 4. The loaded model's side of the base-model check.
def model_family(pipe: Any) -> tuple[str | None, int | None]:
    """(family id, cross-attention width for SD UNets) of a loaded pipeline; (None, None) if unknown.

    # TODO(wt-14): take the family from the model-families registry once it lands; this is its SD-only stand-in
    # plus the pipeline class names of the other families.
    """
    name = type(pipe).__name__
    unet = getattr(pipe, "unet", None)
    width = getattr(getattr(unet, "config", None), "cross_attention_dim", None)
    width = width[0] if isinstance(width, (list, tuple)) else width
    if "XL" in name and unet is not None:
        return "sdxl", width
    if unet is not None and name.startswith("StableDiffusion"):
        return CONTEXT_DIMS.get(width, "sd15"), width
    for prefix, fam in (("Flux2", "flux2"), ("Flux", "flux1"), ("StableDiffusion3", "sd3"),
                        ("QwenImage", "qwenimage"), ("ZImage", "zimage")):
        if name.startswith(prefix):
            return fam, None
    return None, width


def _model_name(pipe: Any, family: str | None, width: int | None) -> str:
    """`SD 1.x (StableDiffusionPipeline)`; a UNet of no known SD size is `an SD-style UNet (…)`."""
    known = family and (family not in _SD_UNET or width is None or CONTEXT_DIMS.get(width) == family)
    return f"{FAMILY_NAMES[family] if known else 'an SD-style UNet'} ({type(pipe).__name__})"


def check_base(info: LoraInfo, pipe: Any, file: str) -> None:
    """One line naming both when a LoRA was made for another family or base model than `pipe`'s."""
    fam, width = model_family(pipe)
    head = f"{file} is not a LoRA for this model: it was made for"
    lora = info.family_name()
    if info.context_dim and width and info.context_dim != width:
        lora = lora if info.family else "an SD-style UNet"
        raise ConfigError(f"{head} {lora} (cross-attention width {info.context_dim}), the loaded model is "
                          f"{_model_name(pipe, fam, width)} with width {width}; use a LoRA made for this model")
    if fam is None:
        return
    lora_fams = (info.family,) if info.family else info.family_candidates
    if not lora_fams or fam in lora_fams:
        return
    if fam in _SD_UNET and set(lora_fams) <= set(_SD_UNET) and info.context_dim is None:
        # no cross-attention layer in the file: only a text-encoder or structural hint; decide on those
        if "text_encoder_2" in info.text_widths and getattr(pipe, "text_encoder_2", None) is not None:
            return
        if fam in ("sd15", "sd2") and width not in CONTEXT_DIMS:
            return  # a test-size UNet: its shapes decide (the loader's shape check)
    model = _model_name(pipe, fam, width)
    raise ConfigError(f"{head} {lora}, the loaded model is {model}; load a {lora} model or use a LoRA made for "
                      f"{model.split(' (')[0]}")


# 4b. The same rule before any model loads (run.plan_models): the model's family against the file's.
MODEL_FAMILY = {"sd2": "sd15"}  # detect ids -> models/families.py ids (there SD 2.x is the SD 1.x family)
_GROUPS = {"Stable Diffusion 1.x/XL": ("sd15", "sdxl"), "Flux": ("flux1", "flux2")}  # told apart only by shapes


def model_families(info: LoraInfo) -> tuple[str, ...]:
    """The models/families.py ids a LoRA can be for; () when its keys do not tell. An SD UNet file whose
    cross-attention width is no real model's (a test-size UNet) is SD 1.x/2.x or SDXL, SDXL alone with a second
    text encoder (OpenCLIP-bigG, SDXL's)."""
    found = (info.family,) if info.family else info.family_candidates
    if not found and info.context_dim is not None:
        found = ("sdxl",) if "text_encoder_2" in info.text_widths or any(
            m.component == "text_encoder_2" for m in info.modules.values()) else ("sd15", "sdxl")
    return tuple(dict.fromkeys(MODEL_FAMILY.get(f, f) for f in found))


def check_family(file: str, family: Any, model: str, where: str = "") -> None:
    """ConfigError (one line naming both families) when a LoRA file is clearly for another family than the model
    (`family`: a models/families.py Family), from its safetensors header only. Across groups (an SD LoRA on Flux)
    it names the group; within one (an SDXL LoRA on SD 1.5) the exact family."""
    from ..common.paths import is_safetensors
    from ..models.families import FAMILIES as MODEL_FAMILIES

    if not is_safetensors(file) or family.name.startswith("other:"):
        return
    try:
        found = model_families(detect_file(file))
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the loader with its own message
        return
    if not found or family.name in found:
        return
    group = next((g for g, members in _GROUPS.items() if set(found) <= set(members)), None)
    if group and (len(found) > 1 or family.name not in _GROUPS[group]):
        name = group
    else:
        name = " or ".join(MODEL_FAMILIES[f].label for f in found)
    raise ConfigError(f"{where}{file} is a LoRA for {name}, but the model {model!r} is {family.label}; use a "
                      f"{family.label} LoRA or another model")


# 5. Kohya training metadata (`ss_*`) for `t2i-inspect`.
def training_summary(meta: Mapping[str, str], top: int = 10) -> dict[str, Any]:
    """Base model, resolution, epochs, steps, and the most frequent caption tags (likely trigger words)."""
    out: dict[str, Any] = {}
    for key, label in (("ss_sd_model_name", "base model"), ("ss_base_model_version", "base model version"),
                       ("ss_resolution", "resolution"), ("ss_epoch", "epoch"), ("ss_num_epochs", "epochs"),
                       ("ss_steps", "steps"), ("ss_max_train_steps", "max steps"),
                       ("ss_network_module", "network module"), ("ss_network_dim", "network dim"),
                       ("ss_network_alpha", "network alpha"), ("ss_network_args", "network args"),
                       ("ss_learning_rate", "learning rate"), ("ss_num_train_images", "train images"),
                       ("ss_output_name", "output name"), ("ss_training_comment", "comment"),
                       ("modelspec.architecture", "architecture"), ("modelspec.title", "title"),
                       ("modelspec.trigger_phrase", "trigger phrase")):
        value = meta.get(key)
        if value not in (None, "", "None"):
            out[label] = value
    tags: Counter = Counter()
    try:
        freq = json.loads(meta.get("ss_tag_frequency") or "{}")
    except ValueError:
        freq = {}
    if isinstance(freq, dict):
        for folder in freq.values():
            if isinstance(folder, dict):
                for tag, n in folder.items():
                    if isinstance(n, int | float):
                        tags[str(tag).strip()] += int(n)
    if tags:
        out["top tags"] = [t for t, _ in tags.most_common(top)]
    return out


# 6. Files that are no adapter: a short guess of what model checkpoint it is (for `t2i-inspect`).
_CHECKPOINT_MARKERS = (  # (key prefix or fragment, family, layout)
    ("conditioner.embedders.1.", "sdxl", "LDM single file"),
    ("cond_stage_model.model.transformer.", "sd2", "LDM single file"),
    ("cond_stage_model.transformer.", "sd15", "LDM single file"),
    ("model.diffusion_model.joint_blocks.", "sd3", "SAI single file"),
    ("model.diffusion_model.input_blocks.", "sd15", "LDM single file (UNet only)"),
    ("double_blocks.", "flux1", "BFL transformer"),
    ("joint_blocks.", "sd3", "SAI transformer"),
    ("down_blocks.", None, "diffusers UNet/VAE component"),
    ("transformer_blocks.", None, "diffusers transformer component"),
    ("text_model.encoder.", None, "CLIP text encoder"),
    ("encoder.block.", None, "T5 encoder"),
)


def checkpoint_kind(shapes: Mapping[str, Iterable[int]]) -> tuple[str | None, str]:
    """(family id or None, layout) of a model checkpoint from its key names."""
    keys = list(shapes)
    for marker, family, layout in _CHECKPOINT_MARKERS:
        if any(k.startswith(marker) or f".{marker}" in k for k in keys):
            if family == "flux1" and any(k.endswith("stream_modulation.lin.weight") or "stream_modulation" in k
                                         for k in keys):
                return "flux2", layout
            return family, layout
    return None, "unknown layout"
