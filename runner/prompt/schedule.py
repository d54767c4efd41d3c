"""A1111's prompt editing `[from:to:when]`, alternation `[a|b]` and composable prompts `a AND b:0.5` as text.

A prompt becomes a *schedule*: (end step, text) pairs, each text conditioning the sampling steps up to its end step
(A1111's `get_learned_conditioning_prompt_schedules`, modules/prompt_parser.py, v1.10, including its hires-fix
offsets). The grammar is A1111's, parsed by the same library (lark, Earley), so an ambiguous or malformed prompt
reads as it reads there: a prompt the grammar rejects is one text for every step. `split_and` is A1111's
`get_multicond_prompt_list` for one prompt. tests/test_prompt_schedule.py holds vectors computed by A1111's code.

A step here is a denoiser call counted from 0, as A1111's CFGDenoiser counts them: call `i` uses the first text
whose end step is >= i. Second-order samplers call the denoiser twice a step, and A1111 schedules over twice the
steps for them (`total_steps`); `schedule_steps` gives that count.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

# A1111's grammar (its rule names and order: lark's Earley parser resolves ambiguities by them)
_GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""

# A1111 samplers that call the model twice a step; A1111 schedules their prompts over twice the steps
SECOND_ORDER = frozenset({"Heun", "DPM2", "DPM2 a", "DPM++ SDE", "DPM++ 2S a"})

_AND = re.compile(r"\bAND\b")
_SUB_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")
_MARKERS = re.compile(r"[\[\]|:]")  # a prompt without these has no schedule (skip the parser)


@functools.lru_cache(maxsize=1)
def _parser() -> Any:
    import lark

    return lark.Lark(_GRAMMAR)


@dataclass(frozen=True)
class _Edit:
    """A `[from:to:when]` node: `when` resolved to a step."""

    before: Any
    after: Any
    when: int


def _when(token: str, steps: int, base_steps: int | None, old: bool) -> int:
    """The step a `when` number means: a fraction of the steps when written with a dot, else a step number. In a
    hires pass (`base_steps` given) the first pass counts as 1.0 or as its steps; A1111's old scheduling reads any
    number below 1 as a fraction and ignores the hires pass."""
    v = float(token)
    if old:
        v = v * steps if v < 1 else v
    elif "." in token:
        v = (v - (0.0 if base_steps is None else 1.0)) * steps
    else:
        v = v - (base_steps or 0)
    return min(steps, int(v))


def _resolve(tree: Any, steps: int, base_steps: int | None, old: bool, ends: set[int]) -> Any:
    """The parse tree as nested tuples with each edit's step resolved; collects the steps where texts change."""
    import lark

    if isinstance(tree, lark.Token) or tree is None:
        return tree
    kids = [_resolve(c, steps, base_steps, old, ends) for c in tree.children]
    if tree.data == "scheduled":
        when = _when(str(tree.children[-2]), steps, base_steps, old)
        if when >= 1:
            ends.add(when)
        return _Edit(kids[0], kids[1], when)
    if tree.data == "alternate":
        ends.update(range(1, steps + 1))
        return ("|", kids)
    return kids


def _text(node: Any, step: int) -> str:
    """The text a resolved tree gives at `step` (1-based, A1111's schedule steps)."""
    if node is None:
        return ""
    if isinstance(node, str):  # lark tokens are str
        return str(node)
    if isinstance(node, _Edit):
        return _text(node.before, step) if step <= node.when else _text(node.after, step)
    if isinstance(node, tuple):  # alternation: an empty option is empty text
        options = node[1]
        return _text(options[(step - 1) % len(options)], step)
    return "".join(_text(c, step) for c in node)


def prompt_schedule(prompt: str, steps: int, hires_steps: int | None = None,
                    old_scheduling: bool = False) -> list[tuple[int, str]]:
    """[(end step, text)] of `prompt` over `steps` (A1111's `get_learned_conditioning_prompt_schedules`).

    With `hires_steps`, the schedule of a hires pass: `when` numbers past 1.0 (or past `steps`) fall in it.

    >>> prompt_schedule("a [b:c:0.5] d", 10)
    [(5, 'a b d'), (10, 'a c d')]
    """
    base = steps if hires_steps is not None and not old_scheduling else None
    total = hires_steps if base is not None else steps
    if not _MARKERS.search(prompt):
        return [(total, prompt)]
    import lark

    try:
        tree = _parser().parse(prompt)
    except lark.exceptions.LarkError:
        return [(total, prompt)]
    ends = {total}
    resolved = _resolve(tree, total, base, old_scheduling, ends)
    return [(end, _text(resolved, end)) for end in sorted(ends)]


def at_step(schedule: list[tuple[int, str]], step: int) -> int:
    """Index of the schedule entry that conditions denoiser call `step` (0-based; A1111's reconstruct_cond_batch)."""
    for i, (end, _) in enumerate(schedule):
        if step <= end:
            return i
    return 0


def split_and(prompt: str) -> list[tuple[str, float]]:
    """The sub-prompts of a composable prompt with their weights (`a AND b:0.5`; A1111 reads a trailing `:number`
    of every prompt as its weight, with or without AND)."""
    out = []
    for sub in _AND.split(prompt):
        m = _SUB_WEIGHT.search(sub)
        text, weight = m.groups() if m is not None else (sub, None)
        out.append((text, float(weight) if weight is not None else 1.0))
    return out


def schedule_steps(steps: int, sampler: str | None) -> int:
    """The steps A1111 schedules prompts over: twice `steps` for second-order samplers (A1111's label)."""
    return steps * 2 if sampler in SECOND_ORDER else steps


def is_plain(prompt: str, negative: bool = False) -> bool:
    """Whether the prompt means the same text at every step with weight 1 (nothing here changes it)."""
    if not negative:
        subs = split_and(prompt)
        if len(subs) != 1 or subs[0] != (prompt, 1.0):
            return False
    return len(prompt_schedule(prompt, 2)) == 1 and prompt_schedule(prompt, 2)[0][1] == prompt
