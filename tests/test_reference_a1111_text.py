"""A1111's text handling as test vectors (tests/data/a1111_text_vectors.json; its `sources` name the file and function
each area came from, run on these inputs): 75-token chunk plans with comma backtracking, and infotext parses. The
runner's chunker and its infotext reader must give A1111's results for everything they read."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from runner.outputs.metadata import parse_infotext
from runner.prompt.clip import CHUNK, tokenize_chunks
from runner.prompt.syntax import EMPHASIS
from runner.reproduce.inspect import record_from_infotext

VECTORS = json.loads((Path(__file__).parent / "data" / "a1111_text_vectors.json").read_text(encoding="utf-8"))
BOS, EOS, COMMA = 49406, 49407, 267  # the stub tokenizer's ids (as the vectors were made)
# keys parse_generation_parameters adds when the text lacks them, with the value it adds
A1111_DEFAULTS = {"Clip skip": "1", "Hires resize-1": 0, "Hires resize-2": 0, "Hires sampler": "Use same sampler",
                  "Hires checkpoint": "Use same checkpoint", "Hires prompt": "", "Hires negative prompt": "",
                  "Mask mode": "Inpaint masked", "Masked content": "original", "Inpaint area": "Whole picture",
                  "Masked area padding": 32, "RNG": "GPU", "Schedule type": "Automatic", "Schedule max sigma": 0,
                  "Schedule min sigma": 0, "Schedule rho": 0, "VAE Encoder": "Full", "VAE Decoder": "Full",
                  "FP8 weight": "Disable", "Cache FP16 weight for LoRA": False}
# keys infotext_versions.backcompat sets (True) for images of older A1111 versions
BACKCOMPAT = ("Old prompt editing timelines", "Pad conds v0", "Downcast alphas_cumprod",
              "Refiner switch by sampling steps")


class StubTokenizer:
    """Each segment's text is its name; the vector gives its token ids (as A1111's run had them)."""

    bos_token_id, eos_token_id = BOS, EOS

    def __init__(self, ids: dict[str, list[int]]) -> None:
        self.ids = ids

    def get_vocab(self) -> dict[str, int]:
        return {",</w>": COMMA}

    def __call__(self, texts: list[str], truncation: bool = False, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [self.ids.get(t, []) for t in texts]}


def test_vector_counts() -> None:
    """Every area has its vectors and says where they came from."""
    assert {k: len(VECTORS[k]) for k in VECTORS["sources"]} == {"chunks": 90, "infotexts": 110}
    assert all(s["file"].startswith("modules/") for s in VECTORS["sources"].values())


@pytest.mark.parametrize("vector", VECTORS["chunks"], ids=lambda v: v["name"])
def test_chunk_plan_matches_a1111(vector: dict) -> None:
    ids: dict[str, list[int]] = {}
    parsed: list[tuple[str, float]] = []
    for i, seg in enumerate(vector["segments"]):
        if seg == "BREAK":
            parsed.append(("BREAK", -1.0))
        else:
            ids[f"s{i}"] = seg["ids"]
            parsed.append((f"s{i}", seg["weight"]))
    got = tokenize_chunks(StubTokenizer(ids), parsed)
    want = [([BOS, *c["tokens"], *[EOS] * (CHUNK - len(c["tokens"])), EOS],
             [1.0, *c["multipliers"], *[1.0] * (CHUNK - len(c["tokens"])), 1.0]) for c in vector["chunks"]]
    assert [c.tokens for c in got] == [t for t, _ in want]
    assert [c.multipliers for c in got] == [m for _, m in want]


def _num(kind: type, value: Any) -> Any:
    try:
        return kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        return None


@pytest.mark.parametrize("vector", VECTORS["infotexts"], ids=lambda v: repr(v["infotext"].splitlines()[0])[:40])
def test_infotext_parse_matches_a1111(vector: dict) -> None:
    """The raw parse: every field A1111 reads from the text, with its value; nothing A1111 drops."""
    a = vector["parsed"]
    got = parse_infotext(vector["infotext"])
    rewritten = {"Size-1", "Size-2", "Hires resize-1", "Hires resize-2"} if "First pass size-1" in a else set()
    rewritten |= {"Prompt"} if "Hypernet" in a else set()  # A1111 appends a <hypernet:…> tag to the prompt
    for key, value in got.items():
        if key == "Lora hashes":
            assert value == vector.get("lora_hashes", {})
        elif key not in rewritten:
            assert key in a and a[key] == value, (key, value, a.get(key))
    missing = {k for k in a if k not in got and k not in BACKCOMPAT and k not in rewritten
               and not (k in A1111_DEFAULTS and a[k] == A1111_DEFAULTS[k])}
    assert not missing, {k: a[k] for k in missing}


@pytest.mark.parametrize("vector", VECTORS["infotexts"], ids=lambda v: repr(v["infotext"].splitlines()[0])[:40])
def test_infotext_record_matches_a1111(vector: dict) -> None:
    """What the runner makes of the parse (t2i-inspect, from_image) agrees with A1111 on every setting it reads;
    a setting A1111 would apply and the runner cannot is named in `no_equivalent`, never dropped unsaid."""
    a = vector["parsed"]
    rec = record_from_infotext(vector["infotext"])
    assert (rec["prompt"], rec["negative_prompt"]) == (a["Prompt"], a["Negative prompt"])
    for key, kind, field in (("seed", int, "Seed"), ("steps", int, "Steps"), ("guidance_scale", float, "CFG scale"),
                             ("width", int, "Size-1"), ("height", int, "Size-2")):
        assert rec[key] == _num(kind, a.get(field)), key
    assert (rec["clip_skip"] or 1) == _num(int, a["Clip skip"])
    assert rec["sampler"] == a.get("Sampler")
    assert (rec["schedule_type"] or "Automatic") == a["Schedule type"]
    assert (rec["model"]["name"], rec["model"]["hash"]) == (a.get("Model"), a.get("Model hash"))
    assert {lo["name"]: lo["sha256"] for lo in rec["loras"]} == vector.get("lora_hashes", {})
    if rec.get("hires_scale") is not None:
        assert rec["hires_denoise"] == (_num(float, a.get("Denoising strength")) or 0.7)
        assert rec["hires_steps"] == (_num(int, a.get("Hires steps")) or 0)
        assert rec["hires_upscaler"] == a.get("Hires upscaler", "Latent")
        resize = [_num(int, a["Hires resize-1"]), _num(int, a["Hires resize-2"])]
        if any(resize):
            assert rec["hires_resize"] == resize
        else:
            assert math.isclose(rec["hires_scale"], _num(float, a.get("Hires upscale")) or 2.0)
        for key in ("Hires prompt", "Hires negative prompt"):
            assert rec.get(key.lower().replace(" ", "_"), "") == a[key]
    else:
        assert "Hires upscale" not in a and not _num(int, a["Hires resize-1"])
    names = {v: k for k, v in EMPHASIS.items()}
    mode = a.get("Emphasis", "Original")
    assert rec["emphasis"] == names.get(mode, "original")
    assert (mode in names) or f"Emphasis: {mode}" in rec["no_equivalent"]
    assert rec["pad_conds"] is (a.get("Pad conds") == "True")
    for key in BACKCOMPAT:
        if a.get(key) is True:
            assert any(x.startswith(key) for x in rec["no_equivalent"]), key
