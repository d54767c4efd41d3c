"""CLIP's text cleanup before tokenizing, as A1111 gets it: the reference CLIP tokenizer's `basic_clean`
(ftfy's `fix_text`, HTML unescaped twice) and `whitespace_clean`. So `an artist’s “beret”`, full-width letters,
ligatures and `&amp;` give the token ids A1111 gives; plain ASCII is unchanged."""

from __future__ import annotations

import html
import re

_SPACES = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """`text` as CLIP's tokenizer sees it after cleanup (ftfy when installed: the `a1111` extra has it)."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # pragma: no cover - without ftfy only the HTML and whitespace steps run
        pass
    text = html.unescape(html.unescape(text))
    return _SPACES.sub(" ", text).strip()
