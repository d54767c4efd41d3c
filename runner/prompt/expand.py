"""Prompt sweeps as text: variants and wildcards (the `dynamicprompts` library), prompts files, Prompt S/R.

`{red|blue} fox` → `red fox`, `blue fox`; `{2$$a|b|c}` picks two; `__colors__` takes each line of `colors.txt` in a
wildcard folder. `combinatorial` (a sweep's default) makes every expansion a prompt; `random` draws `prompt_count`
of them from `prompt_seed` (the same seed, the same prompts). A template without `{` or `__` is left as written.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from ..common.errors import ConfigError, did_you_mean, first_line

log = logging.getLogger(__name__)

MODES = ("combinatorial", "random")
_WILDCARD = re.compile(r"__([^_\s{}|][^\s{}|]*?)__")


def read_prompts_file(path: str) -> list[str]:
    """One prompt per line (UTF-8); `#` starts a comment line, blank lines are skipped."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8-sig")  # a BOM (Notepad) is no part of the first prompt
    except FileNotFoundError:
        raise ConfigError(f"prompts_file={path!r} does not exist; give a UTF-8 text file, one prompt a line") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"prompts_file={path!r} is not UTF-8 text ({first_line(exc, 80)})") from None
    except OSError as exc:
        raise ConfigError(f"prompts_file={path!r} cannot be read ({first_line(exc, 80)})") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ConfigError(f"prompts_file={path!r} holds no prompt (only blank or # lines)")
    return prompts


# `\{` `\}` `\|` are literal text, not variant syntax (the error message advises them); dynamicprompts has no
# escapes, so they pass it as private-use characters and come back escaped: the prompt re-runs the same (the
# record's prompt expands to itself) and A1111's parser turns `\{` into `{` for the text encoder (prompt/syntax.py)
_ESCAPES = {"\\{": "\ue000", "\\}": "\ue001", "\\|": "\ue002"}


def _protect(text: str) -> str:
    for escape, mark in _ESCAPES.items():
        text = text.replace(escape, mark)
    return text


def _restore(text: str) -> str:
    for escape, mark in _ESCAPES.items():
        text = text.replace(mark, escape)
    return text


def is_template(text: str) -> bool:
    """Whether `text` has variants or wildcards for dynamicprompts to expand (escaped braces are text)."""
    return "{" in _protect(text) or _WILDCARD.search(text) is not None


def _manager(wildcard_dirs: Sequence[str]):
    from dynamicprompts.wildcards import WildcardManager

    if not wildcard_dirs:
        return WildcardManager()
    return WildcardManager(root_map={"": [Path(d).expanduser() for d in wildcard_dirs]})


def _check_wildcards(where: str, text: str, manager, wildcard_dirs: Sequence[str]) -> None:
    for m in _WILDCARD.finditer(text):
        name = m.group(1)
        if ".." in name or name.startswith(("/", "~")) or "\\" in name:  # (dynamicprompts logs tracebacks)
            raise ConfigError(f"{where}: wildcard __{name}__ leaves wildcard_dirs; name a file inside them, e.g. "
                              "__colors__ or __sub/colors__ for sub/colors.txt")
        if "*" in name or manager.get_values(name):
            continue
        if not wildcard_dirs:
            raise ConfigError(f"{where} uses wildcard __{name}__ but no wildcard_dirs are set; give "
                              f"wildcard_dirs=[FOLDER] holding {name}.txt")
        known = list(manager.get_collection_names())
        listing = ", ".join(sorted(known)[:12]) or "none"
        raise ConfigError(f"{where}: wildcard file __{name}__ ({name}.txt) is not in wildcard_dirs "
                          f"({', '.join(wildcard_dirs)}){did_you_mean(name, known)}; found: {listing}")


def expand_template(where: str, text: str, mode: str, count: int, seed: int, wildcard_dirs: Sequence[str],
                    limit: int) -> list[str]:
    """The prompts a template stands for, at most `limit` (more is an error: `{a|b}` × 20 is a million)."""
    if not is_template(text):
        return [text]
    from dynamicprompts.generators import CombinatorialPromptGenerator, RandomPromptGenerator

    manager = _manager(wildcard_dirs)
    _check_wildcards(where, text, manager, wildcard_dirs)
    written, text = text, _protect(text)
    try:
        if mode == "random":
            out = RandomPromptGenerator(manager, seed=seed).generate(text, count)
        else:
            out = CombinatorialPromptGenerator(manager).generate(text, max_prompts=limit + 1)
    except Exception as exc:  # noqa: BLE001 - pyparsing and dynamicprompts raise many kinds
        raise ConfigError(f"{where}={written!r} is not a valid variant/wildcard template ({first_line(exc, 120)}); "
                          r"write {a|b}, {2$$a|b|c}, __name__, or escape a brace as \{") from None
    if len(out) > limit:
        raise ConfigError(f"{where}={written!r} expands to more than max_prompts={limit} prompts; raise max_prompts, "
                          "or use prompt_mode=random with prompt_count=N")
    return [_restore(str(p)) for p in out]


def parse_sr(value: object) -> tuple[str, ...]:
    """`prompt_sr`: A1111's Prompt S/R values (the first is the search term and the first value), e.g.
    `[red, blue, green]` or A1111's text `red, blue, green`; also a list holding one such list."""
    if value is None or value == []:
        return ()
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list | str):
        value = value[0]
    if isinstance(value, str):
        import csv

        value = [v.strip() for v in next(csv.reader([value], skipinitialspace=True))]  # A1111 reads it as CSV
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"prompt_sr={value!r} is not valid; give [SEARCH, REPLACEMENT, ...] (strings)")
    if len(value) < 2 or not value[0]:
        raise ConfigError(f"prompt_sr={value!r} needs a search term and at least one replacement, e.g. "
                          "[red, blue, green]")
    if len(set(value)) != len(value):
        raise ConfigError(f"prompt_sr={value!r} lists a value twice; give each once")
    return tuple(value)


def check_sr(sr: Sequence[str], texts: Sequence[str]) -> None:
    """A search term found in no prompt and no negative prompt is a mistake (A1111 stops with an error too)."""
    if sr and not any(sr[0] in t for t in texts):
        raise ConfigError(f"prompt_sr search term {sr[0]!r} is in no prompt or negative prompt; Prompt S/R replaces "
                          "the first value where it appears in the prompts")


def replace_sr(text: str, sr: Sequence[str], value: str | None) -> str:
    """A1111's Prompt S/R: every occurrence of the first value replaced by `value`."""
    return text if value is None or not sr else text.replace(sr[0], value)


def expand_prompts(items: Sequence[tuple[str, str]], syntax: str, mode: str, count: int, seed: int,
                   wildcard_dirs: Sequence[str], limit: int) -> list[tuple[str, str, str]]:
    """(prompt, negative, template) for every prompt of the run: templates expanded, A1111 syntax checked (errors
    raised, warnings logged once), at most `limit` prompts in all."""
    from .syntax import check_prompt

    out: list[tuple[str, str, str]] = []
    seen_pairs: set[tuple[str, str]] = set()
    for i, (template, negative) in enumerate(items):
        for prompt in expand_template(f"prompts[{i}]", template, mode, count, seed, wildcard_dirs, limit):
            if (prompt, negative) in seen_pairs:  # a random draw that repeats one is the same images: made once
                log.info("prompts[%d]: %r drawn again; kept once", i, prompt)
                continue
            seen_pairs.add((prompt, negative))
            out.append((prompt, negative, template))
        if len(out) > limit:
            raise ConfigError(f"the prompts expand to more than max_prompts={limit} prompts (at prompts[{i}]); raise "
                              "max_prompts, or use prompt_mode=random with prompt_count=N")
    if syntax == "a1111":
        seen: set[str] = set()
        for i, (prompt, negative, _) in enumerate(out):
            for where, text in ((f"prompts[{i}]", prompt), (f"prompts[{i}].negative_prompt", negative)):
                if text in seen:
                    continue
                seen.add(text)
                for warning in check_prompt(where, text):
                    log.warning("%s", warning)
    return out
