"""`t2i-inspect IMG [--json]`: the generation record of an image (ours, or mapped from A1111 infotext)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, BinaryIO

from ..common.errors import ConfigError, task_wrapper
from ..config.hires import INFOTEXT_FIELDS as HIRES_FIELDS
from ..config.hires import infotext_fields as hires_infotext
from ..config.hires import record_from_infotext as hires_record
from ..config.refiner import INFOTEXT_FIELDS as REFINER_FIELDS
from ..config.refiner import record_from_infotext as refiner_record
from ..outputs.metadata import INFOTEXT_KEY, JSON_KEY, parse_infotext
from ..prompt.syntax import EMPHASIS, EMPHASIS_BY_LABEL

FOREIGN = "a1111-infotext"  # `source_format` of a record mapped from A1111 infotext
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286
_MAPPED = {"Prompt", "Negative prompt", "Steps", "Sampler", "Schedule type", "CFG scale", "Clip skip", "Seed",
           "Size-1", "Size-2", "Model", "Model hash", "Lora hashes", "Lora weights", "Version", "Emphasis",
           "Pad conds", "Pad conds v0", "Template", "TI hashes", *HIRES_FIELDS, *REFINER_FIELDS}


def _user_comment(raw: Any) -> str | None:
    """Decode an EXIF UserComment (A1111 JPEG/WebP): an 8-byte charset prefix, then the text."""
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes) or len(raw) < 8:
        return None
    head, body = raw[:8], raw[8:]
    if head.startswith(b"UNICODE"):
        le = body[:1] != b"\x00" and body[1:2] == b"\x00"  # 'a\0' is little-endian UTF-16
        return body.decode("utf-16-le" if le else "utf-16-be", errors="replace")
    return body.decode("utf-8" if head.startswith(b"UTF") else "latin-1", errors="replace").rstrip("\x00")


def image_text(path: str | Path | BinaryIO) -> dict[str, str]:
    """The text metadata of an image file or stream (PNG text chunks, `info` entries, EXIF UserComment as
    `parameters`)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(path, str | Path):
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"{path} does not exist")
        if not p.is_file():
            raise ConfigError(f"{path} is not a file")
    what = path if isinstance(path, str | Path) else "the image"
    try:
        with Image.open(path) as im:
            text = {k: v for k, v in (getattr(im, "text", None) or im.info).items() if isinstance(v, str)}
            if INFOTEXT_KEY not in text:
                comment = _user_comment(im.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT))
                if comment:
                    text[INFOTEXT_KEY] = comment
    except UnidentifiedImageError as exc:
        raise ConfigError(f"{what} is not an image (PNG, JPEG or WebP with generation metadata)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ConfigError(f"{what} could not be read as an image ({exc})") from exc
    return text


def _num(kind: type, value: Any) -> Any:
    try:
        return kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        return None


def _pairs(value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        return value
    parts = (p.split(":", 1) for p in str(value or "").split(",") if ":" in p)
    return {k.strip(): v.strip() for k, v in parts}


def _backcompat(p: dict[str, Any]) -> list[str]:
    """The compatibility options A1111 turns on for an image of an older version (`infotext_versions.backcompat`):
    ways those versions computed that diffusers has no switch for (the image's `Pad conds v0: True` too)."""
    from packaging.version import InvalidVersion, Version

    text = str(p.get("Version") or "")
    m = re.match(r"([^-]+-[^-]+)-.*", text)
    try:
        ver = Version(m.group(1) if m else text)
    except InvalidVersion:
        return ["Pad conds v0"] if p.get("Pad conds v0") == "True" else []
    out = []
    if ver < Version("1.6.0") and "[" in p.get("Prompt", ""):
        out.append("Old prompt editing timelines")
    if (ver < Version("1.6.0") and p.get("Sampler", "") in ("DDIM", "PLMS")) or p.get("Pad conds v0") == "True":
        out.append("Pad conds v0")  # the negative's last vector repeated (or cut) to the prompt's length
    if ver < Version("v1.7.0-225"):
        out.append("Downcast alphas_cumprod")
    if ver < Version("1.8.0") and p.get("Refiner"):
        out.append("Refiner switch by sampling steps")
    return out


def record_from_infotext(text: str) -> dict[str, Any]:
    """Map A1111 `parameters` infotext onto our record keys; fields we cannot use go to `ignored`."""
    from ..config.schedulers import from_a1111

    p = parse_infotext(text)
    sampler = p.get("Sampler")
    scheduler, schedule, lost = from_a1111(sampler, p.get("Schedule type")) if sampler else (None, None, [])
    emphasis = EMPHASIS_BY_LABEL.get(p.get("Emphasis", "Original"))  # absent: Original
    if emphasis is None:  # an extension's mode: Original, said aloud
        lost.append(f"Emphasis: {p['Emphasis']}")
    lost += [f"{k}: True" for k in _backcompat(p)]
    weights = _pairs(p.get("Lora weights"))
    loras = [{"name": name, "sha256": h, "scale": _num(float, weights.get(name)), "source": None,
              "weight_name": None, "file": None} for name, h in _pairs(p.get("Lora hashes")).items()]
    if p.get("Hypernet"):  # A1111 pastes it as a prompt tag (which the runner removes with a warning)
        p["Prompt"] += f"<hypernet:{p['Hypernet']}:{p.get('Hypernet strength', '1.0')}>"
    rec: dict[str, Any] = {
        "source_format": FOREIGN,
        "prompt": p["Prompt"],
        "negative_prompt": p["Negative prompt"],
        "prompt_syntax": "a1111",  # A1111's `Emphasis: None` still cuts chunks, edits prompts and reads tags
        "emphasis": emphasis or "original",
        "pad_conds": p.get("Pad conds") == "True",  # A1111's "Pad prompt/negative prompt" (written only when on)
        "seed": _num(int, p.get("Seed")),
        "steps": _num(int, p.get("Steps")),
        "guidance_scale": _num(float, p.get("CFG scale")),
        "clip_skip": _num(int, p.get("Clip skip")),
        "width": _num(int, p.get("Size-1")),
        "height": _num(int, p.get("Size-2")),
        "scheduler": scheduler,
        "schedule": schedule,
        "sampler": sampler,
        "schedule_type": p.get("Schedule type"),
        "no_equivalent": lost,  # A1111 settings diffusers has no equivalent for (from_image warns)
        "loras": loras,
        "model": {"id": None, "name": p.get("Model"), "hash": p.get("Model hash")},
        "versions": {"generator": p["Version"]} if "Version" in p else {},
        "ignored": {k: v for k, v in p.items() if k not in _MAPPED},
    }
    hires = hires_record(p)  # hires. fix (an image before A1111 1.0 has its first-pass size here)
    lost.extend(hires.pop("no_equivalent", []))
    rec.update(hires)
    rec.update(refiner_record(p))  # Refiner: NAME [shorthash], Refiner switch at
    if p.get("TI hashes"):  # textual inversions: name and the first 10 hex digits of the file's sha256
        rec["embeddings"] = [{"name": k, "sha256": v} for k, v in _pairs(p["TI hashes"]).items()]
    return rec


def read_record(path: str | Path) -> dict[str, Any]:
    """Our JSON record of an image, else one mapped from its A1111 infotext; ConfigError if it has neither."""
    text = image_text(path)
    if JSON_KEY in text:
        try:
            rec = json.loads(text[JSON_KEY])
        except ValueError as exc:
            raise ConfigError(f"{path} has a damaged {JSON_KEY} record ({exc})") from exc
        if isinstance(rec, dict) and "prompt" in rec:
            return rec
    if text.get(INFOTEXT_KEY, "").strip():
        return record_from_infotext(text[INFOTEXT_KEY])
    if "workflow" in text or "prompt" in text:
        raise ConfigError(f"{path} has only a ComfyUI workflow, no generation parameters; save it with an "
                          "A1111-style saver node")
    raise ConfigError(f"{path} has no generation metadata (no {JSON_KEY!r} record or A1111 {INFOTEXT_KEY!r} "
                      "text)")


def _line(label: str, value: Any) -> str:
    return f"{label + ':':<17}{value}"


def describe(rec: dict[str, Any], path: str = "") -> str:
    """A human-readable summary of a record."""
    m = rec.get("model") or {}
    foreign = rec.get("source_format") == FOREIGN
    sched = rec.get("scheduler") or ("?" if foreign else "model default")
    out = [_line("image", f"{path}" + ("  (A1111 infotext; no t2i-runner record)" if foreign else ""))]
    out.append(_line("prompt", str(rec.get("prompt", "")).replace("\n", "\n" + " " * 17)))
    if rec.get("negative_prompt"):
        out.append(_line("negative prompt", str(rec["negative_prompt"]).replace("\n", "\n" + " " * 17)))
    out.append(_line("seed", rec.get("seed")))
    out.append(_line("steps", f"{rec.get('steps')}   guidance scale: {rec.get('guidance_scale')}   size: "
                              f"{rec.get('width')}x{rec.get('height')}"))
    a1111 = rec.get("sampler") if not rec.get("schedule_type") else f"{rec['sampler']}, {rec['schedule_type']}"
    sched += f", schedule {rec['schedule']}" if rec.get("schedule") else ""
    out.append(_line("scheduler", f"{sched} (A1111: {a1111})"))
    if rec.get("clip_skip"):
        ignored = rec.get("clip_skip_applied") is False and rec["clip_skip"] > 1
        out.append(_line("clip skip", f"{rec['clip_skip']}" + (" (no effect on this model, as in A1111)"
                                                                 if ignored else "")))
    text = [f"emphasis {EMPHASIS.get(rec['emphasis'], rec['emphasis'])}"] if rec.get("emphasis") not in (
        None, "original") else []
    text += ["prompt and negative prompt padded to one chunk count (Pad conds)"] if rec.get("pad_conds") else []
    if text:  # A1111's text options away from its defaults
        out.append(_line("A1111 text", ", ".join(text)))
    where = m.get("location") or m.get("id")
    model = f"{m.get('name')}" + (f" ({where})" if where and where != m.get("name") else "")
    if m.get("revision"):
        model += f" @ {m['revision']}"
    if m.get("hash"):
        model += f"  hash {m['hash'][:12]}"
    if m.get("dtype"):
        model += f"  {m['dtype']} {m.get('pipeline', '')}".rstrip()
    out.append(_line("model", model))
    for i, lo in enumerate(rec.get("loras") or []):
        src = f"  <- {lo['source']}" + (f" [{lo['weight_name']}]" if lo.get("weight_name") else "") \
            if lo.get("source") else ""
        scale = "?" if lo.get("scale") is None else f"{lo['scale']:g}"
        text = f"{lo.get('name')} x{scale}  sha256 {str(lo.get('sha256'))[:12]}{src}"
        out.append(_line("loras", text) if i == 0 else " " * 17 + text)
    if not rec.get("loras"):
        out.append(_line("loras", "none"))
    if rec.get("hires_scale") is not None:
        fields = {"Denoising strength": rec.get("hires_denoise"), **hires_infotext(rec)}
        out.append(_line("hires. fix", ", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None)))
    if rec.get("refiner"):
        ref = rec["refiner"]
        out.append(_line("refiner", f"{ref.get('name')} sha256 {str(ref.get('hash'))[:10]}, switch at "
                                    f"{rec.get('refiner_switch_at')}" + (f"  <- {ref['location']}"
                                                                          if ref.get("location") else "")))
    if rec.get("embeddings"):
        out.append(_line("embeddings", ", ".join(f"{e['name']} sha256 {str(e['sha256'])[:10]}"
                                                 for e in rec["embeddings"])))
    if not foreign:
        inv = "batch-invariant" if rec.get("batch_invariant") else "not batch-invariant"
        threads = f", {rec['threads']} CPU threads" if rec.get("threads") else ""
        out.append(_line("device", f"{rec.get('device')}  batch of {rec.get('batch_size')}, {inv}{threads}"))
    versions = rec.get("versions") or {}
    if versions:
        out.append(_line("versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    if rec.get("ignored"):
        out.append(_line("not used here", ", ".join(f"{k}: {v}" for k, v in rec["ignored"].items())))
    if rec.get("reproduced"):
        out.append(_line("reproduced", json.dumps(rec["reproduced"])))
    out.append(_line("regenerate", f"t2i from_image={path}" + (" model.id=..." if foreign else "")))
    return "\n".join(out)


def read_grid(path: str | Path) -> dict[str, Any] | None:
    """The `t2i-grid` description of a comparison grid PNG (None for other images)."""
    from ..outputs.grid import GRID_KEY

    text = image_text(path)
    if GRID_KEY not in text or JSON_KEY in text:
        return None
    try:
        return json.loads(text[GRID_KEY])
    except ValueError as exc:
        raise ConfigError(f"{path} has a damaged {GRID_KEY} description ({exc})") from exc


def describe_grid(info: dict[str, Any], path: str = "") -> str:
    """A human-readable summary of a grid's `t2i-grid` description."""
    cells = [c for row in info.get("cells") or [] for c in row]
    out = [_line("grid", f"{path}  (a comparison grid; t2i-inspect a cell image for its settings)")]
    for axis in ("x", "y"):
        if info.get(axis):
            values = ["default" if v is None else str(v) for v in info.get(f"{axis}_values") or []]
            out.append(_line(f"{axis} axis", f"{info[axis]}: " + " | ".join(values)))
    if info.get("fixed"):
        out.append(_line("fixed", ", ".join(f"{k}: {v}" for k, v in info["fixed"].items())))
    out.append(_line("cells", f"{sum(c is not None for c in cells)} of {len(cells)}, {info.get('cell_size')} px"))
    for k, row in enumerate(info.get("cells") or []):
        out.append(" " * 17 + "  ".join(c or "-" for c in row) if k else _line("files", "  ".join(c or "-"
                                                                                             for c in row)))
    return "\n".join(out)


@task_wrapper("t2i-inspect")
def main(argv: list[str] | None = None) -> int:
    """Console entry point: print each image's record, or what a weights file is (human-readable or --json); for a
    grid, its `t2i-grid` description."""
    from ..common.paths import WEIGHT_EXT
    from .weights import describe_weights, weights_record

    parser = argparse.ArgumentParser(prog="t2i-inspect", description="Show how an image was generated, or what a "
                                     "LoRA / LyCORIS / checkpoint file is.")
    parser.add_argument("images", nargs="+", metavar="FILE", help="PNG (or A1111 JPEG/WebP) image, a grid PNG, or a "
                        ".safetensors LoRA/LyCORIS/checkpoint file")
    parser.add_argument("--json", action="store_true", help="print the full JSON record")
    parser.add_argument("--verbose", action="store_true", help="show the traceback of an unexpected error")
    args = parser.parse_args(argv)
    weights = [p.endswith(WEIGHT_EXT) for p in args.images]
    grids = [None if w else read_grid(p) for w, p in zip(weights, args.images, strict=True)]
    records = [weights_record(p) if w else g if g is not None else read_record(p)
               for w, g, p in zip(weights, grids, args.images, strict=True)]
    if args.json:
        data = records[0] if len(records) == 1 else records
        print(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True))
    else:
        print("\n\n".join(describe_weights(r) if w else describe_grid(r, p) if g is not None else describe(r, p)
                           for r, w, g, p in zip(records, weights, grids, args.images, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
