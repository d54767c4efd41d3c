"""LoRA block weights, as sd-webui-lora-block-weight (hako-mikan) gives them to A1111 users.

A block-weight spec is a named preset (`ALL`, `INS`, `IND`, `INALL`, `MIDD`, `OUTD`, `OUTS`, `OUTALL`, `NONE`,
`ALL0.5`) or a list of weights in the extension's block order: for an SD UNet the LDM blocks `BASE` (text
encoders), `IN00…`, `M00`, `OUT00…`; the short table holds the blocks with attention (SD 1.x: 17, SDXL: 12),
the full table every block (SD 1.x: 26, SDXL: 20); Flux.1: `CLIP, T5, IN, D00…D18, S00…S37, OUT` (61).

As in the extension, a module outside every block (time embedding, output conv) keeps weight 1, and a list in
the short table gives 0 to the blocks it does not list (a LoCon's conv-only blocks). A preset is defined by
what it means (shallow/deep input and output halves, as the extension's SD 1.x presets), so it covers the full
table too and `ALL` is 1 everywhere: exactly the plain LoRA.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ..common.errors import ConfigError
from ..config.blocks import BlockSpec


@dataclass(frozen=True)
class BlockTable:
    """The blocks of one loaded model and where each module path belongs."""

    family: str  # "sd-unet" or "flux"
    short: tuple[str, ...]  # SD: BASE + blocks with attention + M00 ... (17 / 12); Flux: the 61-table
    full: tuple[str, ...]  # SD: every block (26 / 20); Flux: same as short
    block_of: Callable[[str], str | None] = field(compare=False)  # module path -> block id (None = outside)
    groups: dict[str, str] = field(default_factory=dict, compare=False)  # SD: block id -> preset group

    @cached_property
    def lengths(self) -> tuple[int, ...]:
        return tuple(sorted({len(self.short), len(self.full)}))

    def weights(self, spec: BlockSpec, where: str) -> dict[str, float]:
        """Block id -> weight for a spec; ConfigError for a list of the wrong length or a preset without meaning."""
        if isinstance(spec, str):
            return self._preset(spec, where)
        if len(spec) == len(self.full):
            return dict(zip(self.full, spec, strict=True))
        if len(spec) == len(self.short):
            weights = dict.fromkeys(self.full, 0.0)  # the extension: blocks a short list does not name get 0
            weights.update(zip(self.short, spec, strict=True))
            return weights
        names = " or ".join(str(n) for n in self.lengths)
        raise ConfigError(f"{where} has {len(spec)} block weights; this model takes {names} "
                          f"({', '.join(self.short)}" + (f" / {len(self.full)}: every block" if
                                                          len(self.full) != len(self.short) else "") + ")")

    def _preset(self, name: str, where: str) -> dict[str, float]:
        if name in ("ALL", "NONE", "ALL0.5"):
            value = {"ALL": 1.0, "NONE": 0.0, "ALL0.5": 0.5}[name]
            return dict.fromkeys(self.full, value)
        if self.family != "sd-unet":
            raise ConfigError(f"{where}={name!r} is a preset for SD UNets; for this model use ALL, NONE, ALL0.5 or "
                              f"a list of {len(self.full)} weights ({', '.join(self.full[:4])}, …)")
        on = {"INS": {"base", "in_s"}, "IND": {"base", "in_d"}, "INALL": {"base", "in_s", "in_d"},
              "MIDD": {"base", "in_d", "mid", "out_d"}, "OUTD": {"base", "out_d"}, "OUTS": {"base", "out_s"},
              "OUTALL": {"base", "out_d", "out_s"}}[name]
        return {b: 1.0 if self.groups[b] in on else 0.0 for b in self.full}

    def function(self, spec: BlockSpec | None, where: str) -> Callable[[str], float] | None:
        """The merge engine's per-module multiplier for a spec; None when every weight is 1 (the plain LoRA)."""
        if spec is None:
            return None
        weights = self.weights(spec, where)
        if all(w == 1.0 for w in weights.values()):
            return None  # `ALL`: the very same path as no block weights, so the pixels are the plain LoRA's
        return BlockFunction(self, tuple(sorted(weights.items())))


@dataclass(frozen=True)
class BlockFunction:
    """path -> weight of its block (1 outside every block); equal specs give equal functions (hashable)."""

    table: BlockTable
    items: tuple[tuple[str, float], ...]

    @cached_property
    def _weights(self) -> dict[str, float]:
        return dict(self.items)

    def __call__(self, path: str) -> float:
        block = self.table.block_of(path)
        return 1.0 if block is None else self._weights.get(block, 1.0)


def _ldm_block(ldm: str) -> str | None:
    m = re.match(r"^(input_blocks|output_blocks)\.(\d+)\.", ldm)
    if m:
        return f"{'IN' if m.group(1) == 'input_blocks' else 'OUT'}{int(m.group(2)):02d}"
    return "M00" if ldm.startswith("middle_block.") else None


def _unet_table(unet: Any) -> BlockTable:
    """The SD UNet table from its config (LDM block numbering, as `models/single_file.py` lays it out)."""
    from ..models.single_file import ldm_module_name, unet_rules

    cfg = dict(unet.config)
    n, per = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    if not isinstance(per, int):
        raise ConfigError("block weights need an SD UNet with the same layers_per_block in every block")
    down = cfg.get("down_block_types") or ()
    up = cfg.get("up_block_types") or ()
    last_in = n * (per + 1) - 1
    in_attn = [1 + b * (per + 1) + j for b in range(n) for j in range(per) if "CrossAttn" in down[b]]
    out_attn = [b * (per + 1) + j for b in range(n) for j in range(per + 1) if "CrossAttn" in up[b]]
    mid = "M00" if "CrossAttn" in str(cfg.get("mid_block_type") or "UNetMidBlock2DCrossAttn") else None
    short = ("BASE", *(f"IN{i:02d}" for i in in_attn), *([mid] if mid else []), *(f"OUT{i:02d}" for i in out_attn))
    full = ("BASE", *(f"IN{i:02d}" for i in range(last_in + 1)), "M00",
            *(f"OUT{i:02d}" for i in range(n * (per + 1))))
    # Preset groups: the first half of the attention input blocks is shallow (SD 1.x: IN01 IN02 IN04), the
    # first half of the attention output blocks deep (SD 1.x: OUT03-06); other blocks join their side.
    split_in = in_attn[math.ceil(len(in_attn) / 2) - 1] if in_attn else -1
    split_out = out_attn[len(out_attn) // 2 - 1] if len(out_attn) > 1 else (out_attn[0] - 1 if out_attn else -1)
    groups = {"BASE": "base", "M00": "mid"}
    for i in range(last_in + 1):
        groups[f"IN{i:02d}"] = "in_s" if i <= split_in else "in_d"
    for i in range(n * (per + 1)):
        groups[f"OUT{i:02d}"] = "out_d" if i <= split_out else "out_s"
    rules = unet_rules(cfg)

    @functools.cache
    def block_of(path: str) -> str | None:
        comp, _, rest = path.partition(".")
        if comp.startswith("text_encoder"):
            return "BASE"
        if comp != "unet":
            return None
        ldm = ldm_module_name(rest, rules)
        return _ldm_block(ldm) if ldm else None

    return BlockTable("sd-unet", short, full, block_of, groups)


def _flux_table(transformer: Any) -> BlockTable:
    double = len(getattr(transformer, "transformer_blocks", ()))
    single = len(getattr(transformer, "single_transformer_blocks", ()))
    ids = ("CLIP", "T5", "IN", *(f"D{i:02d}" for i in range(double)), *(f"S{i:02d}" for i in range(single)), "OUT")

    def block_of(path: str) -> str | None:
        comp, _, rest = path.partition(".")
        if comp in ("text_encoder", "text_encoder_2"):
            return "CLIP" if comp == "text_encoder" else "T5"
        m = re.match(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.", rest)
        if m:
            return f"{'D' if m.group(1) == 'transformer_blocks' else 'S'}{int(m.group(2)):02d}"
        if rest.startswith(("x_embedder", "context_embedder", "time_text_embed")):
            return "IN"
        if rest.startswith(("norm_out", "proj_out")):
            return "OUT"
        return None

    return BlockTable("flux", ids, ids, block_of)


def model_blocks(pipe: Any) -> BlockTable:
    """The block table of a loaded pipeline: SD UNets (SD 1.x/2.x/XL and test sizes) and Flux.1."""
    unet = getattr(pipe, "unet", None)
    if unet is not None and "block_out_channels" in getattr(unet, "config", {}):
        return _unet_table(unet)
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None and hasattr(transformer, "single_transformer_blocks") and type(
            transformer).__name__.startswith("Flux") and not type(transformer).__name__.startswith("Flux2"):
        return _flux_table(transformer)
    raise ConfigError(f"LoRA block weights are not available for {type(pipe).__name__}; they exist for SD UNets "
                      "(SD 1.x/2.x/XL) and Flux.1")


def check_specs(table: BlockTable, specs: Sequence[tuple[str, BlockSpec]]) -> None:
    """Check every spec of a run against the model's table (lengths, presets) before anything is written."""
    for where, spec in specs:
        table.weights(spec, where)



def block_resolver(pipe: Any, spec: Any) -> Callable[[tuple[BlockSpec | None, ...]], tuple[Any, ...] | None]:
    """Check every block-weight spec of a run (`lora_sets[..].blocks`, `lora_blocks`) against the model now,
    before anything is written; return job.adapter_blocks -> the merge engine's per-adapter multipliers."""
    used = [(f"lora_sets[{i}][{j}].blocks", s.blocks) for i, specs in enumerate(spec.lora_sets)
            for j, s in enumerate(specs) if s.blocks is not None]
    if any(spec.lora_sets):
        used += [(f"lora_blocks[{i}]", b) for i, b in enumerate(spec.lora_blocks) if b is not None]
    if not used:
        return lambda specs: None
    table = model_blocks(pipe)
    functions = {b: table.function(b, where) for where, b in used}
    return lambda specs: tuple(None if b is None else functions[b] for b in specs)
