"""Packaging: the version is written once (runner/__init__.py; pyproject.toml reads it; CHANGELOG.md has its
entry); README's install line works as written in a fresh venv, and `python -m build` makes a wheel and an sdist that
install there with the documented extras and run the quick start from another folder."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parent.parent


def test_the_version_is_written_once() -> None:
    import runner

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "runner.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", runner.__version__)
    first = re.search(r"^## (\S+)", (REPO / "CHANGELOG.md").read_text(), flags=re.M).group(1)
    assert first == runner.__version__, "CHANGELOG.md's first entry is not this version"


def _sh(command: str, cwd: Path, timeout: float = 1200) -> str:
    r = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{command}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.mark.slow
def test_the_documented_editable_install_runs_the_quick_start(tmp_path: Path) -> None:
    """1. README's install line, as written, in a copy of this checkout (a fresh venv; packages come from the
    registry or pip's cache); 2. the quick start in it; 3. `python -m build`; the wheel, then the sdist, installed in
    place of the editable install with the documented extras, the quick start run from another folder each time."""
    from test_readme import doc_commands

    from runner import __version__

    readme = [c for c in doc_commands() if c.page == "README.md"]
    install = next(c.text for c in readme if "pip install -e" in c.text)
    quick = next(c.text for c in readme if c.argv[0] == ".venv/bin/t2i")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    src = tmp_path / "t2i-runner"
    for name in files:
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((REPO / name).read_bytes())
    # The venv the install line makes sees this test's installed packages (a .pth file), so pip finds torch and the
    # extras already satisfied and installs only the project: the line and the packaging are what is tested here,
    # not the registry (a from-scratch install of everything is `.ci/run` itself, and took 18 min on a shared box).
    import sys

    subprocess.run(["python3", "-m", "venv", str(src / ".venv")], check=True)
    (pth,) = (src / ".venv" / "lib").glob("python3*/site-packages")
    seen = [p for p in sys.path if p.endswith("site-packages")]  # this venv's, and any it sees through a .pth
    (pth / "zz_test_site_packages.pth").write_text("\n".join(seen) + "\n")
    _sh(install, src)
    assert "6 images generated" in _sh(quick, src)

    _sh(".venv/bin/python -m build --outdir dist", src)
    wheel = src / "dist" / f"t2i_runner-{__version__}-py3-none-any.whl"
    sdist = src / "dist" / f"t2i_runner-{__version__}.tar.gz"
    assert wheel.is_file() and sdist.is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for dist in (wheel, sdist):
        _sh(f".venv/bin/pip uninstall -q -y t2i-runner && .venv/bin/pip install -q '{dist}[server,slurm]'", src)
        where = _sh(f"{src}/.venv/bin/python -c 'import runner, runner.config.overrides as o; "
                    "print(runner.__file__, o.CONF_DIR)'", elsewhere)
        assert "site-packages/runner" in where and f"{src}/runner" not in where, where
        out = _sh(f"{src}/" + quick.removeprefix("./"), elsewhere)
        assert "6 images generated" in out, out
        assert _sh(f"{src}/.venv/bin/pip show t2i-runner", elsewhere).count(f"Version: {__version__}") == 1
