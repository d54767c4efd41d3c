"""Every shell command of README.md and docs/*.md runs as written, and does what its text says (so the docs cannot
drift from the code). The harness finds the commands itself: each line of every ```bash block of every page (a page
added under docs/ is picked up), continuation lines joined, `a && b` run in turn, identical commands run once.

A block that cannot run offline, or that another test runs, says so in an HTML comment just before it:
`<!-- docs-test: skip - REASON -->` or `<!-- docs-test: covered-by tests/test_x.py::test_y -->` (the named test must
exist). The outcome a command's `# comment` states is checked: `# 6 images` (that many made), `# 2 grids`,
`identical` (from_image). Placeholders a reader replaces are replaced the same way here: `/path/to/loras` (the tiny
model's LoRA folder), `./my_images` (a folder of images written here), `/path/to/wildcards` and `./prompts.txt`
(written here too), `DATE/TIME` (the run folder the training command made).

Commands run in-process through their entry points (tests/conftest.py run_program) in one folder per page, a
command that sets environment variables in a fresh process, `t2i-serve` as a server that must answer.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import PROGRAMS, run_program
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
MARK = re.compile(r"<!--\s*docs-test:\s*(skip|covered-by)\b\s*[-:]?\s*(.*?)\s*-->")
pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Command:
    page: str  # README.md or docs/NAME.md
    line: int  # where its block starts
    text: str  # the line as written (continuations joined)
    argv: tuple[str, ...]  # split as a shell splits it, comment removed
    comment: str  # the text after ` # `: the outcome it states
    mark: str | None  # skip | covered-by (the block's HTML comment)
    reason: str  # the mark's reason or test


def doc_pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def _comment(line: str) -> str:
    """The shell comment of a line (a `#` outside quotes after a blank), without the `#`."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[i + 1:].strip()
    return ""


def doc_commands() -> list[Command]:
    """Every command line of every page, in page order."""
    out = []
    for page in doc_pages():
        text = page.read_text(encoding="utf-8")
        for block in re.finditer(r"```bash\n(.*?)```", text, flags=re.S):
            before = text[:block.start()].rstrip().splitlines()
            mark = MARK.fullmatch(before[-1].strip()) if before else None
            for line in block.group(1).replace("\\\n", " ").splitlines():
                argv = shlex.split(line, comments=True)
                if argv:
                    out.append(Command(str(page.relative_to(REPO)), text[:block.start()].count("\n") + 1,
                                       " ".join(line.split()), tuple(argv), _comment(line),
                                       mark.group(1) if mark else None, mark.group(2) if mark else ""))
    return out


def readme_commands() -> list[list[str]]:
    """The documented `t2i … model=tiny …` commands that run here (tests of single sections pick theirs)."""
    out: list[list[str]] = []
    for c in doc_commands():
        argv = [Path(c.argv[0]).name, *c.argv[1:]]
        if c.mark is None and argv[0] == "t2i" and "model=tiny" in argv and argv not in out:
            out.append(argv)
    return out


def env_of(argv: list[str] | tuple[str, ...]) -> dict[str, str]:
    """The `VAR=value` assignments a command line starts with."""
    env = {}
    for arg in argv:
        if not re.match(r"^[A-Z_][A-Z0-9_]*=", arg):
            break
        key, _, value = arg.partition("=")
        env[key] = value
    return env


def _parts(argv: tuple[str, ...]) -> list[list[str]]:
    """`a && b` as [a, b]."""
    parts: list[list[str]] = [[]]
    for a in argv:
        if a == "&&":
            parts.append([])
        else:
            parts[-1].append(a)
    return [p for p in parts if p]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(argv: list[str], cwd: Path, env: dict) -> None:
    port = _free_port()
    # a server started with API keys (from T2I_API_KEY, as the docs show) answers only with one
    key = env.get("T2I_API_KEY") if any(a.startswith("server.api_keys=") for a in argv) else None
    health = urllib.request.Request(f"http://127.0.0.1:{port}/api/health",
                                    headers={"Authorization": f"Bearer {key}"} if key else {})
    proc = subprocess.Popen([sys.executable, "-m", PROGRAMS["t2i-serve"][0], *argv[1:], "--port", str(port)],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(1200):
            if proc.poll() is not None:
                pytest.fail(f"{shlex.join(argv)} exited {proc.returncode}: {proc.stdout.read()}")
            try:
                with urllib.request.urlopen(health, timeout=2) as resp:
                    assert resp.status == 200
                    return
            except OSError:
                time.sleep(0.25)
        pytest.fail(f"{shlex.join(argv)} did not answer on port {port}")
    finally:
        proc.terminate()
        proc.wait(30)


def _workspace(ws: Path) -> None:
    """What the docs' placeholders name: a folder of images, a wildcard folder, a prompts file."""
    images = ws / "my_images"
    images.mkdir()
    for i, color in enumerate(("red", "blue")):
        Image.new("RGB", (64, 64), color).save(images / f"{i}.png")
    (ws / "wildcards").mkdir()
    (ws / "wildcards" / "colors.txt").write_text("red\ngreen\nblue\n", encoding="utf-8")
    (ws / "prompts.txt").write_text("# foxes\na red fox\na (blue:1.2) lighthouse\n", encoding="utf-8")
    for name in ("outputs", "multirun"):  # where t2i writes: the reader has run it before
        (ws / name).mkdir()


def _fill(args: list[str], ws: Path, tiny_dir: Path) -> list[str]:
    out = [a.replace("/path/to/loras", str(tiny_dir / "loras")).replace("/path/to/wildcards", str(ws / "wildcards"))
           for a in args]
    runs = sorted((ws / "outputs" / "train").glob("*/*"))
    if runs:
        out = [a.replace("outputs/train/DATE/TIME", str(runs[-1].relative_to(ws))) for a in out]
    return out


def _check_outcome(c: Command, args: list[str], r: subprocess.CompletedProcess, ws: Path) -> None:
    """What the command's comment says happens."""
    said = c.comment
    prog = args[0]
    if prog == "t2i" and "--cfg" not in args:
        made = sum(int(n) for n in re.findall(r"(\d+) images generated", r.stdout))
        assert "generated" in r.stdout, r.stdout[-2000:]
        if m := re.search(r"(\d+) images?\b", said):
            assert made == int(m.group(1)), f"{c.text}: {made} images made, the text says {m.group(1)}"
        if m := re.search(r"(\d+) grids?\b", said):
            run_dir = Path(re.findall(r"-> (\S+)", r.stdout)[-1])
            grids = list((ws / run_dir if not run_dir.is_absolute() else run_dir).glob("grids/*.png"))
            assert len(grids) == int(m.group(1)), (c.text, grids)
        if "identical" in said:
            assert "identical" in r.stdout, r.stdout[-2000:]
    elif prog == "t2i" and "--cfg" in args:
        assert "prompts:" in r.stdout and "model:" in r.stdout, r.stdout[-2000:]  # the composed config
    elif prog == "t2i-inspect" and "--json" in args:
        assert json.loads(r.stdout)
    elif prog == "t2i-inspect":
        assert "Steps" in r.stdout or "steps" in r.stdout, r.stdout[-2000:]
    elif prog == "t2i-train":
        assert "t2i-train:" in r.stdout and list((ws / "outputs" / "train").glob("*/*/my-images.safetensors"))
    elif prog == "t2i-tiny":
        assert (ws / args[1] / "model_index.json").is_file()


def run_command(c: Command, ws: Path, tiny_dir: Path) -> None:
    for part in _parts(c.argv):
        env = env_of(part)
        argv = [Path(part[len(env)]).name, *part[len(env) + 1:]]  # `.venv/bin/t2i` is `t2i`
        if argv[:3] == ["python", "-m", "runner"]:
            argv = ["t2i", *argv[3:]]
        args = _fill(argv, ws, tiny_dir)
        if args[0] == "t2i-serve":
            _serve(args, ws, {**os.environ, "PYTHONPATH": str(REPO), **env})
            continue
        assert args[0] in PROGRAMS, f"{c.page}:{c.line}: no way to run {c.text!r} here: mark its block"
        r = run_program(args[0], *args[1:], cwd=ws, env=env or None, timeout=900)
        assert r.returncode == 0, f"{c.page}:{c.line}: {c.text}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        _check_outcome(c, args, r, ws)


def test_every_command_is_run_or_marked_with_a_reason() -> None:
    commands = doc_commands()
    assert len(commands) > 40
    for c in commands:
        if c.mark == "skip":
            assert len(c.reason) > 10, f"{c.page}:{c.line}: a skipped block needs its reason"
        elif c.mark == "covered-by":
            path, _, name = c.reason.partition("::")
            assert re.search(rf"^def {name}\(", (REPO / path).read_text(), flags=re.M), f"{c.page}: {c.reason}?"
        else:
            for part in _parts(c.argv):
                prog = Path(part[len(env_of(part))]).name
                assert prog in PROGRAMS or part[:3] == ["python", "-m", "runner"], f"{c.page}:{c.line}: {c.text}"


PAGES = sorted({c.page for c in doc_commands() if c.mark is None})


@pytest.mark.parametrize("page", PAGES)
def test_every_command_of_the_page_runs_as_written(page: str, tmp_path: Path, tiny_dir: Path) -> None:
    _workspace(tmp_path)
    order = [str(p.relative_to(REPO)) for p in doc_pages()]
    done: set[tuple[str, ...]] = set()
    for c in doc_commands():
        if c.mark is not None or c.argv in done:
            continue
        if order.index(c.page) > order.index(page):
            break
        done.add(c.argv)
        if c.page != page:  # a command an earlier page has too is run there only
            continue
        start = time.monotonic()
        run_command(c, tmp_path, tiny_dir)
        time.sleep(max(0.0, 1.05 - (time.monotonic() - start)))  # Hydra names run dirs by the second


def test_the_viewer_commands_open_pages_that_exist(tmp_path: Path) -> None:
    """docs/viewer.md's `xdg-open` lines: the pages they open exist after a run, a multirun and a merge (dates
    filled in)."""
    block = [c for c in doc_commands() if c.page == "docs/viewer.md" and c.mark == "covered-by"]
    assert len(block) == 3
    tiny = ["model=tiny", "steps=1", "width=32", "height=32", "prompts=[a red fox]"]
    assert run_program("t2i", *tiny, cwd=tmp_path).returncode == 0
    assert run_program("t2i", "-m", *tiny, "seeds=[1],[2]", cwd=tmp_path).returncode == 0
    r = run_program("t2i", "-m", *tiny, "seeds=[1,2,3]", "shard.index=0,1", "shard.count=2",
                    "hydra.sweep.dir=multirun/foxes", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for c in block:
        for part in _parts(c.argv):
            if part[0] == "t2i-merge":
                assert run_program("t2i-merge", *part[1:], cwd=tmp_path).returncode == 0
                assert len((tmp_path / "multirun" / "foxes" / "manifest.jsonl").read_text().splitlines()) == 3
                continue
            assert part[0] == "xdg-open"
            pattern = re.sub(r"\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d", "*/*", part[1])
            assert list(tmp_path.glob(pattern)), f"{c.text}: nothing at {pattern}"
