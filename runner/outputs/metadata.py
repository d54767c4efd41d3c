"""Per-image records: the JSON record, A1111 infotext (write and parse), and PNG text chunks."""

from __future__ import annotations

import json
import platform
import re
from functools import cache
from importlib import metadata as importlib_metadata
from typing import Any

JSON_KEY = "t2i-runner"  # PNG tEXt/iTXt key of our full JSON record
INFOTEXT_KEY = "parameters"  # A1111's key
RECORD_VERSION = 2  # 2: keys hold file hashes (plan.KEY_VERSION); file/index/created only in the manifest

_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_SIZE = re.compile(r"^(\d+)x(\d+)$")


@cache
def versions() -> dict[str, str]:
    """Versions of the libraries that change pixels."""
    out = {"python": platform.python_version()}
    for pkg in ("t2i-runner", "torch", "diffusers", "transformers", "peft", "safetensors"):
        try:
            out[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def quote(text: str) -> str:
    """Quote an infotext value the way A1111 does (only when it contains `,`, `:` or a newline)."""
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _cfg(value: float | None) -> str | None:
    return None if value is None else f"{value:g}"


def infotext(rec: dict[str, Any]) -> str:
    """A1111 `parameters` text: prompt, `Negative prompt:` line, then `Key: value, …`."""
    from ..config.hires import infotext_fields as hires_infotext
    from ..config.refiner import infotext_fields as refiner_infotext
    from ..prompt.syntax import EMPHASIS

    distilled = rec.get("guidance_scale") is not None and (
        rec.get("true_cfg_scale") is not None or (rec.get("model") or {}).get("family") == "flux1")
    fields: dict[str, Any] = {
        "Steps": rec["steps"],
        "Sampler": rec["sampler"],
        "Schedule type": rec.get("schedule_type"),
        # Forge's convention for guidance-distilled models (Flux.1): CFG scale = the real (true) CFG, 1 when off,
        # the distilled guidance apart; Qwen-Image's CFG is its true_cfg_scale
        "CFG scale": _cfg(rec.get("true_cfg_scale") if rec.get("true_cfg_scale") is not None
                          else 1.0 if distilled else rec.get("guidance_scale")),
        "Distilled CFG Scale": _cfg(rec.get("guidance_scale")) if distilled else None,
        "Seed": rec["seed"],
        "Size": f"{rec['width']}x{rec['height']}",
        "Model hash": rec["model"]["hash"][:10] if rec["model"].get("hash") else None,
        "Model": rec["model"]["name"],
        "Denoising strength": rec.get("hires_denoise"),  # A1111 writes it for hires. fix (txt2img)
        "Clip skip": rec.get("clip_skip") if (rec.get("clip_skip") or 1) > 1 else None,
        **hires_infotext(rec),
    }
    if rec.get("loras"):  # A1111 writes AutoV3 (the safetensors payload's sha256), as Civitai looks it up
        # names without `:` and `,`, which separate the entries (A1111's extra_networks_lora.py drops them too)
        fields["Lora hashes"] = ", ".join(f"{re.sub('[:,]', '', lo['name'])}: {lo.get('autov3') or lo['sha256'][:12]}"
                                          for lo in rec["loras"])
        fields["Lora weights"] = ", ".join(f"{re.sub('[:,]', '', lo['name'])}: {lo['scale']:g}" for lo in rec["loras"])
    if rec.get("embeddings"):  # A1111: the first 10 hex digits of each file's sha256
        fields["TI hashes"] = ", ".join(f"{e['name']}: {e['sha256'][:10]}" for e in rec["embeddings"])
    # A1111 writes its emphasis mode when it is not Original and a text has brackets; plain text is its "None"
    emphasis = "none" if rec.get("prompt_syntax") == "plain" else rec.get("emphasis") or "original"
    if emphasis != "original" and any(c in rec["prompt"] + rec.get("negative_prompt", "") for c in "(["):
        fields["Emphasis"] = EMPHASIS.get(emphasis, emphasis)
    if (rec.get("refiner_switch_call") or 0) >= 0:  # A1111 writes them when the refiner took over, after the rest
        fields.update(refiner_infotext(rec))
    if rec.get("pad_conds") and rec.get("prompt_syntax") == "a1111":
        fields["Pad conds"] = "True"  # prompt and negative prompt padded to the same chunk count
    if rec.get("prompt_template"):
        fields["Template"] = rec["prompt_template"]  # sd-dynamic-prompts' field for the prompt as written
    fields["Version"] = f"t2i-runner {rec['versions'].get('t2i-runner', '')}".strip()
    tail = ", ".join(f"{k}: {quote(str(v))}" for k, v in fields.items() if v is not None)
    lines = [rec["prompt"]]
    if rec.get("negative_prompt"):
        lines.append(f"Negative prompt: {rec['negative_prompt']}")
    lines.append(tail)
    return "\n".join(lines)


def parse_infotext(text: str) -> dict[str, Any]:
    """Parse A1111 infotext like A1111's `parse_generation_parameters` (quoted values, `Size-1/2`)."""
    res: dict[str, Any] = {}
    prompt, negative, done_with_prompt = "", "", False
    *lines, lastline = text.strip().split("\n")
    if len(_RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"] = prompt
    res["Negative prompt"] = negative
    for k, v in _RE_PARAM.findall(lastline):
        if v == "":  # A1111 fails on an empty value and leaves the field out
            continue
        v = v.strip()
        if v[:1] == '"' and v[-1:] == '"':
            v = unquote(v)
        m = _RE_SIZE.match(v)
        if m is not None:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    if "Lora hashes" in res:
        res["Lora hashes"] = dict(
            (part.split(":", 1)[0].strip(), part.split(":", 1)[1].strip())
            for part in res["Lora hashes"].split(",") if ":" in part
        )
    return res


def pnginfo(rec: dict[str, Any]):
    """PngInfo with the A1111 `parameters` chunk and our full JSON record."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(INFOTEXT_KEY, infotext(rec))
    info.add_itxt(JSON_KEY, json.dumps(rec, ensure_ascii=False, sort_keys=True))
    return info


def read_png_record(path: str) -> tuple[dict[str, Any] | None, str | None]:
    """Our JSON record and the A1111 infotext of a PNG (each None when absent)."""
    from PIL import Image

    with Image.open(path) as im:
        text = dict(getattr(im, "text", {}) or {})
    rec = None
    if JSON_KEY in text:
        try:
            rec = json.loads(text[JSON_KEY])
        except ValueError:
            rec = None
    return rec, text.get(INFOTEXT_KEY)
