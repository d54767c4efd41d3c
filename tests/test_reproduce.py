"""`t2i from_image=IMG`: regenerate an image bit-identically on CPU, sweep from it, refuse bad records."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from runner.config.overrides import CONF_DIR
from runner.outputs.metadata import read_png_record
from runner.outputs.writer import save_png
from runner.reproduce.from_image import explicit_keys, record_config

SIDE = 32


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def manifest(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "manifest.jsonl").read_text().splitlines()]


def _lora(spec: dict, scale: float = 1.0) -> str:
    parts = [f"source:'{spec['source']}'", f"name:{spec['name']}", f"scale:{scale}"]
    if spec.get("weight_name"):
        parts.append(f"weight_name:{spec['weight_name']}")
    return "{" + ",".join(parts) + "}"


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path, lora_a: dict, lora_b: dict) -> dict:
    """Four images made by the CLI in batches of two: {(lora, seed): png path}."""
    d = tmp_path_factory.mktemp("orig") / "run"
    r = run_cli(f"model.id={tiny_dir}", "prompts=['a red fox, in snow']", "negative_prompt=blurry",
                "seeds=[1,2]", "steps=2", f"width={SIDE}", f"height={SIDE}", "scheduler=euler_a",
                f"lora_sets=[[],[{_lora(lora_a)},{_lora(lora_b, 0.5)}]]", "lora_scales=[0.8]",
                f"hydra.run.dir={d}", cwd=d.parent)
    assert r.returncode == 0, r.stderr
    out = {}
    for e in manifest(d):
        assert e["batch_size"] == 2 and e["batch_invariant"] is True
        out[(bool(e["loras"]), e["seed"])] = d / e["file"]
    assert len(out) == 4
    return out


def _regenerate(tmp_path: Path, img: Path, *overrides: str, isolated: bool = False):
    """`t2i from_image=IMG OVERRIDES` (isolated: in a fresh process, else in this one, past its cached pipeline)."""
    d = tmp_path / "again"
    r = run_cli(f"from_image={img}", *overrides, f"hydra.run.dir={d}", cwd=tmp_path, isolated=isolated)
    return r, d


@pytest.mark.slow
def test_regenerate_with_loras_is_byte_identical(originals: dict, tmp_path: Path) -> None:
    img = originals[(True, 1)]
    r, d = _regenerate(tmp_path, img, isolated=True)  # the promise in full: the image alone, in a new process
    assert r.returncode == 0, r.stderr
    (entry,) = manifest(d)
    assert np.array_equal(pixels(d / entry["file"]), pixels(img))
    assert entry["batch_size"] == 1  # made alone now, in a batch of two before
    assert entry["reproduced"] == {"source": str(img.resolve()), "compared": True, "identical": True,
                                   "max_pixel_diff": 0}
    assert "identical" in r.stdout.strip().splitlines()[-1]
    old, _ = read_png_record(str(img))
    for key in ("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height",
                "scheduler", "lora_scale", "device", "batch_invariant"):
        assert entry[key] == old[key], key
    assert entry["loras"] == old["loras"] and entry["model"]["hash"] == old["model"]["hash"]
    assert [lo["scale"] for lo in entry["loras"]] == [0.8, 0.4]


def test_regenerate_without_lora_and_sweep_new_seeds(originals: dict, tmp_path: Path) -> None:
    img = originals[(False, 2)]
    r, d = _regenerate(tmp_path, img, "seeds=[2,7]")
    assert r.returncode == 0, r.stderr
    by_seed = {e["seed"]: e for e in manifest(d)}
    assert set(by_seed) == {2, 7} and all(e["loras"] == [] for e in by_seed.values())
    assert np.array_equal(pixels(d / by_seed[2]["file"]), pixels(img))
    assert by_seed[2]["reproduced"]["identical"] is True and by_seed[2]["reproduced"]["max_pixel_diff"] == 0
    assert by_seed[7]["reproduced"]["compared"] is False and "seed" in by_seed[7]["reproduced"]["reason"]
    assert not np.array_equal(pixels(d / by_seed[7]["file"]), pixels(img))
    assert "identical" in r.stdout.strip().splitlines()[-1]


def test_new_lora_scale_sweep_from_an_image(originals: dict, tmp_path: Path) -> None:
    img = originals[(True, 2)]
    r, d = _regenerate(tmp_path, img, "lora_scales=[0.5,0.8]", "steps=2")
    assert r.returncode == 0, r.stderr
    by_scale = {e["lora_scale"]: e for e in manifest(d)}
    assert set(by_scale) == {0.5, 0.8}
    # the recorded per-LoRA scales (1 and 0.5) times the new multiplier
    assert [lo["scale"] for lo in by_scale[0.5]["loras"]] == [0.5, 0.25]
    assert by_scale[0.8]["reproduced"]["identical"] is True
    assert np.array_equal(pixels(d / by_scale[0.8]["file"]), pixels(img))
    assert by_scale[0.5]["reproduced"]["reason"] == "settings differ: loras"


def _record_png(tmp_path: Path, src: Path, edit) -> Path:
    rec, _ = read_png_record(str(src))
    rec = copy.deepcopy(rec)
    edit(rec)
    out = tmp_path / "edited.png"
    with Image.open(src) as im:
        save_png(im.convert("RGB"), out, rec)
    return out


def _set_model(rec: dict) -> None:
    rec["model"]["location"] = "/nonexistent/model-dir"


def _set_lora_source(rec: dict) -> None:
    rec["loras"][1]["source"] = "/nonexistent/gone.safetensors"


def _set_lora_sha(rec: dict) -> None:
    rec["loras"][0]["sha256"] = "0" * 64


@pytest.mark.parametrize(("case", "phrase"), [
    ("missing", "does not exist"), ("text", "is not an image"), ("plain", "no generation metadata"),
    ("model", "model '/nonexistent/model-dir', which is not available"),
    ("lora", "LoRA 'B', which is not available"),
    ("sha", "has sha256"),
])
def test_bad_input_is_one_line_exit_2(originals: dict, tmp_path: Path, case: str, phrase: str) -> None:
    if case == "missing":
        img = tmp_path / "missing.png"
    elif case == "text":
        img = tmp_path / "notes.png"
        img.write_text("hello\n")
    elif case == "plain":
        img = tmp_path / "plain.png"
        Image.new("RGB", (8, 8)).save(img)
    else:
        edit = {"model": _set_model, "lora": _set_lora_source, "sha": _set_lora_sha}[case]
        img = _record_png(tmp_path, originals[(True, 1)], edit)
    r, d = _regenerate(tmp_path, img)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("t2i: error: ") and phrase in r.stderr and str(img) in r.stderr
    if case == "sha":
        assert "strict=false" in r.stderr
    assert not (d / "manifest.jsonl").exists()


def test_lora_sha_mismatch_with_strict_false_warns_and_runs(originals: dict, tmp_path: Path) -> None:
    img = _record_png(tmp_path, originals[(True, 1)], _set_lora_sha)
    r, d = _regenerate(tmp_path, img, "strict=false")
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert "WARNING" in out and "has sha256" in out and "running anyway" in out
    (entry,) = manifest(d)
    assert entry["reproduced"]["compared"] is False
    assert entry["reproduced"]["reason"] == "settings differ: loras"
    assert np.array_equal(pixels(d / entry["file"]), pixels(originals[(True, 1)]))  # same file after all


def _a1111_png(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "a1111.png"
    info = PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (SIDE, SIDE), "gray").save(path, pnginfo=info)
    return path


def test_from_a1111_image_uses_its_settings(tmp_path: Path, tiny_dir: Path) -> None:
    img = _a1111_png(tmp_path, "a lighthouse,\nat night\nNegative prompt: fog\nSteps: 2, Sampler: DDIM, "
                               f"CFG scale: 5, Seed: 77, Size: {SIDE}x{SIDE}, Model: v1-5-pruned, "
                               "Clip skip: 2")
    r, d = _regenerate(tmp_path, img, f"model.id={tiny_dir}")
    assert r.returncode == 0, r.stderr
    (e,) = manifest(d)
    assert e["clip_skip"] == 2  # A1111's Clip skip is applied, not ignored
    got = (e["prompt"], e["negative_prompt"], e["seed"], e["steps"])
    assert got == ("a lighthouse,\nat night", "fog", 77, 2)
    assert (e["guidance_scale"], e["width"], e["scheduler"]) == (5.0, SIDE, "ddim")
    assert e["reproduced"]["compared"] is False and "not made by t2i-runner" in e["reproduced"]["reason"]


def test_from_a1111_image_with_loras_known_only_by_hash_is_refused(tmp_path: Path, tiny_dir: Path) -> None:
    img = _a1111_png(tmp_path, 'a cat\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 32x32, '
                               'Lora hashes: "add_detail: 7c6bad76eb54"')
    r, _ = _regenerate(tmp_path, img, f"model.id={tiny_dir}")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "add_detail" in r.stderr and "lora_sets" in r.stderr


def test_explicit_keys_of_overrides() -> None:
    got = explicit_keys(["from_image=/x.png", "seeds=[1,2]", "model=tiny", "lora=tiny_examples",
                         "model.dtype=fp32", "grid.enabled=false"], CONF_DIR)
    assert got == {"seeds", "model", "lora_sets", "model.dtype", "grid.enabled"}


def test_record_config_restores_per_lora_scales_and_multiplier() -> None:
    rec = {"prompt": "cost ${x}", "negative_prompt": "", "seed": 3, "steps": 2, "guidance_scale": 7.5,
           "width": 32, "height": 32, "scheduler": None, "lora_scale": 0.3, "device": "cuda:0",
           "batch_invariant": False,
           "model": {"id": "org/m", "kind": "hub", "revision": "abc", "pipeline": "StableDiffusionXLPipeline",
                     "dtype": "float16", "variant": "fp16"},
           "loras": [{"name": "A", "source": "a", "weight_name": None, "scale": 0.3 * 1.0},
                     {"name": "B", "source": "b", "weight_name": "w.safetensors", "scale": 0.5 * 0.3}]}
    cfg = record_config(rec)
    assert cfg["lora_scales"] == [0.3]
    assert [lo["scale"] * 0.3 for lo in cfg["lora_sets"][0]] == [lo["scale"] for lo in rec["loras"]]
    assert cfg["model"] == {"id": "org/m", "revision": "abc", "pipeline": "sdxl", "dtype": "fp16",
                            "variant": "fp16", "config": None, "transformer": None, "family": None, "settings": {}}
    assert cfg["device"] == "cuda" and cfg["batch_invariant"] is False and cfg["prompts"] == ["cost \\${x}"]
    rec["lora_scale"] = 0.0
    rec["loras"] = [{"name": "A", "source": "a", "scale": 0.0}]
    assert record_config(rec)["lora_scales"] == [0.0]


def test_fast_path_settings_are_recorded_and_reused(tmp_path: Path, tiny_dir: Path, lora_a: dict) -> None:
    d = tmp_path / "fused"
    r = run_cli(f"model.id={tiny_dir}", "prompts=[a lighthouse]", "seeds=[4]", "steps=2", f"width={SIDE}",
                f"height={SIDE}", f"lora_sets=[[{_lora(lora_a)}]]", "perf.fuse_lora=true", f"hydra.run.dir={d}",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (entry,) = manifest(d)
    assert entry["perf"]["fuse_lora"] is True and entry["model"]["config"] is None
    r, again = _regenerate(tmp_path, d / entry["file"])
    assert r.returncode == 0, r.stderr
    (new,) = manifest(again)
    assert new["perf"]["fuse_lora"] is True and new["reproduced"]["identical"] is True
    assert np.array_equal(pixels(d / entry["file"]), pixels(again / new["file"]))


def test_clip_skip_is_reused_by_from_image(tmp_path: Path, tiny_dir: Path) -> None:
    d = tmp_path / "skip"
    r = run_cli(f"model.id={tiny_dir}", "prompts=[a lighthouse]", "seeds=[4]", "steps=2", f"width={SIDE}",
                f"height={SIDE}", "clip_skip=2", f"hydra.run.dir={d}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (entry,) = manifest(d)
    r, again = _regenerate(tmp_path, d / entry["file"])
    assert r.returncode == 0, r.stderr
    (new,) = manifest(again)
    assert new["clip_skip"] == 2 and new["reproduced"]["identical"] is True
