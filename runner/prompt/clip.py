"""A1111's CLIP conditioning for weighted, long prompts (modules/sd_hijack_clip.py, modules/sd_emphasis.py).

A prompt is cut into chunks of 75 tokens (a `BREAK` or a full chunk starts the next; a comma in the last 20 tokens
moves the words after it into the next chunk), each chunk is encoded on its own as `<start> 75 tokens <end>`, its
token embeddings are scaled by their weights and the chunk's mean is restored ("Original" emphasis; syntax.EMPHASIS
lists A1111's other modes); the chunks are concatenated. The pooled embedding (SDXL) is the first chunk's. Weight
1.0 everywhere gives the embedding diffusers computes for a prompt of up to 75 tokens, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .cleanup import clean_text
from .embeddings import expand_tokens
from .syntax import BREAK, parse_attention

CHUNK = 75  # prompt tokens per chunk (77 with start and end)
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
# A1111 restores the chunk's mean by `z * (old_mean / new_mean)`. A text encoder whose output has a mean of ~0
# relative to its magnitude (a LayerNorm with no bias: random or degenerate encoders) makes that ratio float noise
# (1e8 and more: a NaN/black image in A1111). Below this relative size the mean is left as it is (A1111's
# "No norm" for that chunk), with a warning and `emphasis_mean_restored: false` in the image's record.
MEAN_RESTORE_MIN = 1e-4


@dataclass
class Chunk:
    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)


def tokenize_chunks(tokenizer: Any, parsed: list[tuple[str, float]]) -> list[Chunk]:
    """A1111's `tokenize_line`: the prompt's chunks, each 77 token ids with one weight per token."""
    id_start, id_end = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma = tokenizer.get_vocab().get(",</w>")
    # cleaned as CLIP's tokenizer cleans (A1111), then multi-vector embeddings as a token per vector
    texts = [expand_tokens(tokenizer, clean_text(t)) for t, _ in parsed]
    tokenized = tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]
    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1

    def next_chunk() -> None:
        nonlocal chunk, last_comma
        to_add = CHUNK - len(chunk.tokens)
        chunk.tokens = [id_start] + chunk.tokens + [id_end] * max(to_add, 0) + [id_end]
        chunk.multipliers = [1.0] + chunk.multipliers + [1.0] * max(to_add, 0) + [1.0]
        chunks.append(chunk)
        chunk, last_comma = Chunk(), -1

    for tokens, (text, weight) in zip(tokenized, parsed, strict=True):
        if (text, weight) == BREAK:
            next_chunk()
            continue
        for token in tokens:
            if token == comma:
                last_comma = len(chunk.tokens)
            elif len(chunk.tokens) == CHUNK and last_comma != -1 and len(chunk.tokens) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1  # the words after the comma move to the next chunk
                moved = Chunk(chunk.tokens[cut:], chunk.multipliers[cut:])
                chunk.tokens, chunk.multipliers = chunk.tokens[:cut], chunk.multipliers[:cut]
                next_chunk()
                chunk = moved
            if len(chunk.tokens) == CHUNK:
                next_chunk()
            chunk.tokens.append(token)
            chunk.multipliers.append(weight)
    if chunk.tokens or not chunks:
        next_chunk()
    return chunks


@dataclass(frozen=True)
class Encoder:
    """One CLIP text encoder as a pipeline uses it: which layer it reads and whether it gives the pooled vector."""

    tokenizer: Any
    text_encoder: Any
    hidden_layer: int | None  # None = last_hidden_state; k = hidden_states[k] (negative: from the end)
    final_norm: bool = False  # apply the final layer norm to a hidden layer (SD 1.x Clip skip)
    pooled: bool = False  # its projected pooled output conditions the model (SDXL's second encoder)


def _final_norm(te: Any) -> Any:
    norm = getattr(te, "final_layer_norm", None)
    return norm if norm is not None else te.text_model.final_layer_norm


def parse(text: str, emphasis: str = "original") -> list[tuple[str, float]]:
    """A1111's `tokenize_line` input: the attention parse, or with emphasis `none` the whole text at weight 1."""
    return parse_attention(text) if emphasis != "none" else [(text, 1.0)]


def encode_chunk(enc: Encoder, chunk: Chunk, device: Any, unrestored: set | None = None,
                 emphasis: str = "original") -> tuple[Any, Any]:
    """One chunk through one encoder with A1111's emphasis (syntax.EMPHASIS): (z [1, 77, C], pooled [1, P] or None).
    `unrestored` gets "mean" added where the mean restore was left out (MEAN_RESTORE_MIN)."""
    import torch

    ids = list(chunk.tokens)
    pad = enc.tokenizer.pad_token_id
    end = enc.tokenizer.eos_token_id
    if pad is not None and pad != end:  # SD2/SDXL-G: after the first end token comes padding, as in diffusers
        first = ids.index(end)
        ids = ids[: first + 1] + [pad] * (len(ids) - first - 1)
    te = enc.text_encoder
    out = te(torch.tensor([ids], device=device), output_hidden_states=enc.hidden_layer is not None)
    if enc.hidden_layer is None:
        z = out[0]
    else:
        z = out.hidden_states[enc.hidden_layer]
        if enc.final_norm:
            z = _final_norm(te)(z)
    pooled = out[0] if enc.pooled else None  # CLIPTextModelWithProjection: text_embeds
    # Ignore and None apply no weights (None has none to apply: its brackets were read as text)
    if emphasis in ("original", "no_norm") and any(m != 1.0 for m in chunk.multipliers):
        # in float32 whatever the encoder's dtype: A1111's multipliers are a float32 tensor, so its fp16 maths
        # promotes (half precision here was up to 0.0137 off)
        dtype = z.dtype
        mult = torch.tensor(chunk.multipliers, device=z.device, dtype=torch.float32)
        z = z.float()
        original_mean = z.mean()
        z = z * mult.reshape(1, -1, 1).expand(z.shape)
        new_mean = z.mean()
        if emphasis == "original" and mean_restore_ok(original_mean, new_mean, z):
            z = z * (original_mean / new_mean)
        elif emphasis == "original" and unrestored is not None:
            unrestored.add("mean")
        z = z.to(dtype)
    return z, pooled


def mean_restore_ok(original_mean: Any, new_mean: Any, z: Any) -> bool:
    """Whether A1111's mean restore `old_mean / new_mean` is a number and not float noise (MEAN_RESTORE_MIN)."""
    import torch

    scale = z.abs().mean()
    return bool(torch.isfinite(original_mean / new_mean) and new_mean.abs() > MEAN_RESTORE_MIN * scale
                and original_mean.abs() > MEAN_RESTORE_MIN * scale)


def encode_text(encoders: list[Encoder], text: str, device: Any, chunks_at_least: int = 0,
                unrestored: set | None = None, emphasis: str = "original") -> tuple[Any, Any]:
    """A prompt (tags already removed) → (embeddings [1, 77·k, ΣC], pooled or None), at least `chunks_at_least`
    chunks (more are the empty prompt's chunk, as A1111 pads the texts of one batch, and with "Pad prompt/negative
    prompt" the shorter of prompt and negative prompt). `unrestored`: see encode_chunk."""
    import torch

    parsed = parse(text, emphasis)
    per_encoder = [tokenize_chunks(e.tokenizer, parsed) for e in encoders]
    count = max(chunks_at_least, *(len(c) for c in per_encoder))
    zs, pooled = [], None
    for enc, chunks in zip(encoders, per_encoder, strict=True):
        empty = tokenize_chunks(enc.tokenizer, [("", 1.0)])[0]
        parts = []
        for i in range(count):
            z, p = encode_chunk(enc, chunks[i] if i < len(chunks) else empty, device, unrestored, emphasis)
            parts.append(z)
            if i == 0 and p is not None:
                pooled = p
        zs.append(torch.cat(parts, dim=1))
    return torch.cat(zs, dim=-1), pooled


def chunk_count(encoders: list[Encoder], text: str, emphasis: str = "original") -> int:
    parsed = parse(text, emphasis)
    return max(len(tokenize_chunks(e.tokenizer, parsed)) for e in encoders)
