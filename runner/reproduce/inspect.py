"""`t2i-inspect IMG [--json]`: the generation record of an image (ours, or mapped from A1111 infotext)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..common.errors import EXIT_CONFIG, ConfigError
from ..outputs.metadata import INFOTEXT_KEY, JSON_KEY, parse_infotext

FOREIGN = "a1111-infotext"  # `source_format` of a record mapped from A1111 infotext
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286
# ComfyUI sampler names (as A1111-style savers write them) -> our scheduler short names
_COMFY = {"euler": "euler", "euler_ancestral": "euler_a", "ddim": "ddim", "dpmpp_2m": "dpmpp_2m",
          "dpmpp_2m karras": "dpmpp_2m_karras", "lms": "lms", "heun": "heun", "uni_pc": "unipc",
          "ddpm": "ddpm"}
_MAPPED = {"Prompt", "Negative prompt", "Steps", "Sampler", "Schedule type", "CFG scale", "Clip skip", "Seed",
           "Size-1", "Size-2", "Model", "Model hash", "Lora hashes", "Lora weights", "Version"}


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


def image_text(path: str | Path) -> dict[str, str]:
    """The text metadata of an image (PNG text chunks, `info` entries, EXIF UserComment as `parameters`)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{path} does not exist")
    if not p.is_file():
        raise ConfigError(f"{path} is not a file")
    try:
        with Image.open(p) as im:
            text = {k: v for k, v in (getattr(im, "text", None) or im.info).items() if isinstance(v, str)}
            if INFOTEXT_KEY not in text:
                comment = _user_comment(im.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT))
                if comment:
                    text[INFOTEXT_KEY] = comment
    except UnidentifiedImageError as exc:
        raise ConfigError(f"{path} is not an image (PNG, JPEG or WebP with generation metadata)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ConfigError(f"{path} could not be read as an image ({exc})") from exc
    return text


def scheduler_name(sampler: str, schedule: str | None = None) -> str | None:
    """Our scheduler short name for an A1111 (or ComfyUI) sampler name; None if there is none."""
    from ..config.schedulers import SCHEDULER_TABLE

    by_label = {label: short for short, (_, _, label) in SCHEDULER_TABLE.items()}
    karras = f"{sampler.strip()} Karras"
    if schedule and schedule.lower() == "karras" and karras in by_label:
        return by_label[karras]
    key = sampler.strip()
    return by_label.get(key) or _COMFY.get(key.lower()) or (key if key in SCHEDULER_TABLE else None)


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


def record_from_infotext(text: str) -> dict[str, Any]:
    """Map A1111 `parameters` infotext onto our record keys; fields we cannot use go to `ignored`."""
    p = parse_infotext(text)
    sampler = p.get("Sampler")
    weights = _pairs(p.get("Lora weights"))
    loras = [{"name": name, "sha256": h, "scale": _num(float, weights.get(name)), "source": None,
              "weight_name": None, "file": None} for name, h in _pairs(p.get("Lora hashes")).items()]
    rec: dict[str, Any] = {
        "source_format": FOREIGN,
        "prompt": p["Prompt"],
        "negative_prompt": p["Negative prompt"],
        "seed": _num(int, p.get("Seed")),
        "steps": _num(int, p.get("Steps")),
        "guidance_scale": _num(float, p.get("CFG scale")),
        "clip_skip": _num(int, p.get("Clip skip")),
        "width": _num(int, p.get("Size-1")),
        "height": _num(int, p.get("Size-2")),
        "scheduler": scheduler_name(sampler, p.get("Schedule type")) if sampler else None,
        "sampler": sampler if not p.get("Schedule type") else f"{sampler} ({p['Schedule type']})",
        "loras": loras,
        "model": {"id": None, "name": p.get("Model"), "hash": p.get("Model hash")},
        "versions": {"generator": p["Version"]} if "Version" in p else {},
        "ignored": {k: v for k, v in p.items() if k not in _MAPPED},
    }
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
    out.append(_line("scheduler", f"{sched} (sampler {rec.get('sampler')})"))
    if rec.get("clip_skip"):
        out.append(_line("clip skip", rec["clip_skip"]))
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
        out.append(_line("loras" if i == 0 else "", text))
    if not rec.get("loras"):
        out.append(_line("loras", "none"))
    if not foreign:
        inv = "batch-invariant" if rec.get("batch_invariant") else "not batch-invariant"
        out.append(_line("device", f"{rec.get('device')}  batch of {rec.get('batch_size')}, {inv}"))
    versions = rec.get("versions") or {}
    if versions:
        out.append(_line("versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    if rec.get("ignored"):
        out.append(_line("not used here", ", ".join(f"{k}: {v}" for k, v in rec["ignored"].items())))
    if rec.get("reproduced"):
        out.append(_line("reproduced", json.dumps(rec["reproduced"])))
    out.append(_line("regenerate", f"t2i from_image={path}" + (" model.id=..." if foreign else "")))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: print each image's record, or what a weights file is (human-readable or --json)."""
    from ..common.paths import WEIGHT_EXT
    from .weights import describe_weights, weights_record

    parser = argparse.ArgumentParser(prog="t2i-inspect", description="Show how an image was generated, or what a "
                                     "LoRA / LyCORIS / checkpoint file is.")
    parser.add_argument("images", nargs="+", metavar="FILE", help="PNG (or A1111 JPEG/WebP) image, or a "
                        ".safetensors LoRA/LyCORIS/checkpoint file")
    parser.add_argument("--json", action="store_true", help="print the full JSON record")
    args = parser.parse_args(argv)
    try:
        records = [weights_record(p) if p.endswith(WEIGHT_EXT) else read_record(p) for p in args.images]
    except ConfigError as exc:
        print(f"t2i-inspect: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.json:
        data = records[0] if len(records) == 1 else records
        print(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True))
    else:
        print("\n\n".join(describe_weights(r) if p.endswith(WEIGHT_EXT) else describe(r, p)
                           for r, p in zip(records, args.images, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
