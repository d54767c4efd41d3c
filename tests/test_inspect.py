"""t2i-inspect: our JSON record, A1111 infotext from other tools mapped onto our keys, and bad input."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import run_program
from omegaconf import OmegaConf
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from runner.config import ConfigError, RunConfig
from runner.config.schedulers import from_a1111
from runner.outputs.metadata import infotext
from runner.reproduce.inspect import FOREIGN, read_record, record_from_infotext

# Real-world shapes of A1111 / Forge / ComfyUI-saver infotext.
A1111_HIRES = (
    "masterpiece, best quality, 1girl, solo, red scarf,\n"
    "looking at viewer, upper body <lora:add_detail:0.6> <lora:epiNoiseoffset_v2:0.4>\n"
    "Negative prompt: (worst quality, low quality:1.4), lowres,\n"
    "bad anatomy, watermark, EasyNegative\n"
    "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, "
    "Hires upscale: 2, Hires steps: 15, Hires upscaler: R-ESRGAN 4x+, "
    'Lora hashes: "add_detail: 7c6bad76eb54, epiNoiseoffset_v2: d1131f7207d6", '
    'TI hashes: "EasyNegative: c74b4e810b03", Version: v1.6.0'
)
A1111_NO_NEGATIVE = (
    "a photo of a cat sitting on a windowsill, golden hour\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: cc6cb27103, "
    "Model: v1-5-pruned-emaonly, Version: v1.10.1"
)
A1111_SCHEDULE_TYPE = (
    'portrait of an old fisherman, "weathered" face, dramatic light\n'
    "Negative prompt: blurry\n"
    "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, Seed: 3, Size: 832x1216, "
    "Model hash: 31e35c80fc, Model: sd_xl_base_1.0, ADetailer model: face_yolov8n.pt, "
    'ADetailer prompt: "a \\"happy\\" face, smiling", Version: v1.9.4'
)
FORGE_UNSUPPORTED_SAMPLER = (
    "cinematic still of a lighthouse in a storm\n"
    "Steps: 25, Sampler: DPM++ 2M SDE, Schedule type: Exponential, CFG scale: 4, Seed: 987654321, "
    "Size: 1024x1024, Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Distilled CFG Scale: 3.5, "
    "Version: f2.0.1v1.10.1-previous-313-g8a042934"
)
COMFY_SAVER = (
    "a cozy cabin in the snowy woods\n"
    "Negative prompt: text, watermark\n"
    "Steps: 20, Sampler: euler_ancestral, CFG scale: 8.0, Seed: 156680208700286, Size: 768x512, "
    "Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Version: ComfyUI"
)


def test_a1111_multiline_prompts_quoted_lora_hashes_and_hires() -> None:
    rec = record_from_infotext(A1111_HIRES)
    assert rec["source_format"] == FOREIGN
    assert rec["prompt"] == ("masterpiece, best quality, 1girl, solo, red scarf,\nlooking at viewer, "
                             "upper body <lora:add_detail:0.6> <lora:epiNoiseoffset_v2:0.4>")
    assert rec["negative_prompt"] == ("(worst quality, low quality:1.4), lowres,\n"
                                      "bad anatomy, watermark, EasyNegative")
    assert (rec["steps"], rec["guidance_scale"], rec["seed"]) == (28, 7.0, 1234567890)
    assert (rec["width"], rec["height"]) == (512, 768)
    assert (rec["scheduler"], rec["schedule"]) == ("dpmpp_2m", "karras") and rec["sampler"] == "DPM++ 2M Karras"
    assert rec["model"] == {"id": None, "name": "v1-5-pruned-emaonly", "hash": "6ce0161689"}
    assert [(lo["name"], lo["sha256"], lo["source"]) for lo in rec["loras"]] == [
        ("add_detail", "7c6bad76eb54", None), ("epiNoiseoffset_v2", "d1131f7207d6", None)]
    assert (rec["hires_scale"], rec["hires_denoise"]) == (2.0, 0.45) and "Hires upscale" not in rec["ignored"]
    assert rec["clip_skip"] == 2 and "Clip skip" not in rec["ignored"]
    assert rec["embeddings"] == [{"name": "EasyNegative", "sha256": "c74b4e810b03"}]  # issue 25: mapped
    assert rec["versions"] == {"generator": "v1.6.0"}


def test_a1111_without_negative_prompt() -> None:
    rec = record_from_infotext(A1111_NO_NEGATIVE)
    assert rec["prompt"] == "a photo of a cat sitting on a windowsill, golden hour"
    assert rec["negative_prompt"] == "" and rec["loras"] == [] and rec["ignored"] == {}
    got = (rec["steps"], rec["guidance_scale"], rec["seed"], rec["width"], rec["height"])
    assert got == (20, 7.5, 42, 512, 512)
    assert (rec["scheduler"], rec["schedule"]) == ("euler_a", "uniform")  # A1111's k-diffusion default sigmas


def test_a1111_schedule_type_and_escaped_quotes() -> None:
    rec = record_from_infotext(A1111_SCHEDULE_TYPE)
    assert rec["prompt"] == 'portrait of an old fisherman, "weathered" face, dramatic light'
    assert rec["negative_prompt"] == "blurry"
    assert (rec["scheduler"], rec["schedule"]) == ("dpmpp_2m", "karras")
    assert (rec["width"], rec["height"]) == (832, 1216)
    assert rec["ignored"]["ADetailer prompt"] == 'a "happy" face, smiling'
    assert "Schedule type" not in rec["ignored"]


def test_forge_dpmpp_2m_sde_exponential_maps_onto_sde_dpmsolver_with_exponential_sigmas() -> None:
    rec = record_from_infotext(FORGE_UNSUPPORTED_SAMPLER)
    assert (rec["scheduler"], rec["schedule"]) == ("dpmpp_2m_sde", "exponential")
    assert (rec["sampler"], rec["schedule_type"]) == ("DPM++ 2M SDE", "Exponential") and rec["no_equivalent"] == []
    assert rec["ignored"] == {"Distilled CFG Scale": "3.5"}
    assert rec["versions"]["generator"].startswith("f2.0.1")


def test_comfyui_saver_names() -> None:
    rec = record_from_infotext(COMFY_SAVER)
    assert rec["scheduler"] == "euler_a" and rec["seed"] == 156680208700286 and rec["guidance_scale"] == 8.0
    assert rec["negative_prompt"] == "text, watermark" and (rec["width"], rec["height"]) == (768, 512)


@pytest.mark.parametrize(("sampler", "schedule_type", "want"), [
    ("Euler", None, ("euler", "uniform", [])), ("Euler", "Karras", ("euler", "karras", [])),
    ("DDIM", None, ("ddim", None, [])), ("PLMS", None, ("pndm", None, [])), ("UniPC", "Automatic", ("unipc", None, [])),
    ("DPM++ 2M", None, ("dpmpp_2m", "uniform", [])), ("DPM++ 2M", "Karras", ("dpmpp_2m", "karras", [])),
    ("DPM++ 2M", "Exponential", ("dpmpp_2m", "exponential", [])),
    ("DPM++ 2M", "Automatic", ("dpmpp_2m", "karras", [])),  # A1111 >= 1.9: Automatic is the sampler's own
    ("DPM++ 2M Karras", None, ("dpmpp_2m", "karras", [])),  # before 1.9 the schedule was part of the name
    ("DPM++ 2M SDE", "Exponential", ("dpmpp_2m_sde", "exponential", [])),
    ("DPM++ 2M SDE Karras", None, ("dpmpp_2m_sde", "karras", [])),
    ("DPM++ 2M SDE Heun", "Exponential", ("dpmpp_2m_sde_heun", "exponential", [])),
    ("DPM++ SDE", "Karras", ("dpmpp_sde", "karras", [])), ("DPM2 a", "Karras", ("dpm2_a", "karras", [])),
    ("LMS", "Beta", ("lms", "beta", [])), ("Heun", "SGM Uniform", ("heun", "sgm_uniform", [])),
    ("Euler", "Normal", ("euler", "uniform", [])), ("Euler", "Simple", ("euler", "simple", [])),
    ("Euler", "Polyexponential", ("euler", "exponential", [])),  # at A1111's default rho 1 (sigma vectors)
    ("Euler a", "Karras", ("euler_a", "karras", [])),  # A1111's Euler a takes every Schedule type
    ("LCM", None, ("lcm", None, [])), ("LCM", "Automatic", ("lcm", None, [])),  # LCM's own timesteps
    ("Euler", "Align Your Steps", ("euler", None, ["Schedule type: Align Your Steps"])),
    ("Euler", "KL Optimal", ("euler", None, ["Schedule type: KL Optimal"])),
    ("DPM adaptive", None, (None, None, ["Sampler: DPM adaptive"])),
    ("Restart", "Karras", (None, None, ["Sampler: Restart", "Schedule type: Karras"])),
    ("dpmpp_2m karras", None, ("dpmpp_2m", "karras", [])), ("heun", None, ("heun", "uniform", [])),
])
def test_a1111_sampler_and_schedule_type_to_ours(sampler: str, schedule_type: str | None, want: tuple) -> None:
    assert from_a1111(sampler, schedule_type) == want


def test_our_infotext_maps_back_onto_our_record() -> None:
    ours = {"prompt": "a red fox, detailed\nsecond line", "negative_prompt": "blurry, low quality",
            "steps": 4,
            "sampler": "DPM++ 2M", "schedule_type": "Karras", "guidance_scale": 6.5, "seed": 99, "width": 64,
            "height": 32,
            "model": {"name": "tiny", "hash": "0123456789abcdef" * 4},
            "loras": [{"name": "A", "sha256": "ab" * 32, "scale": 0.8}, {"name": "B", "sha256": "cd" * 32,
                                                                          "scale": 0.4}],
            "versions": {"t2i-runner": "0.1.0"}}
    rec = record_from_infotext(infotext(ours))
    for key in ("prompt", "negative_prompt", "steps", "guidance_scale", "seed", "width", "height", "sampler",
                "schedule_type"):
        assert rec[key] == ours[key], key
    assert (rec["scheduler"], rec["schedule"]) == ("dpmpp_2m", "karras")
    assert rec["model"]["hash"] == "0123456789" and rec["model"]["name"] == "tiny"
    assert [(lo["name"], lo["sha256"], lo["scale"]) for lo in rec["loras"]] == [("A", "ab" * 6, 0.8),
                                                                                ("B", "cd" * 6, 0.4)]
    assert rec["ignored"] == {}


def _inspect(*args: str) -> subprocess.CompletedProcess:
    return run_program("t2i-inspect", *args)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path, lora_a: dict) -> tuple[Path, dict]:
    """One real image of ours (with a LoRA) and its manifest entry."""
    from runner.run import run

    out = tmp_path_factory.mktemp("inspect-run")
    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), {
        "model": {"id": str(tiny_dir)}, "prompts": ["a red fox"], "negative_prompt": "blurry", "seeds": [7],
        "steps": 2, "width": 32, "height": 32, "lora_sets": [[lora_a]]})
    result = run(cfg, out, progress=False)
    (entry,) = result.entries
    return out / entry["file"], entry


def test_cli_json_is_the_full_record(generated: tuple[Path, dict]) -> None:
    path, entry = generated
    r = _inspect("--json", str(path))
    assert r.returncode == 0, r.stderr
    record = {k: v for k, v in entry.items() if k not in ("file", "index", "created")}  # run-dir facts: manifest only
    assert json.loads(r.stdout) == record
    assert read_record(path) == record


def test_cli_human_readable(generated: tuple[Path, dict], tiny_dir: Path) -> None:
    path, entry = generated
    r = _inspect(str(path))
    assert r.returncode == 0, r.stderr
    lines = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in r.stdout.splitlines()}
    assert lines["prompt"] == "a red fox" and lines["negative prompt"] == "blurry" and lines["seed"] == "7"
    assert lines["steps"].split()[0] == "2" and "32x32" in lines["steps"]
    assert f"hash {entry['model']['hash'][:12]}" in lines["model"] and str(tiny_dir) in lines["model"]
    assert lines["loras"].startswith("A x1") and entry["loras"][0]["sha256"][:12] in lines["loras"]
    assert lines["device"].startswith("cpu") and lines["regenerate"] == f"t2i from_image={path}"


def test_cli_reads_a1111_png_and_jpeg(tmp_path: Path) -> None:
    png = tmp_path / "a1111.png"
    info = PngInfo()
    info.add_text("parameters", A1111_HIRES)
    Image.new("RGB", (16, 16), "green").save(png, pnginfo=info)
    jpg = tmp_path / "a1111.jpg"
    exif = Image.Exif()
    # how A1111 saves JPEG: EXIF UserComment, "UNICODE" prefix, UTF-16
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + A1111_SCHEDULE_TYPE.encode("utf-16-be")
    Image.new("RGB", (16, 16), "green").save(jpg, exif=exif)
    r = _inspect("--json", str(png), str(jpg))
    assert r.returncode == 0, r.stderr
    got_png, got_jpg = json.loads(r.stdout)
    assert got_png == record_from_infotext(A1111_HIRES)
    assert got_jpg == record_from_infotext(A1111_SCHEDULE_TYPE)
    r = _inspect(str(png))
    assert r.returncode == 0 and "A1111 infotext" in r.stdout and "Hires upscale: 2" in r.stdout
    assert "seed:            1234567890" in r.stdout


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    comfy = tmp_path / "comfy.png"
    info = PngInfo()
    info.add_text("workflow", '{"nodes": []}')
    Image.new("RGB", (8, 8)).save(comfy, pnginfo=info)
    return {"no generation metadata": plain, "not an image": text, "does not exist": tmp_path / "missing.png",
            "ComfyUI workflow": comfy}


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    for phrase, path in _bad_files(tmp_path).items():
        r = _inspect(str(path))
        assert r.returncode == 2, (phrase, r.stdout, r.stderr)
        assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert phrase in r.stderr and str(path) in r.stderr and "Traceback" not in r.stderr
        with pytest.raises(ConfigError, match=phrase):
            read_record(path)
