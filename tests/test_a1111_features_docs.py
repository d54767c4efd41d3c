"""Every command of docs/a1111-features.md runs as written and does what the text next to it says
(`# -> N images`: a run dir with N images whose records keep the prompts as written; `# -> exit 2`: one error line
before anything is written)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from conftest import run_program
from PIL import Image

DOC = Path(__file__).resolve().parent.parent / "docs" / "a1111-features.md"
pytestmark = pytest.mark.slow  # ten runs, like the README's commands (tests/test_readme.py)


def doc_commands() -> list[tuple[list[str], str]]:
    """(argv, expected outcome) for each `t2i model=tiny…` line of the page."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S):
        for line in block.splitlines():
            argv = shlex.split(line, comments=True)
            m = re.search(r"# -> (.+)$", line)
            if argv and any(a.startswith("model=tiny") for a in argv):
                out.append((argv, m.group(1).strip() if m else ""))
    return out


def test_the_page_has_commands() -> None:
    assert len(doc_commands()) >= 4 and all(expect for _, expect in doc_commands())


@pytest.mark.parametrize(("argv", "expect"), doc_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_doc_command(argv: list[str], expect: str, tmp_path: Path, tiny_dir: Path) -> None:
    assert argv[0] == "t2i"
    if any("/path/to/embeddings" in a for a in argv):  # the placeholder folder, with an embedding for the tiny model
        import torch
        from safetensors.torch import save_file
        from transformers import CLIPTextConfig

        width = CLIPTextConfig.from_pretrained(str(tiny_dir / "text_encoder")).hidden_size
        (tmp_path / "emb").mkdir()
        save_file({"emb_params": torch.ones(2, width)}, str(tmp_path / "emb" / "myembedding.safetensors"))
        argv = [a.replace("/path/to/embeddings", str(tmp_path / "emb")) for a in argv]
    proc = run_program("t2i", *argv[1:], cwd=tmp_path)
    if expect == "exit 2":
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if "error" in ln.lower()]
        assert proc.returncode == 2, proc.stderr
        assert len(lines) == 1 and ("SD 1.x/2.x and SDXL" in lines[0] or "runs on SDXL models" in lines[0]), lines
        assert not (tmp_path / "outputs").exists()
        return
    assert proc.returncode == 0, proc.stderr
    n = int(re.fullmatch(r"(\d+) images?", expect).group(1))
    (manifest,) = (tmp_path / "outputs").rglob("manifest.jsonl")
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(records) == n
    prompts = next(a for a in argv if a.startswith("prompts="))
    for r in records:  # recorded as written (A1111's infotext keeps the syntax)
        assert r["prompt"] in prompts or r.get("prompt_sr_base", "") in prompts
    images = [np.asarray(Image.open(manifest.parent / r["file"])) for r in records]
    for i in range(1, n):  # every switch point / prompt / hires setting is its own image
        assert not np.array_equal(images[0], images[i])
    scale = next((float(a.split("=")[1]) for a in argv if a.startswith("hires.scale=")), 1.0)
    for r, im in zip(records, images, strict=True):  # the record keeps A1111's Size: the first pass's
        assert im.shape[:2] == (int(32 * scale), int(32 * scale)) and (r["width"], r["height"]) == (32, 32)
    if any(a.startswith("embedding_dirs=") for a in argv):
        assert [e["name"] for r in records for e in r["embeddings"]] == ["myembedding"]
    if "grid.x=refiner_switch_at" in argv:  # one image per switch point, each after the refiner took over
        assert sorted(r["refiner_switch_at"] for r in records) == [0.5, 0.8]
        assert all(r["refiner_switch_call"] >= 0 for r in records) and list((manifest.parent / "grids").glob("*.png"))
    if "grid.x=hires_denoise" in argv:
        assert {(r["hires_denoise"], r["lora_scale"]) for r in records} == {(0.3, 0.5), (0.3, 1.0), (0.6, 0.5),
                                                                           (0.6, 1.0)}
        assert list((manifest.parent / "grids").glob("*.png"))
