"""LoRA block-weight specs as the config writes them (sd-webui-lora-block-weight's notation): a preset name or a
list of weights. What the blocks are for a model lives in runner/lora/blocks.py."""

from __future__ import annotations

import math
from typing import Any

from ..common.errors import ConfigError, did_you_mean

PRESETS = ("ALL", "NONE", "INS", "IND", "INALL", "MIDD", "OUTD", "OUTS", "OUTALL", "ALL0.5")
BlockSpec = str | tuple[float, ...]  # a preset name or the weights in table order


def parse_spec(where: str, value: Any) -> BlockSpec | None:
    """A config value (preset name, `"1,0,0.5,…"` as A1111 writes it, or a list of numbers) -> a BlockSpec.

    The length is checked against the model later (`BlockTable.weights`), before anything is written.
    """
    if value is None or value == "null":
        return None
    if isinstance(value, str):
        text = value.strip()
        if "," not in text:
            if text.upper() in PRESETS:
                return text.upper()
            raise ConfigError(f"{where}={value!r} is not a block-weight preset{did_you_mean(text.upper(), PRESETS)};"
                              f" valid: {', '.join(PRESETS)}, or a list of weights (e.g. 1,0,0,0,1,1,…)")
        value = [v.strip() for v in text.split(",")]
    if not isinstance(value, list | tuple) or not value:
        raise ConfigError(f"{where}={value!r} is not valid; give a preset ({', '.join(PRESETS)}) or a list of "
                          "block weights")
    out = []
    for i, v in enumerate(value):
        try:
            if isinstance(v, bool):
                raise ValueError
            num = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}[{i}]={v!r} is not a number; block weights are numbers "
                              "(A1111's random R/U/X values are not supported)") from None
        if not math.isfinite(num) or abs(num) > 10:
            raise ConfigError(f"{where}[{i}]={v!r} is out of range; valid: -10 to 10")
        out.append(num)
    return tuple(out)


def spec_label(spec: BlockSpec | None) -> str | None:
    """A short text for file names, grids and records: the preset name or `1,0,0.5,…`."""
    if spec is None or isinstance(spec, str):
        return spec
    return ",".join(f"{w:g}" for w in spec)
