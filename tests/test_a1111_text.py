"""A1111's text side (issue 24, items 8-9): CLIP's text cleanup before tokenizing (ftfy, HTML unescaped twice,
whitespace; `modules/sd_hijack_clip.py` through CLIP's reference tokenizer) and the "Original" emphasis maths in
float32 whatever the encoder's dtype (`modules/sd_emphasis.py`: its multipliers are a float32 tensor)."""

from __future__ import annotations

import copy

import pytest
import torch

from runner.prompt.clip import Encoder, encode_chunk, tokenize_chunks
from runner.prompt.syntax import parse_attention

# (text as typed, the text CLIP's reference cleanup makes of it): the token ids must be the same
PROBES = [
    ("an artist’s “beret”", "an artist's \"beret\""),
    ("ＡＢＣ ｆｏｘ", "abc fox"),
    ("ﬁne ﬂower", "fine flower"),
    ("salt &amp; pepper", "salt & pepper"),
    ("salt &amp;amp; pepper", "salt & pepper"),
    ("a  red\tfox\n", "a red fox"),
    ("a red fox", "a red fox"),
]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory):
    from runner.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("text-pipe"))


@pytest.mark.parametrize(("typed", "clean"), PROBES)
def test_text_cleanup_before_tokenizing(pipe, typed: str, clean: str) -> None:
    got = tokenize_chunks(pipe.tokenizer, parse_attention(typed))
    want = tokenize_chunks(pipe.tokenizer, parse_attention(clean))
    assert [c.tokens for c in got] == [c.tokens for c in want]


def test_emphasis_maths_in_float32_for_a_bf16_encoder(pipe) -> None:
    te = copy.deepcopy(pipe.text_encoder).to(torch.bfloat16)
    enc = Encoder(pipe.tokenizer, te, None)
    (chunk,) = tokenize_chunks(pipe.tokenizer, parse_attention("a (red:1.7) [fox] (in the snow:0.6)"))
    with torch.inference_mode():
        z = te(torch.tensor([chunk.tokens]))[0]
        got, _ = encode_chunk(enc, chunk, "cpu")
    mult = torch.tensor(chunk.multipliers, dtype=torch.float32).reshape(1, -1, 1)
    zf = z.float()
    scaled = zf * mult
    want = (scaled * (zf.mean() / scaled.mean())).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)


@pytest.mark.parametrize(("mode", "key"), [("No norm", "no_norm"), ("Ignore", "ignore"), ("None", "none")])
def test_emphasis_modes_are_read_not_taken_for_original(mode: str, key: str) -> None:
    from runner.reproduce.inspect import record_from_infotext

    rec = record_from_infotext(f"a (red:1.3) fox\nSteps: 20, Sampler: Euler, Seed: 1, Size: 64x64, Emphasis: {mode}")
    assert (rec["emphasis"], rec["prompt_syntax"]) == (key, "a1111")
    assert not any("Emphasis" in x for x in rec["no_equivalent"]) and "Emphasis" not in rec["ignored"]
