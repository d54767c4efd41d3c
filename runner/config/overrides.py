"""Pre-check of command-line overrides against a schema, before Hydra runs (one line, with a 'did you mean')."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..common.errors import ConfigError, did_you_mean, first_line
from .schema import RunConfig

# conf/ sits at the top of a checkout; a wheel carries it as runner/conf/ (setup.py)
_PACKED_CONF = Path(__file__).resolve().parent.parent / "conf"
CONF_DIR = _PACKED_CONF if _PACKED_CONF.is_dir() else Path(__file__).resolve().parent.parent.parent / "conf"
_KINDS = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}


def _fields(obj: Any) -> dict[str, Any]:
    return {f.name: f for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}


def leaf_keys(schema: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a structured-config schema (`train.steps`, `model.id`, …)."""
    out = []
    for name, f in _fields(schema).items():
        factory = f.default_factory
        child = factory() if factory is not dataclasses.MISSING else None
        out += leaf_keys(child, f"{prefix}{name}.") if dataclasses.is_dataclass(child) else [f"{prefix}{name}"]
    return out


def key_hint(key: str, schema: Any) -> str:
    """` (did you mean 'train.steps'?)` for a mistyped dotted key: the closest full key, by path or by last part."""
    keys = leaf_keys(schema)
    hint = did_you_mean(key, keys)
    if hint:
        return hint
    by_leaf: dict[str, str] = {}
    for k in keys:
        by_leaf.setdefault(k.rsplit(".", 1)[-1], k)
    return did_you_mean(key.rsplit(".", 1)[-1], by_leaf)


def check_override(text: str, schema: Any = RunConfig, prog: str = "t2i", groups: tuple[str, ...] | None = None
                   ) -> None:
    """Reject an unknown key (of `schema`) or config-group option before Hydra runs (with a 'did you mean')."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        (ov,) = OverridesParser.create().parse_overrides([text])
    except Exception as exc:  # noqa: BLE001 - Hydra's grammar errors
        raise ConfigError(f"cannot parse override {text!r}: {first_line(exc)}") from exc
    key = ov.key_or_group
    if key.startswith("hydra") or ov.is_delete():
        return
    group_dir = CONF_DIR / key
    if group_dir.is_dir() and "." not in key and (groups is None or key in groups):
        if ov.is_sweep_override():
            return
        options = sorted(p.stem for p in group_dir.glob("*.yaml"))
        value = str(ov.value())
        if value not in options:
            raise ConfigError(f"unknown {key} {value!r}{did_you_mean(value, options)}; valid: "
                              f"{', '.join(options) or 'none'}")
        return
    node: Any = schema
    for part in key.split("."):
        fields = _fields(node)
        if part not in fields:
            raise ConfigError(f"unknown key {key!r}{key_hint(key, schema)}; see `{prog} --cfg job` for every key")
        factory = fields[part].default_factory
        owner, node = node, (factory() if factory is not dataclasses.MISSING else None)
    if not (ov.is_sweep_override() or ov.is_add() or ov.is_force_add()):
        _check_type(owner, part, ov.value(), key, str(fields[part].type))


def _check_type(owner: Any, name: str, value: Any, key: str, type_name: str) -> None:
    """Reject a value of the wrong type for a typed key in one line (Hydra's own message spans several)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    base = type_name.replace(" | None", "").replace("Optional[", "").rstrip("]")
    kind = "a list, e.g. [a, b]" if base.startswith("list[") else _KINDS.get(base, f"its keys, e.g. {key}.NAME=VALUE")
    try:
        OmegaConf.structured(owner)[name] = value
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{key}={value!r} is not valid; valid: {kind}") from exc
