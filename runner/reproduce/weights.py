"""`t2i-inspect FILE.safetensors`: what a LoRA/LyCORIS adapter or a model checkpoint is (runner/lora/detect.py),
its A1111/Civitai hashes, and the kohya training metadata a LoRA carries."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from ..common.errors import ConfigError
from ..common.hashing import autov2, autov3, file_sha256
from ..common.paths import PICKLE_EXT
from ..lora.detect import FAMILY_NAMES, checkpoint_kind, detect_file, read_header, training_summary


def weights_record(path: str | Path) -> dict[str, Any]:
    """A JSON-able description of a weights file (adapter or checkpoint); pickle files are hashed, not opened."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path} does not exist" if not p.exists() else f"{path} is not a file")
    sha = file_sha256(p)
    out: dict[str, Any] = {"file": str(p), "size_bytes": os.path.getsize(p), "sha256": sha, "autov2": autov2(sha),
                           "autov3": autov3(p)}
    if p.suffix in PICKLE_EXT:
        return {**out, "kind": "pickle", "note": "a pickle file: t2i-inspect does not unpickle it (convert it to "
                                                 ".safetensors to see its contents)"}
    info = detect_file(p)
    if info.is_adapter:
        out.update(kind="adapter", format=info.format, layout=info.layout, family=info.family,
                   family_name=info.family_name(), family_candidates=list(info.family_candidates),
                   context_dim=info.context_dim, components=info.components, layers=len(info.modules),
                   modules=dict(info.kinds), ranks=info.ranks, alphas=info.alphas, dora=info.dora,
                   merged=info.needs_merge, problem=info.problem(), training=training_summary(info.metadata),
                   metadata={k: v for k, v in info.metadata.items() if k != "ss_tag_frequency"})
        return out
    shapes, dtypes, meta = read_header(p)
    family, layout = checkpoint_kind(shapes)
    params = 0
    for shape in shapes.values():
        n = 1
        for d in shape:
            n *= d
        params += n
    out.update(kind="checkpoint", family=family, family_name=FAMILY_NAMES.get(family or "", "unknown family"),
               layout=layout, tensors=len(shapes), parameters=params, dtypes=dict(Counter(dtypes.values())),
               metadata=meta)
    return out


def _line(label: str, value: Any) -> str:
    return f"{label + ':':<17}{value}"


def describe_weights(rec: dict[str, Any]) -> str:
    """Human-readable text of `weights_record`."""
    out = [_line("file", rec["file"])]
    hashes = f"AutoV2 {rec['autov2']}  AutoV3 {rec['autov3']}  sha256 {rec['sha256']}"
    if rec["kind"] == "pickle":
        return "\n".join([*out, _line("kind", rec["note"]), _line("hashes", hashes)])
    if rec["kind"] == "checkpoint":
        dtypes = ", ".join(f"{k} x{v}" for k, v in rec["dtypes"].items())
        out += [_line("kind", f"model checkpoint ({rec['layout']})"), _line("family", rec["family_name"]),
                _line("tensors", f"{rec['tensors']}, {rec['parameters'] / 1e6:.1f} M parameters ({dtypes})"),
                _line("hashes", hashes)]
        return "\n".join(out)
    family = rec["family_name"]
    if rec["context_dim"] and rec["family"]:
        family += f" (cross-attention width {rec['context_dim']})"
    comps = ", ".join(f"{c} {n}" for c, n in rec["components"].items())
    out += [_line("kind", f"adapter: {rec['format']} ({rec['layout']} key names)"
                  + ("; applied by merging" if rec["merged"] else "")),
            _line("family", family),
            _line("layers", f"{rec['layers']} ({comps})"),
            _line("ranks", ", ".join(map(str, rec["ranks"])) or "full (no low-rank factor)"),
            _line("alphas", ", ".join(f"{a:g}" for a in rec["alphas"]) or "none (scale 1)"),
            _line("hashes", hashes)]
    if rec["problem"]:
        out.append(_line("cannot apply", rec["problem"]))
    training = dict(rec["training"])
    tags = training.pop("top tags", None)
    if training:
        out.append(_line("training", ", ".join(f"{k} {v}" for k, v in training.items())))
    if tags:
        out.append(_line("trigger words?", ", ".join(tags) + "  (most frequent caption tags)"))
    return "\n".join(out)
