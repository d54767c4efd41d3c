"""Issue 31: defects a new user hit in one afternoon (a foreign folder overwritten, one tag bricking a run dir,
tracebacks for user mistakes, model comparisons). Each test failed on the main of that day."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

from runner.outputs.sweep import merge_main

TINY = ["model=tiny", "prompts=[a red fox]", "seeds=[1]", "steps=1", "width=32", "height=32"]


def _user_folder(folder: Path) -> dict[str, bytes]:
    (folder / "grids").mkdir(parents=True)
    (folder / "index.html").write_text("<h1>mine</h1>")
    (folder / "manifest.jsonl").write_text('{"my": "data"}\n')
    (folder / "grids" / "grid.png").write_text("x")
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# -- 1. a folder that is not a run dir is never written into ---------------------------------------------------------

def test_t2i_refuses_a_foreign_non_empty_folder(tmp_path: Path) -> None:
    before = _user_folder(tmp_path / "U")
    r = run_cli(*TINY, f"output_dir={tmp_path / 'U'}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "not a t2i run dir" in r.stderr and "index.html" in r.stderr
    assert _files(tmp_path / "U") == before
    # a run dir t2i made is still extended (resume), and an empty folder is fine
    (tmp_path / "E").mkdir()
    assert run_cli(*TINY, f"output_dir={tmp_path / 'E'}", cwd=tmp_path).returncode == 0
    r = run_cli(*TINY, "seeds=[1,2]", f"output_dir={tmp_path / 'E'}", cwd=tmp_path)
    assert r.returncode == 0 and "1 already done" in r.stdout, r.stdout + r.stderr


def test_merge_refuses_a_foreign_output_and_names_a_bad_one(tmp_path: Path, capsys) -> None:
    assert run_cli(*TINY, f"output_dir={tmp_path / 'R'}", cwd=tmp_path).returncode == 0
    before = _user_folder(tmp_path / "M")
    capsys.readouterr()
    assert merge_main([str(tmp_path / "R"), "-o", str(tmp_path / "M")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a t2i run dir" in err
    assert _files(tmp_path / "M") == before
    # 12. onto an existing file or into a read-only place: one line, exit 2 (not a raw FileExistsError/OSError)
    (tmp_path / "afile").write_text("x")
    for target in (tmp_path / "afile", tmp_path / "afile" / "out"):  # (a read-only folder does not stop root)
        assert merge_main([str(tmp_path / "R"), "-o", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("t2i-merge: error: cannot write to --output"), err
    assert merge_main([str(tmp_path / "R"), "-o", str(tmp_path / "M2")]) == 0  # a new folder: fine, re-merge too
    assert merge_main([str(tmp_path / "R"), "-o", str(tmp_path / "M2")]) == 0


def test_train_refuses_a_foreign_non_empty_folder(tmp_path: Path) -> None:
    from conftest import run_program

    t = tmp_path / "T"
    t.mkdir()
    (t / "train_config.yaml").write_text("mine: true\n")
    (t / "loss.csv").write_text("when,what\n1,2\n")
    before = _files(t)
    r = run_program("t2i-train", "model=tiny", f"data.dir={tmp_path}", f"output_dir={t}", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a t2i run dir" in r.stderr, r.stderr
    assert _files(t) == before
