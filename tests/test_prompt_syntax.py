"""The prompt language (issue 15): A1111 emphasis and long prompts on the tiny model, checked against A1111's own
documented examples and rules; `plain` keeps today's conditioning."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_fidelity import tiny_sdxl  # noqa: F401 - the fixture xl_model builds on

from runner.common.errors import ConfigError
from runner.config import validate
from runner.prompt.syntax import check_prompt, parse_attention, split_tags, strip_syntax
from runner.run import run


def test_parser_matches_a1111_docstring_examples() -> None:
    # modules/prompt_parser.py parse_prompt_attention doctests (A1111 v1.10)
    assert parse_attention("normal text") == [("normal text", 1.0)]
    assert parse_attention("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert parse_attention("(unbalanced") == [("unbalanced", 1.1)]
    assert parse_attention(r"\(literal\]") == [("(literal]", 1.0)]
    assert parse_attention("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    assert parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]
    assert parse_attention("((a))") == [("a", 1.1 * 1.1)]
    assert parse_attention("[a]") == [("a", 1 / 1.1)]
    assert parse_attention("(a:1.5)") == [("a", 1.5)]
    assert parse_attention("(a : 0.5 )") == [("a ", 0.5)]
    assert parse_attention("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    assert parse_attention("aBREAKb") == [("aBREAKb", 1.0)]  # BREAK is a word, in capitals
    assert parse_attention(r"a \\ b") == [("a \\ b", 1.0)]
    assert parse_attention("(red:1.0) fox") == [("red fox", 1.0)]  # weight 1.0 is the same tokens


def test_tags_are_removed_like_a1111_and_parsed_in_its_order() -> None:
    text, tags = split_tags("a fox <lora:style:0.8>, <lora:other:0.5:1.2> in snow <lora:plain>")
    assert text == "a fox ,  in snow "
    assert [(t.name, t.te, t.unet) for t in tags] == [("style", 0.8, 0.8), ("other", 0.5, 1.2), ("plain", 1.0, 1.0)]
    _, tags = split_tags("<lora:x:te=0.3:unet=0.7>")
    assert (tags[0].te, tags[0].unet) == (0.3, 0.7)
    for bad, what in (("<lora::0.8>", "no LoRA name"), ("<lora:x:abc>", "'abc' is not a number")):
        with pytest.raises(ConfigError, match=what):
            split_tags(bad)
    assert strip_syntax("a (red:1.3) fox BREAK [snow] <lora:x:1>") == "a red fox snow "


def test_bad_weight_is_an_error_and_unbalanced_brackets_a_warning() -> None:
    for bad in ("a (red:abc) fox", "(red:1.2.3)", "(red: heavy)"):
        with pytest.raises(ConfigError, match="is not a number"):
            check_prompt("prompts[0]", bad)
    assert check_prompt("prompts[0]", r"a \(red:abc\) fox") == []  # escaped: text
    assert check_prompt("prompts[0]", "a time: 5 (red) fox") == []
    (warning,) = check_prompt("prompts[0]", "a (red fox")
    assert "unbalanced" in warning and "1 unclosed '('" in warning
    (warning,) = check_prompt("prompts[0]", "a red] fox")
    assert "stray ']'" in warning


@pytest.fixture(scope="module")
def pipe(tiny_dir: Path):
    from runner.models.loading import load_model

    return load_model(validate({"model": {"id": str(tiny_dir)}, "device": "cpu"}).model, "cpu").pipe


def _embeds(pipe, prompt: str, negative: str = "", syntax: str = "a1111", skip: int | None = None, pad: bool = False):
    import torch

    from runner.generate.prompt_embeds import PromptEmbeds

    with torch.inference_mode():
        return PromptEmbeds().call_kwargs(pipe, [(prompt, negative)], skip, True, (), syntax, pad=pad)


@pytest.mark.parametrize("skip", [None, 2])
def test_a1111_short_prompt_is_diffusers_encoding_bit_for_bit(pipe, skip) -> None:
    import torch

    plain = _embeds(pipe, "a red fox", "blurry", "plain", skip)
    a1111 = _embeds(pipe, "a red fox", "blurry", "a1111", skip)
    assert torch.equal(plain["prompt_embeds"], a1111["prompt_embeds"])
    if skip is None:
        assert torch.equal(plain["negative_prompt_embeds"], a1111["negative_prompt_embeds"])
    else:  # diffusers reads the negative prompt from the last layer whatever clip_skip; A1111 skips for both
        assert torch.equal(a1111["negative_prompt_embeds"], _embeds(pipe, "blurry", "", "a1111", skip)["prompt_embeds"])
    assert torch.equal(_embeds(pipe, "(red:1.0) fox")["prompt_embeds"], _embeds(pipe, "red fox")["prompt_embeds"])
    assert torch.equal(_embeds(pipe, "red fox <lora:x:1>")["prompt_embeds"],
                       _embeds(pipe, "red fox ")["prompt_embeds"])


def red_at_1_5(tokenizer):
    """A1111's multipliers for "a (red:1.5) fox", one per token position of the 77-token chunk, written out: the
    tiny tokenizer reads it as <bos> a</w> re d</w> f o x</w> <eos> <pad>..., so 1.5 goes at positions 2 and 3 only
    (start, end and padding tokens weigh 1.0)."""
    import torch

    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a red fox").input_ids)
    assert tokens == ["<|startoftext|>", "a</w>", "re", "d</w>", "f", "o", "x</w>", "<|endoftext|>"]
    mult = torch.ones(1, 77, 1)
    mult[0, 2:4] = 1.5
    return mult


def test_emphasis_is_a1111_original_scale_then_restore_mean(pipe) -> None:
    import torch

    from runner.prompt.clip import tokenize_chunks

    base = _embeds(pipe, "a red fox")["prompt_embeds"]
    weighted = _embeds(pipe, "a (red:1.5) fox")["prompt_embeds"]
    mult = red_at_1_5(pipe.tokenizer)
    (chunk,) = tokenize_chunks(pipe.tokenizer, parse_attention("a (red:1.5) fox"))
    assert torch.equal(torch.tensor(chunk.multipliers).reshape(1, -1, 1), mult)
    expected = base * mult
    expected = expected * (base.mean() / expected.mean())
    assert torch.allclose(weighted, expected, atol=1e-6)
    assert not torch.equal(weighted, base)


def test_long_prompts_are_75_token_chunks_and_negative_is_padded(pipe) -> None:
    import torch

    from runner.prompt.clip import CHUNK, tokenize_chunks

    words = " ".join(["a"] * 90)  # one token each on the tiny tokenizer
    chunks = tokenize_chunks(pipe.tokenizer, parse_attention(words))
    assert [len(c.tokens) for c in chunks] == [77, 77]
    assert chunks[0].tokens[1 : 1 + CHUNK] == (pipe.tokenizer(words, add_special_tokens=False).input_ids[:CHUNK])
    out = _embeds(pipe, words, "blurry")  # A1111's default: each side at its own length
    assert out["prompt_embeds"].shape[1] == 154 and out["negative_prompt_embeds"].shape[1] == 77
    out = _embeds(pipe, words, "blurry", pad=True)
    assert out["prompt_embeds"].shape[1] == 154 and out["negative_prompt_embeds"].shape[1] == 154
    # the negative's second chunk is the empty prompt's chunk (A1111's "Pad prompt/negative prompt")
    empty = _embeds(pipe, "")["prompt_embeds"]
    assert torch.equal(out["negative_prompt_embeds"][:, 77:], empty)
    # BREAK starts a new chunk
    assert _embeds(pipe, "a red BREAK fox")["prompt_embeds"].shape[1] == 154
    # a comma in the last 20 tokens moves the words after it into the next chunk (A1111's backtrack)
    text = " ".join(["a"] * 70) + ", b b b b b b b b"
    first = tokenize_chunks(pipe.tokenizer, parse_attention(text))[0]
    comma = pipe.tokenizer.get_vocab()[",</w>"]
    assert comma in first.tokens and first.tokens[first.tokens.index(comma) + 1] == pipe.tokenizer.eos_token_id


def _image(out: Path) -> np.ndarray:
    (png,) = sorted(out.glob("*.png"))
    with Image.open(png) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def _gen(tiny_dir: Path, out: Path, prompt: str, **extra) -> np.ndarray:
    cfg = {"model": {"id": str(tiny_dir)}, "prompts": [prompt], "seeds": [5], "steps": 2, "width": 32, "height": 32,
           "device": "cpu", "grid": {"enabled": False}, **extra}
    result = run(validate(cfg), out, progress=False)
    assert result.generated == 1 and not result.entries[0].get("faults")
    image = _image(out)
    # A1111's mean restore divides by the weighted mean: on the tiny model (layer-normed, mean ~0) big weights
    # can blow it up, so every image here is checked to be a real one
    assert image.std() > 5
    return image


@pytest.mark.slow
def test_pixels_weights_long_prompts_and_plain(tiny_dir: Path, tmp_path: Path) -> None:
    red = _gen(tiny_dir, tmp_path / "a", "red fox")
    assert np.array_equal(_gen(tiny_dir, tmp_path / "b", "(red:1.0) fox"), red)
    assert not np.array_equal(_gen(tiny_dir, tmp_path / "c", "(red:1.6) fox"), red)
    long = " ".join(f"word{i}" for i in range(30)) + " "  # > 100 tokens on the tiny tokenizer
    one = _gen(tiny_dir, tmp_path / "d", long + "cat")
    two = _gen(tiny_dir, tmp_path / "e", long + "dog")
    assert not np.array_equal(one, two)  # the last word counts
    # plain: the text as is, cut at 77 tokens, as before this syntax existed
    p1 = _gen(tiny_dir, tmp_path / "f", long + "cat", prompt_syntax="plain")
    p2 = _gen(tiny_dir, tmp_path / "g", long + "dog", prompt_syntax="plain")
    assert np.array_equal(p1, p2)
    assert not np.array_equal(_gen(tiny_dir, tmp_path / "h", "(red:1.0) fox", prompt_syntax="plain"), red)


def test_unbalanced_brackets_warn_once_and_generate(tiny_dir: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        spec = validate({"model": {"id": str(tiny_dir)}, "prompts": ["a (red fox"]})
    assert spec.prompts[0].prompt == "a (red fox"
    assert sum("unbalanced" in r.message for r in caplog.records) == 1


@pytest.fixture(scope="module")
def xl_model(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811 - the fixture
    """test_fidelity's tiny SDXL with a second tokenizer that pads with "!" (id ≠ end), as SDXL's OpenCLIP does."""
    import shutil

    from transformers import CLIPTokenizer

    out = tmp_path_factory.mktemp("sdxl-pad") / "model"
    shutil.copytree(tiny_sdxl, out)
    tok2 = CLIPTokenizer.from_pretrained(str(out / "tokenizer_2"), pad_token="!")
    assert tok2.pad_token_id != tok2.eos_token_id
    tok2.save_pretrained(str(out / "tokenizer_2"))
    return out


@pytest.fixture(scope="module")
def xl_pipe(xl_model: Path):
    from runner.models.loading import load_model

    return load_model(validate({"model": {"id": str(xl_model)}, "device": "cpu"}).model, "cpu").pipe


def test_sdxl_both_encoders_and_pooled_follow_a1111(xl_pipe) -> None:
    import torch

    from runner.prompt.clip import tokenize_chunks

    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    plain, a1111 = _embeds(xl_pipe, "a red fox", "blurry", "plain"), _embeds(xl_pipe, "a red fox", "blurry")
    for k in names:  # up to 75 tokens and weight 1: diffusers' SDXL conditioning, bit for bit
        assert torch.equal(plain[k], a1111[k]), k
    # an empty negative prompt is zeros on SDXL (A1111's force_zero_negative_prompt; diffusers' config flag)
    empty = _embeds(xl_pipe, "a red fox", "")
    assert not empty["negative_prompt_embeds"].any() and not empty["negative_pooled_prompt_embeds"].any()
    # weights: each encoder's embedding scaled and its mean restored on its own; the pooled vector is unweighted
    weighted = _embeds(xl_pipe, "a (red:1.5) fox", "blurry")
    mult = red_at_1_5(xl_pipe.tokenizer)
    for tokenizer in (xl_pipe.tokenizer, xl_pipe.tokenizer_2):
        (chunk,) = tokenize_chunks(tokenizer, parse_attention("a (red:1.5) fox"))
        assert torch.equal(torch.tensor(chunk.multipliers).reshape(1, -1, 1), mult)
    parts = []
    for z in a1111["prompt_embeds"].split(32, dim=-1):
        scaled = z * mult
        parts.append(scaled * (z.mean() / scaled.mean()))
    assert torch.allclose(weighted["prompt_embeds"], torch.cat(parts, dim=-1), atol=1e-6)
    assert torch.equal(weighted["pooled_prompt_embeds"], a1111["pooled_prompt_embeds"])
    # long prompts: chunks of both encoders concatenated; the pooled vector is the first chunk's
    words = " ".join(["a"] * 75)
    long = _embeds(xl_pipe, words + " fox", "blurry")
    first = _embeds(xl_pipe, words, "blurry")
    assert long["prompt_embeds"].shape == (1, 154, 64)
    assert torch.equal(long["prompt_embeds"][:, :77], first["prompt_embeds"])
    assert torch.equal(long["pooled_prompt_embeds"], first["pooled_prompt_embeds"])
    assert long["negative_prompt_embeds"].shape == (1, 77, 64)  # A1111's default: not padded
    assert _embeds(xl_pipe, words + " fox", "blurry", pad=True)["negative_prompt_embeds"].shape == (1, 154, 64)


def test_sdxl_pixels(xl_model: Path, tmp_path: Path) -> None:
    red = _gen(xl_model, tmp_path / "a", "red fox", negative_prompt="blurry", width=64, height=64)
    assert np.array_equal(_gen(xl_model, tmp_path / "b", "(red:1.0) fox", negative_prompt="blurry", width=64,
                               height=64), red)
    assert not np.array_equal(_gen(xl_model, tmp_path / "c", "(red:1.5) fox", negative_prompt="blurry", width=64,
                                   height=64), red)


ALONE = r"""
import json, sys
from pathlib import Path
from runner.config import validate
from runner.run import run
cfg, out = json.loads(sys.argv[1]), Path(sys.argv[2])
assert run(validate(cfg), out, progress=False).generated == 1
"""


@pytest.mark.slow
def test_each_image_of_a_mixed_sweep_equals_it_alone_in_a_fresh_process(tiny_dir: Path, tmp_path: Path) -> None:
    """Weights, BREAK, a long prompt and S/R in one batched sweep (embeddings of several lengths in one batch):
    each image equals the same prompt generated alone in a fresh process."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    long = " ".join(f"w{i}" for i in range(40)) + " red"
    prompts = ["a (red:1.3) fox", "[red] fox BREAK snow", long]
    base = {"model": {"id": str(tiny_dir)}, "seeds": [4], "steps": 2, "width": 32, "height": 32, "device": "cpu",
            "grid": {"enabled": False}, "negative_prompt": "red blur", "batch_size": 8}
    sweep = run(validate({**base, "prompts": prompts, "prompt_sr": ["red", "blue"]}), tmp_path / "sweep",
                progress=False)
    assert sweep.generated == 6 and {e["batch_size"] for e in sweep.entries} == {6}
    picks = [e for e in sweep.entries if e["prompt_sr"] == "blue"]  # the long prompt among them
    for i, e in enumerate(picks):
        cfg = {**base, "prompts": [e["prompt"]], "negative_prompt": e["negative_prompt"], "batch_size": 1}
        out = tmp_path / f"alone{i}"
        proc = subprocess.run([sys.executable, "-c", ALONE, json.dumps(cfg), str(out)], capture_output=True,
                              text=True, cwd=REPO, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        with Image.open(tmp_path / "sweep" / e["file"]) as a:
            want = np.asarray(a.convert("RGB"))
        assert want.std() > 5 and np.array_equal(_image(out), want), e["prompt"]


def test_non_clip_family_gets_the_words_without_syntax_and_one_warning(tmp_path: Path, caplog) -> None:
    """Flux.1 (CLIP + T5): the syntax is not applied; the image equals the one of the bare words, once warned."""
    base = {"model": {"id": "builtin:tiny-flux1"}, "seeds": [2], "steps": 2, "width": 32, "height": 32,
            "device": "cpu", "grid": {"enabled": False}}
    with caplog.at_level(logging.WARNING):
        syntax = run(validate({**base, "prompts": ["a (red:1.3) fox BREAK [snow]", "a ((cat))"]}), tmp_path / "a",
                     progress=False)
    assert sum("not CLIP" in r.message for r in caplog.records) == 1
    words = run(validate({**base, "prompts": ["a red fox snow", "a cat"], "prompt_syntax": "plain"}),
                tmp_path / "b", progress=False)
    got = {e["prompt"]: e for e in syntax.entries}
    rec = got["a (red:1.3) fox BREAK [snow]"]
    assert rec["prompt_syntax"] == "a1111" and rec["prompt_syntax_applied"] is False
    want = {e["prompt"]: _image_of(tmp_path / "b", e) for e in words.entries}
    assert np.array_equal(_image_of(tmp_path / "a", rec), want["a red fox snow"])
    assert np.array_equal(_image_of(tmp_path / "a", got["a ((cat))"]), want["a cat"])


def _image_of(out: Path, entry: dict) -> np.ndarray:
    with Image.open(out / entry["file"]) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)
