"""Prompt editing, alternation and AND on the tiny SD1.5 and SDXL models: the conditioning changes at the steps
A1111 changes it (checked against diffusers' own `callback_on_step_end` swapping the embeddings), composable
guidance obeys its algebra, each image equals itself generated alone, and families without CLIP refuse it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_fidelity import tiny_sdxl  # noqa: F401 - the SDXL fixture

from runner.config import validate
from runner.generate.batch import generate
from runner.generate.prompt_embeds import PromptEmbeds
from runner.plan import ImageJob

A, B = "a red fox in the snow", "zebra purple ocean castle"
NEG_A, NEG_B = "ugly blurry", "green tree sky"


def _load(model_dir: Path):
    from runner.models.loading import load_model

    return load_model(validate({"model": {"id": str(model_dir)}, "device": "cpu"}).model, "cpu").pipe


@pytest.fixture(scope="module")
def sd(tiny_dir: Path):
    return _load(tiny_dir)


@pytest.fixture(scope="module")
def xl(tiny_sdxl: Path):  # noqa: F811
    return _load(tiny_sdxl)


def _job(prompt: str, negative: str = "", seed: int = 3, steps: int = 4, cfg: float = 7.0, size: int = 32,
         index: int = 0) -> ImageJob:
    return ImageJob(index, prompt, negative, seed, steps, cfg, size, size, None, 0, (), None, prompt_syntax="a1111")


def _px(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _run(pipe, *jobs: ImageJob, invariant: bool = True) -> list[np.ndarray]:
    return [_px(im) for im in generate(pipe, list(jobs), invariant, PromptEmbeds())]


def _reference(pipe, texts: list[tuple[str, str]], seed: int = 3, steps: int = 4, cfg: float = 7.0,
               size: int = 32) -> np.ndarray:
    """diffusers' own callback_on_step_end: denoiser call i runs on (prompt, negative) texts[i]."""
    import torch

    embeds = PromptEmbeds()
    xl = hasattr(pipe, "text_encoder_2")
    with torch.inference_mode():
        per_step = [embeds.call_kwargs(pipe, [t], None, True, (), "a1111") for t in texts]

    def swap(p, i, t, kw):
        if i + 1 < len(per_step):
            nxt = per_step[i + 1]
            kw["prompt_embeds"] = torch.cat([nxt["negative_prompt_embeds"], nxt["prompt_embeds"]])
            if xl:
                kw["add_text_embeds"] = torch.cat([nxt["negative_pooled_prompt_embeds"],
                                                   nxt["pooled_prompt_embeds"]])
        return kw

    inputs = ["prompt_embeds", "add_text_embeds"] if xl else ["prompt_embeds"]
    with torch.inference_mode():
        out = pipe(**per_step[0], num_inference_steps=steps, guidance_scale=cfg, width=size, height=size,
                   generator=[torch.Generator().manual_seed(seed)], output_type="pil",
                   callback_on_step_end=swap, callback_on_step_end_tensor_inputs=inputs)
    return _px(out.images[0])


@pytest.mark.parametrize("model", ["sd", "xl"])
@pytest.mark.slow
def test_editing_switches_at_a1111_steps(model, request) -> None:
    pipe = request.getfixturevalue(model)
    # 4 steps: `[A:B:2]` is A for denoiser calls 0-2 and B for call 3; the negative `[..:..:1]` switches after call 1
    (got,) = _run(pipe, _job(f"[{A}:{B}:2]", f"[{NEG_A}:{NEG_B}:1]"))
    ref = _reference(pipe, [(A, NEG_A), (A, NEG_A), (A, NEG_B), (B, NEG_B)])
    assert np.array_equal(got, ref)
    assert not np.array_equal(got, _reference(pipe, [(A, NEG_A)] * 4))  # it did change
    # a fraction: 0.5 of 4 steps = step 2, the same switch point
    (frac,) = _run(pipe, _job(f"[{A}:{B}:0.5]", f"[{NEG_A}:{NEG_B}:0.25]"))
    assert np.array_equal(frac, ref)


@pytest.mark.slow
def test_alternation_and_from_to_forms(sd) -> None:
    (alt,) = _run(sd, _job(f"[{A}|{B}]", NEG_A))
    # A1111: calls 0 and 1 read entry 1 (A), call 2 entry 2 (B), call 3 entry 3 (A)
    assert np.array_equal(alt, _reference(sd, [(A, NEG_A), (A, NEG_A), (B, NEG_A), (A, NEG_A)]))
    (add,) = _run(sd, _job(f"{A}[, {B}:1]"))  # [to:when]: added after call 1
    assert np.array_equal(add, _reference(sd, [(A, "")] * 2 + [(f"{A}, {B}", "")] * 2))
    (drop,) = _run(sd, _job(f"{A}[, {B}::3]"))  # [from::when]: removed after call 3
    assert np.array_equal(drop, _reference(sd, [(f"{A}, {B}", "")] * 4))
    (nested,) = _run(sd, _job(f"[{A}:[{B}:{NEG_B}:2]:1]"))
    assert np.array_equal(nested, _reference(sd, [(A, "")] * 2 + [(B, "")] + [(NEG_B, "")]))


def test_one_text_schedules_equal_the_plain_prompt(sd) -> None:
    plain, weight_one, same, edited_away = _run(sd, _job(A), _job(f"{A}:1"), _job(f"[{A}:{A}:0.5]"),
                                                _job(f"{A}[ zebra::0]"))
    assert np.array_equal(plain, weight_one) and np.array_equal(plain, same) and np.array_equal(plain, edited_away)


@pytest.mark.slow
def test_composable_guidance_algebra(sd) -> None:
    # u + s·Σ w_k (c_k − u): A AND A:0.5 at cfg 4 is A at cfg 6; A:0.5 at cfg 8 is A at cfg 4 (up to rounding)
    (two,) = _run(sd, _job(f"{A} AND {A}:0.5", cfg=4.0))
    (six,) = _run(sd, _job(A, cfg=6.0))
    (half,) = _run(sd, _job(f"{A}:0.5", cfg=8.0))
    (four,) = _run(sd, _job(A, cfg=4.0))
    assert np.abs(two - six).max() <= 1 and np.abs(half - four).max() <= 1
    (mixed,) = _run(sd, _job(f"{A} AND {B}:0.8", cfg=7.0))
    assert not np.array_equal(mixed, _run(sd, _job(A))[0])


@pytest.mark.parametrize("model", ["sd", "xl"])
@pytest.mark.slow
def test_batch_equals_each_image_alone(model, request) -> None:
    pipe = request.getfixturevalue(model)
    jobs = [_job(A, NEG_A, seed=1), _job(f"[{A}:{B}:0.5]", f"[{NEG_A}|{NEG_B}]", seed=2),
            _job(f"{A} AND {B}:0.7", NEG_A, seed=3), _job(f"[{B}|{A}|]", seed=4)]
    together = _run(pipe, *jobs)
    for job, image in zip(jobs, together, strict=True):
        assert np.array_equal(image, _run(pipe, job)[0]), job.prompt


PROMPTS = [A, f"[{A}:{B}:0.5]", f"[{B}|{A}]", f"{A} AND {B}:0.7"]
PERF = [{"channels_last": c, "fuse_qkv": q, "fuse_lora": f} for c, q, f in
        ((False, False, False), (True, False, True), (False, True, True), (True, True, False))]


@pytest.mark.slow
def test_each_image_equals_itself_alone_in_a_fresh_process(tiny_dir: Path, lora_a: dict, tmp_path: Path) -> None:
    from test_differential import alone, combo_name, pixels

    from runner.run import run

    def cfg(prompts: list[str], perf: dict) -> dict:
        return {"model": {"id": str(tiny_dir)}, "prompts": prompts, "negative_prompt": f"[{NEG_A}|{NEG_B}]",
                "seeds": [5], "steps": 4, "width": 32, "height": 32, "device": "cpu", "lora_sets": [[lora_a]],
                "perf": perf, "grid": {"enabled": False}, "viewer": {"enabled": False}, "batch_size": 4}

    ref = alone({f"{combo_name(p)}.{i}": cfg([t], p) for p in PERF for i, t in enumerate(PROMPTS)}, tmp_path / "alone")
    for perf in PERF:
        out = tmp_path / combo_name(perf)
        result = run(validate(cfg(PROMPTS, perf)), out, progress=False)
        assert result.generated == 4 and {e["batch_size"] for e in result.entries} == {4}
        for e in result.entries:
            i = PROMPTS.index(e["prompt"])
            assert np.array_equal(pixels(out / e["file"]), ref[f"{combo_name(perf)}.{i}"]), (perf, e["prompt"])
