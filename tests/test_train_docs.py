"""docs/training.md: every ```bash command runs as written (tiny models, in-process), and does what the text says;
recipes compose per family; bad training input is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from conftest import run_program
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "training.md"
COLORS = {"red": (220, 30, 30), "blue": (30, 40, 220)}


def doc_commands() -> list[list[str]]:
    """The page's commands this test runs, in order, split like a shell (blocks another test covers left out)."""
    text = DOC.read_text(encoding="utf-8")
    out = []
    for mark, block in re.findall(r"(<!--[^\n]*-->\n)?```bash\n(.*?)```", text, flags=re.S):
        if "covered-by" in mark and "test_train_docs.py" not in mark:
            continue
        for line in block.splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                out.append(argv)
    return out


def photos(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rgb in COLORS.items():
        Image.new("RGB", (40, 32), rgb).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {name} square")
    return folder


def run(argv: list[str], cwd: Path):
    if argv[0] == "t2i-tiny":
        from runner.models.tiny import main as tiny_main

        assert tiny_main([str(cwd / argv[1]), *argv[2:]]) == 0
        return None
    res = run_program(argv[0], *argv[1:], cwd=cwd)
    assert res.returncode == 0, f"{shlex.join(argv)}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return res


@pytest.mark.slow
def test_training_page_commands_run_as_written(tmp_path: Path) -> None:
    commands = doc_commands()
    assert [c[0] for c in commands] == ["t2i-train", "t2i", "t2i-tiny", "t2i-train", "t2i-inspect", "t2i"]
    photos(tmp_path / "photos")
    photos(tmp_path / "my_images")
    outputs = [run(argv, tmp_path) for argv in commands]
    assert (tmp_path / "runs" / "first" / "my-images.safetensors").is_file()
    assert len((tmp_path / "runs" / "first-sweep" / "manifest.jsonl").read_text().splitlines()) == 3
    runs = tmp_path / "runs" / "flux1"
    # what the page says the training command writes
    assert (runs / "photos.safetensors").is_file() and (runs / "photos_kohya.safetensors").is_file()
    assert sorted(p.name for p in (runs / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert (runs / "loss.csv").is_file() and (runs / "loss.png").is_file()
    samples = [json.loads(x) for x in (runs / "samples" / "manifest.jsonl").read_text().splitlines()]
    assert sorted({e["step"] for e in samples}) == [2, 4]  # the sample sweep, a runner run dir with a step axis
    from safetensors import safe_open

    with safe_open(str(runs / "photos_kohya.safetensors"), "pt") as f:
        keys = list(f.keys())  # noqa: SIM118
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv") for k in keys)  # BFL names
    # t2i-inspect shows the ss_* training metadata
    inspect = outputs[4].stdout
    assert "flux1" in inspect and "4" in inspect, inspect
    # the sweep made one image per LoRA scale
    manifest = [json.loads(x) for x in (tmp_path / "runs" / "sweep" / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 2


def test_recipes_exist_for_every_family() -> None:
    from hydra import compose, initialize_config_dir

    from runner.train.config import register_configs
    from runner.train.families import SPECS

    register_configs()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        for family in SPECS:
            cfg = compose("train", overrides=[f"recipe={family}-lora"])
            assert cfg.model.family == family, family
            assert cfg.train.lr == 1e-4 and cfg.lora.rank >= 16, family
            override = compose("train", overrides=[f"recipe={family}-lora", "model=tiny-flux1", "lora.rank=4"])
            assert override.model.id == "builtin:tiny-flux1" and override.lora.rank == 4  # the command line wins


def _untrainable(tmp: Path) -> list[str]:
    model = tmp / "sana"
    model.mkdir(parents=True)
    (model / "model_index.json").write_text(json.dumps({"_class_name": "SanaPipeline"}))
    return ["model.id=" + str(model), f"data.dir={photos(tmp / 'data')}"]


BAD = {
    "family it cannot train": (_untrainable, "cannot train"),
    "rank zero": (lambda t: ["model=tiny-flux1", f"data.dir={photos(t / 'data')}", "lora.rank=0"], "lora.rank=0"),
    "size not a multiple of the latent factor": (
        lambda t: ["model=tiny-zimage", f"data.dir={photos(t / 'data')}", "data.resolution=40"],
        "data.resolution=40 is not a multiple of 16"),
    "bucket not a multiple of the latent factor": (
        lambda t: ["model=tiny-zimage", f"data.dir={photos(t / 'data')}", "data.resolution=32",
                   "data.buckets=[32,40]"],
        "data.buckets has 40, not a multiple of 16"),
    "text-encoder LoRA where the loader takes none": (
        lambda t: ["model=tiny-qwenimage", f"data.dir={photos(t / 'data')}", "lora.text_encoder=true",
                   "data.resolution=32"], "lora.text_encoder=true"),
    "validation folder that is not there": (
        lambda t: ["model=tiny", f"data.dir={photos(t / 'data')}", f"validation.dir={t / 'held'}"],
        "is not a folder; give the folder of held-out images"),
    "unknown timestep sampling": (
        lambda t: ["model=tiny-flux1", f"data.dir={photos(t / 'data')}", "train.timestep_sampling=cosine"],
        "train.timestep_sampling"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_training_input_is_one_line_exit_2(case: str, tmp_path: Path) -> None:
    make_args, message = BAD[case]
    res = run_program("t2i-train", *make_args(tmp_path), f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("t2i-train: error:") and message in lines[0], res.stderr
    assert not (tmp_path / "run").exists()  # nothing half-written
