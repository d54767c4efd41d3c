"""A1111's prompt syntax as text: emphasis `(a:1.2)` `(a)` `[a]`, escapes, `BREAK`, and `<lora:name:w>` tags.

`parse_attention` is A1111's `parse_prompt_attention` (modules/prompt_parser.py, v1.10) rule for rule, so a prompt
copied from A1111 or Civitai gets the same weights; the checks in `check_prompt` add what A1111 leaves to chance (a
weight that is not a number is an error here, an unbalanced bracket a warning).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

from ..common.errors import ConfigError

log = logging.getLogger(__name__)

SYNTAXES = ("a1111", "plain")
# A1111's "Emphasis mode" setting (config key `emphasis` -> the name A1111 writes as `Emphasis:`): Original scales
# and restores the mean; No norm scales only; Ignore parses the brackets but applies no weights; None reads the
# brackets as text (no parsing, so no BREAK either).
EMPHASIS = {"original": "Original", "no_norm": "No norm", "ignore": "Ignore", "none": "None"}
EMPHASIS_BY_LABEL = {label: key for key, label in EMPHASIS.items()}  # A1111's names (infotext, API) -> ours

# A1111's tokens, in its order: escapes, brackets, `:weight)`, plain text, a lone colon
_ATTENTION = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
BREAK = ("BREAK", -1.0)  # A1111's marker in the parsed list: start a new 75-token chunk

# A1111's extra networks (`<lora:name:1>`, `<hypernet:…>`); only LoRA tags are applied here
_EXTRA_NET = re.compile(r"<(\w+):([^>]+)>")
_WEIGHTED = re.compile(r"\([^()\[\]:]*:\s*([^()\[\]:]*?)\s*\)")  # `(text:weight)`, weight as written


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Text runs with their weights; `BREAK` appears as ("BREAK", -1). A1111's `parse_prompt_attention`.

    >>> parse_attention('an (important) word')
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in _ATTENTION.finditer(text):
        part, weight = m.group(0), m.group(1)
        if part.startswith("\\"):
            res.append([part[1:], 1.0])
        elif part == "(":
            round_brackets.append(len(res))
        elif part == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), _weight(weight))
        elif part == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif part == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            for i, piece in enumerate(_BREAK.split(part)):
                if i > 0:
                    res.append(list(BREAK))
                res.append([piece, 1.0])
    for pos in round_brackets:  # A1111 closes what is left open
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    i = 0  # merge runs of equal weight (A1111 does; it decides how the runs are tokenized)
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return [(t, w) for t, w in res]


def _weight(text: str) -> float:
    try:
        return float(text)
    except ValueError:  # `(a:1.2.3)`: A1111 crashes here
        raise ConfigError(f"prompt weight {text!r} is not a number; write (text:1.2)") from None


@dataclass(frozen=True)
class LoraTag:
    """`<lora:name:w>` or `<lora:name:w_te:w_unet>` (A1111's order; `te=`/`unet=` by name too)."""

    name: str
    te: float
    unet: float

    @property
    def text(self) -> str:
        return f"<lora:{self.name}:{self.te:g}>" if self.te == self.unet else \
            f"<lora:{self.name}:{self.te:g}:{self.unet:g}>"


LORA_SCALE_RANGE = (-10.0, 10.0)  # a LoRA's scale, as a `<lora:NAME:W>` weight or a `lora_sets` scale


def _tag_number(tag: str, value: str) -> float:
    try:
        weight = float(value)
    except ValueError:
        weight = math.nan
    if math.isnan(weight):
        raise ConfigError(f"{tag}: weight {value!r} is not a number; write <lora:NAME:0.8>")
    lo, hi = LORA_SCALE_RANGE
    if not lo <= weight <= hi:
        raise ConfigError(f"{tag}: weight {value} is out of range; valid: {lo:g} to {hi:g}")
    return weight


def _lora_tag(tag: str, args: str) -> LoraTag:
    positional, named = [], {}
    for item in args.split(":"):
        key, eq, value = item.partition("=")
        if eq:
            named[key.strip()] = value.strip()
        else:
            positional.append(item.strip())
    name = positional[0] if positional else ""
    if not name:
        raise ConfigError(f"{tag} has no LoRA name; write <lora:NAME:0.8>")
    unknown = set(named) - {"te", "unet", "dyn"}
    if unknown:
        raise ConfigError(f"{tag}: unknown argument {sorted(unknown)[0]!r}; valid: te=, unet=")
    if "dyn" in named or len(positional) == 4:  # A1111's 4th positional argument is dyn (extra_networks_lora.py)
        raise ConfigError(f"{tag}: dyn (A1111's dynamic rank: only the first N ranks of the LoRA) is not supported; "
                          "remove it (docs/differences-from-a1111.md)")
    te = _tag_number(tag, named.get("te", positional[1] if len(positional) > 1 else "1"))
    unet = _tag_number(tag, named.get("unet", positional[2] if len(positional) > 2 else str(te)))
    if len(positional) > 3:
        raise ConfigError(f"{tag} has {len(positional) - 1} weights; give <lora:NAME:W> or <lora:NAME:W_TE:W_UNET>")
    return LoraTag(name, te, unet)


def split_tags(text: str) -> tuple[str, tuple[LoraTag, ...]]:
    """The prompt without its extra-network tags (removed as A1111 removes them: the text around stays as is)
    and its LoRA tags. Tags of other kinds (`<hypernet:…>`) are removed with a warning: nothing here applies
    them."""
    tags: list[LoraTag] = []

    def found(m: re.Match) -> str:
        kind, args = m.group(1), m.group(2)
        if kind.lower() in ("lora", "lyco"):
            tags.append(_lora_tag(m.group(0), args))
        else:
            log.warning("prompt tag %s is not applied (only <lora:…> tags are); removed from the prompt",
                        m.group(0))
        return ""

    return _EXTRA_NET.sub(found, text), tuple(tags)


def check_prompt(where: str, text: str) -> list[str]:
    """Errors (raised) and warnings (returned) for one prompt in A1111 syntax, before anything loads."""
    warnings = []
    body, _ = split_tags(text)
    stripped = re.sub(r"\\.", "", body)  # escaped brackets are text
    for m in _WEIGHTED.finditer(stripped):
        if re.fullmatch(r"[+-]?[.\d]+", m.group(1)) is None:
            raise ConfigError(f"{where}: weight {m.group(1)!r} in {m.group(0)!r} is not a number; write (text:1.2), "
                              r"or escape literal brackets as \( \)")
    try:
        parse_attention(body)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    depth = {"(": 0, "[": 0}
    unmatched = []
    for ch in stripped:
        opener = {")": "(", "]": "["}.get(ch)
        if ch in depth:
            depth[ch] += 1
        elif opener and depth[opener]:
            depth[opener] -= 1
        elif opener:
            unmatched.append(ch)
    if depth["("] or depth["["] or unmatched:
        what = ", ".join([f"{n} unclosed {b!r}" for b, n in depth.items() if n] + [f"stray {c!r}" for c in unmatched])
        warnings.append(f"{where} has unbalanced brackets ({what}); read as A1111 does: an unclosed bracket "
                        "weighs the rest of the prompt, a stray closing one is text")
    return warnings


def strip_syntax(text: str) -> str:
    """The words of a prompt without weights, BREAKs and tags (for text encoders the syntax does not apply to)."""
    body, _ = split_tags(text)
    return "".join(" " if w == BREAK[1] and t == BREAK[0] else t for t, w in parse_attention(body))


def has_syntax(text: str) -> bool:
    """Whether A1111 parsing changes anything about `text` (weights, escapes, BREAK, tags)."""
    body, tags = split_tags(text)
    return bool(tags) or body != text or parse_attention(body) != [(body, 1.0)]
