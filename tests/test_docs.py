"""The documentation: README is a front page, the site builds with `mkdocs build --strict`, the configuration
reference equals its generator's output, and the test commands select what the docs say."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("gen_reference", REPO / "docs" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configuration_reference_is_the_generators_output() -> None:
    """Regenerate with `python docs/gen_reference.py` when the schema changes."""
    committed = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == _generator().render(), "docs/configuration.md is stale: run `python docs/gen_reference.py`"


def test_the_reference_has_every_key_with_its_default() -> None:
    from omegaconf import OmegaConf

    from runner.config.schema import RunConfig

    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    flat = OmegaConf.to_container(OmegaConf.structured(RunConfig))
    for group in ("model", "grid", "viewer", "shard", "perf", "memory", "server"):
        for key, value in flat[group].items():
            row = re.search(rf"^\| `{group}\.{key}` \| (.*?) \|", text, flags=re.M)
            assert row, f"{group}.{key} missing"
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert row.group(1) == f"`{value}`", (key, row.group(1))
    assert "| `steps` | `null` | any | null = the model's default" in text


def test_readme_is_a_front_page_with_the_two_commands_first() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert "pip install -e" in blocks[0] and "t2i model=tiny" in blocks[1] and "pytest" in blocks[2]
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (REPO / link).is_file(), link
    assert (REPO / "docs" / "img" / "viewer.png").is_file()


def test_every_page_is_in_the_nav() -> None:
    nav = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    pages = {p.name for p in (REPO / "docs").glob("*.md")}
    listed = set(re.findall(r":\s*([\w-]+\.md)\s*$", nav, flags=re.M))
    assert pages == listed, (pages - listed, listed - pages)


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    """`mkdocs build --strict` (the `docs` extra): a broken link, a missing page or anchor fails it."""
    pytest.importorskip("material", reason="pip install -e '.[docs]'")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                       cwd=REPO, capture_output=True, text=True, timeout=600, env={"NO_MKDOCS_2_WARNING": "1",
                                                                                   **_env()})
    assert r.returncode == 0, r.stderr[-3000:]
    site = tmp_path / "site"
    for page in ("getting-started", "clusters", "configuration", "performance", "faults"):
        assert (site / page / "index.html").is_file(), page
    assert "the daily loop" in (site / "getting-started" / "index.html").read_text(encoding="utf-8")
    assert (site / "img" / "viewer.png").is_file()


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


@pytest.mark.slow
def test_the_test_commands_select_what_they_say() -> None:
    """README's `pytest -q -m "not slow"` (the daily loop) and `pytest -q` (everything, as CI): collected here,
    not run (running the suite inside itself): the loop leaves out every test that starts a process, and the
    training runs on every family (the costliest tests); everything keeps them."""
    def collect(*args: str) -> set[str]:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", *args], cwd=REPO,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:]
        return {line for line in r.stdout.splitlines() if "::" in line}

    everything, daily = collect(), collect("-m", "not slow")
    assert daily < everything and len(daily) > 100
    for slow in ("tests/test_slurm.py::", "tests/test_readme.py::", "tests/test_packaging.py::test_the_documented",
                 "tests/test_train_families.py::test_family_trains_saves_and_resumes"):
        assert any(t.startswith(slow) for t in everything) and not any(t.startswith(slow) for t in daily), slow
