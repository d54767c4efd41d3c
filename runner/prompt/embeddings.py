"""Textual-inversion words in prompt text: a multi-vector embedding's word becomes one token per vector (loading
the files: runner/models/embeddings.py)."""

from __future__ import annotations

import re
from typing import Any


def expand_tokens(tokenizer: Any, text: str) -> str:
    """`text` with each multi-vector embedding's word written as its tokens (`name name_1 name_2 …`), as diffusers'
    `maybe_convert_prompt` does, so each vector is one token."""
    added = getattr(tokenizer, "added_tokens_encoder", None)
    if not added or not text:
        return text
    for token in [t for t in added if f"{t}_1" in added and t in text]:
        n = 1
        while f"{token}_{n}" in added:
            n += 1
        text = re.sub(rf"(?<![\w]){re.escape(token)}(?![\w])",
                      " ".join([token, *(f"{token}_{i}" for i in range(1, n))]), text)
    return text
