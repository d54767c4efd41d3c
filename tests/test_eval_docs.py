"""docs/evaluation.md: every ```bash command runs as written (in order, in one folder) and does what the page says;
the plot the page shows is the one its demo run makes (T2I_WRITE_DOC_IMAGES=1 rewrites docs/img/ from it)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from PIL import Image

from runner.eval_cli import main as eval_main
from runner.models.tiny import main as tiny_main

DOC = REPO / "docs" / "evaluation.md"


def doc_commands() -> list[list[str]]:
    text = DOC.read_text(encoding="utf-8")
    return [shlex.split(line) for block in re.findall(r"```bash\n(.*?)```", text, re.S)
            for line in block.splitlines() if line.strip()]


def _count(run: Path, scorer: str) -> int:
    return sum(json.loads(x)["scorer"] == scorer for x in (run / "metrics.jsonl").read_text().splitlines())


@pytest.mark.slow
def test_every_evaluation_doc_command_runs_as_written(tmp_path: Path, monkeypatch, capsys) -> None:
    text = DOC.read_text(encoding="utf-8")
    (tmp_path / "my_images").mkdir()
    for i, color in enumerate(("red", "blue")):
        Image.new("RGB", (64, 64), color).save(tmp_path / "my_images" / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "outputs" / "eval-demo"
    commands = doc_commands()
    assert [c[0] for c in commands] == ["t2i-tiny", "t2i", "t2i-tiny", "t2i-eval", "t2i-eval", "t2i-eval"]
    for argv in commands:
        capsys.readouterr()
        if argv[0] == "t2i":
            r = run_cli(*argv[1:], cwd=tmp_path)
            assert r.returncode == 0, r.stderr
            assert _count(run, "clip_t") == 15 and _count(run, "lora_effect") == 12  # as the page says
            continue
        code = (tiny_main if argv[0] == "t2i-tiny" else eval_main)(argv[1:])
        out, err = capsys.readouterr()
        if "clip_x" in argv:  # the bad-input example: the line the page quotes, exit 2, nothing written
            quoted = re.search(r"prints `(t2i-eval: error: unknown metric[^`]*)`", text, re.S).group(1)
            assert code == 2 and err.strip() == " ".join(quoted.split())
        elif "--summary" in argv:
            assert code == 0 and "Pareto front" in out and "| LoRA set | weight |" in out
            assert (run / "eval.md").is_file() and (run / "viewer-metrics.js").is_file()
            for name in ("clip_t_vs_weight", "tradeoff_clip_t_vs_lora_effect", "tradeoff_clip_t_vs_dino"):
                assert (run / "eval" / f"{name}.png").is_file() and (run / "eval" / f"{name}.svg").is_file()
        elif "--reference-dir" in argv:
            assert code == 0 and _count(run, "clip_i") == 15 and _count(run, "dino") == 15
        else:
            assert code == 0 and (tmp_path / argv[1] / "config.json").is_file()
    image = re.search(r"!\[[^]]*\]\((img/[^)]+)\)", text).group(1)
    made = run / "eval" / Path(image).name.removeprefix("eval-")
    assert made.is_file()
    if os.environ.get("T2I_WRITE_DOC_IMAGES") == "1":
        shutil.copy(made, DOC.parent / image)
    assert (DOC.parent / image).is_file()
