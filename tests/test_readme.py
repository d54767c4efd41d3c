"""Every `model=tiny` command of the README runs as written (so the README cannot drift from the code).

Placeholders a reader replaces are replaced the same way here: `/path/to/loras` (the tiny model's LoRA folder),
`./my_images` (a folder of images this test writes), `/path/to/wildcards` and `./prompts.txt` (written here too),
`DATE/TIME` (the run folder the training command made).
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import run_program
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
PROGRAMS = {"t2i": ["-m", "runner"], "t2i-train": ["-m", "runner.train"], "t2i-serve": ["-m", "runner.server.app"]}
pytestmark = pytest.mark.slow


def readme_commands() -> list[list[str]]:
    """The README's shell commands that use the tiny model, in order, each split like a shell would."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    # the LoRA-format commands need LyCORIS files: tests/test_lora_zoo.py::test_readme_lora_examples_run writes
    # them and runs that section's commands
    text = text[:text.index("#### LoRA file formats")] + text[text.index("#### Hashes"):]
    out: list[list[str]] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv and "model=tiny" in argv:
                n = len(env_of(argv))  # `VAR=value t2i-serve …`: the program follows the assignments
                argv[n] = Path(argv[n]).name  # `.venv/bin/t2i` is `t2i`
                if argv not in out:
                    out.append(argv)
    return out


def env_of(argv: list[str]) -> dict[str, str]:
    """The `VAR=value` assignments a command line starts with."""
    env = {}
    for arg in argv:
        if not re.match(r"^[A-Z_][A-Z0-9_]*=", arg):
            break
        key, _, value = arg.partition("=")
        env[key] = value
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(argv: list[str], cwd: Path, env: dict) -> None:
    port = _free_port()
    # a server started with API keys (from T2I_API_KEY, as the README shows) answers only with one
    key = env.get("T2I_API_KEY") if any(a.startswith("server.api_keys=") for a in argv) else None
    health = urllib.request.Request(f"http://127.0.0.1:{port}/api/health",
                                    headers={"Authorization": f"Bearer {key}"} if key else {})
    proc = subprocess.Popen([sys.executable, *PROGRAMS["t2i-serve"], *argv[1:], "--port", str(port)], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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


def test_readme_lists_tiny_commands_of_every_program() -> None:
    progs = {argv[len(env_of(argv))] for argv in readme_commands()}
    assert progs == set(PROGRAMS), progs  # a command of another program would need a way to run it here


def test_every_readme_tiny_command_runs(tmp_path: Path, tiny_dir: Path) -> None:
    images = tmp_path / "my_images"
    images.mkdir()
    for i, color in enumerate(("red", "blue")):
        Image.new("RGB", (64, 64), color).save(images / f"{i}.png")
    (tmp_path / "wildcards").mkdir()  # the prompt-language examples' wildcard folder and prompts file
    (tmp_path / "wildcards" / "colors.txt").write_text("red\ngreen\nblue\n", encoding="utf-8")
    (tmp_path / "prompts.txt").write_text("# foxes\na red fox\na (blue:1.2) lighthouse\n", encoding="utf-8")
    for line in readme_commands():
        argv = line[len(env_of(line)):]
        env = {**os.environ, "PYTHONPATH": str(REPO), **env_of(line)}
        args = [a.replace("/path/to/loras", str(tiny_dir / "loras"))
                .replace("/path/to/wildcards", str(tmp_path / "wildcards")) for a in argv]
        runs = sorted((tmp_path / "outputs" / "train").glob("*/*"))
        if runs:
            args = [a.replace("outputs/train/DATE/TIME", str(runs[-1].relative_to(tmp_path))) for a in args]
        if args[0] == "t2i-serve":
            _serve(args, tmp_path, env)
            continue
        # the first command (the quick start) in a fresh interpreter, as a reader runs it; the others through the
        # same entry points in this process (a fresh one too where the command sets environment variables)
        first = line == readme_commands()[0]
        r = run_program(args[0], *args[1:], cwd=tmp_path, env=env_of(line) or None, isolated=first, timeout=900)
        assert r.returncode == 0, f"{shlex.join(argv)}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        assert "generated" in r.stdout or "t2i-train:" in r.stdout, r.stdout
        time.sleep(1.1)  # Hydra names run dirs by the second: the next command gets its own
