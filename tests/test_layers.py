"""The one-way flow of docs/architecture.md: a package imports only from the packages above it."""

from __future__ import annotations

import ast
from pathlib import Path

RUNNER = Path(__file__).resolve().parent.parent / "runner"
ORDER = ["__init__", "common", "prompt", "config", "plan", "models", "lora", "generate", "outputs", "reproduce", "eval",
         "run", "entry", "launcher", "server", "train", "cli", "eval_cli",
         "__main__"]  # the last ones are shells over run()
EXCEPTIONS = {("models/tiny.py", "lora")}  # a fixture: the tiny model writes its example kohya LoRA with lora/kohya


def imports(path: Path) -> set[str]:
    """The runner packages/modules a file imports (relative imports leaving its own package)."""
    depth = len(path.relative_to(RUNNER).parts) - 1
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level and node.module and node.level == depth + 1:
            out.add(node.module.split(".")[0])
    return out


def test_every_package_imports_only_from_those_above_it() -> None:
    wrong = []
    for path in sorted(RUNNER.rglob("*.py")):
        rel = path.relative_to(RUNNER)
        own = rel.parts[0].removesuffix(".py")
        assert own in ORDER, f"{rel}: add its package to ORDER (and to docs/architecture.md)"
        for target in imports(path):
            if target != own and ORDER.index(target) > ORDER.index(own) and (rel.as_posix(), target) not in EXCEPTIONS:
                wrong.append(f"{rel} imports {target}")
    assert not wrong, wrong
