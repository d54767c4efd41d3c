"""The prompt language: A1111 syntax (weights, BREAK, `<lora:…>` tags; syntax.py), its CLIP conditioning with
75-token chunks (clip.py), and prompt sweeps as text: variants, wildcards, prompts files, Prompt S/R (expand.py).

It sits below `common/` and above `config/`: pure text except clip.py, which works on the tokenizer and text
encoder objects it is given (it loads nothing)."""

from .expand import MODES, expand_prompts, parse_sr, read_prompts_file, replace_sr
from .syntax import EMPHASIS, SYNTAXES, LoraTag, parse_attention, split_tags, strip_syntax

__all__ = ["EMPHASIS", "MODES", "SYNTAXES", "LoraTag", "expand_prompts", "parse_attention", "parse_sr",
           "read_prompts_file", "replace_sr", "split_tags", "strip_syntax"]
