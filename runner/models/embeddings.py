"""Textual-inversion embeddings named in prompts (A1111's `embeddings/` folder): found in `embedding_dirs` by file
stem, loaded into the CLIP text encoders of SD 1.x/2.x (one tensor) and SDXL (`clip_l` and `clip_g`), recorded with
A1111's `TI hashes` (the first 10 hex digits of the file's SHA-256).

Files: `.safetensors` (A1111's `emb_params`, diffusers' one-tensor files, SDXL's `clip_l`/`clip_g`); A1111's `.pt`
(`string_to_param`) only with `allow_pickle_embeddings=true`, read with torch's weights-only loader.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common.errors import ConfigError

log = logging.getLogger(__name__)

SAFE = (".safetensors",)
PICKLED = (".pt", ".bin")


@dataclass(frozen=True)
class Embedding:
    name: str  # the file stem: the word that names it in prompts
    path: str
    sha256: str

    @property
    def short_hash(self) -> str:
        return self.sha256[:10]  # A1111's TI hash

    def used_in(self, *texts: str) -> bool:
        return _used(self.name, list(texts))

    def record(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "file": self.path}


def _used(name: str, texts: list[str]) -> bool:
    word = re.compile(rf"(?<![\w]){re.escape(name)}(?![\w])")
    return any(word.search(t) for t in texts)


def find_embeddings(dirs: tuple[str, ...], texts: list[str], allow_pickle: bool) -> tuple[Embedding, ...]:
    """The embeddings in `dirs` whose name appears as a word in `texts` (the first folder wins a name)."""
    from ..common.hashing import file_sha256

    found: dict[str, Embedding] = {}
    for d in dirs:
        folder = Path(d).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"embedding_dirs: {d} is not a folder")
        for path in sorted(folder.rglob("*")):
            if path.suffix not in SAFE + PICKLED or path.stem in found or not _used(path.stem, texts):
                continue
            if path.suffix in PICKLED and not allow_pickle:
                raise ConfigError(f"embedding {path} is a pickle file ({path.suffix}), which can run code when "
                                  "loaded; convert it to .safetensors, or set allow_pickle_embeddings=true if you "
                                  "trust it")
            found[path.stem] = Embedding(path.stem, str(path), file_sha256(path))
    return tuple(found.values())


def resolve(spec: Any) -> Any:
    """The run with `embeddings`: those of `embedding_dirs` its prompts name."""
    if not spec.embedding_dirs:
        return spec
    texts = [t for p in spec.prompts for t in (p.prompt, p.negative_prompt)]
    return dataclasses.replace(spec, embeddings=find_embeddings(spec.embedding_dirs, texts,
                                                                spec.allow_pickle_embeddings))


def _tensors(emb: Embedding) -> dict[str, Any]:
    """{"clip_l": [n, 768], "clip_g": [n, 1280]} (SDXL) or {"": [n, C]} (SD 1.x/2.x)."""
    import torch

    if emb.path.endswith(SAFE):
        from safetensors.torch import load_file

        sd = load_file(emb.path)
    else:
        try:
            sd = torch.load(emb.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is the file's
            raise ConfigError(f"embedding {emb.path} could not be read ({exc})") from None
    if "clip_l" in sd and "clip_g" in sd:
        return {"clip_l": sd["clip_l"], "clip_g": sd["clip_g"]}
    if "string_to_param" in sd:  # A1111's .pt
        return {"": next(iter(sd["string_to_param"].values()))}
    if "emb_params" in sd:  # A1111's .safetensors
        return {"": sd["emb_params"]}
    tensors = [v for v in sd.values() if torch.is_tensor(v)]
    if len(tensors) == 1:  # diffusers' {token: tensor}
        return {"": tensors[0]}
    raise ConfigError(f"embedding {emb.path} is not a textual-inversion file (keys: {', '.join(list(sd)[:5])})")


def apply_embeddings(loaded: Any, embeddings: tuple[Embedding, ...]) -> None:
    """Load `embeddings` into the pipeline's text encoders (the ones loaded before are removed first, so a word is
    an embedding only in runs that name its folder); cached prompt embeddings are dropped when this changes."""
    pipe = loaded.pipe
    if getattr(loaded, "embeddings", ()) == embeddings:
        return
    if getattr(loaded, "embeddings", ()):
        pipe.unload_textual_inversion()
    pairs = [(getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None), "clip_l"),
             (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None), "clip_g")]
    pairs = [p for p in pairs if p[1] is not None]
    for emb in embeddings:
        tensors = _tensors(emb)
        for tok, te, key in pairs:
            vec = tensors.get(key if len(pairs) > 1 else "", tensors.get(""))
            if vec is None:
                raise ConfigError(f"embedding {emb.name} ({emb.path}) has no {key} vectors: it is for SD 1.x/2.x, "
                                  f"not for {type(pipe).__name__}")
            width = te.get_input_embeddings().weight.shape[1]
            if vec.ndim != 2 or vec.shape[1] != width:
                raise ConfigError(f"embedding {emb.name} ({emb.path}) has vectors of size {vec.shape[-1]}, the "
                                  f"model's text encoder takes {width}: it was made for another model")
            pipe.load_textual_inversion(vec, token=emb.name, tokenizer=tok, text_encoder=te)
    loaded.embeddings = embeddings
    cache = getattr(loaded, "prompt_embeds", None)
    if cache is not None:
        cache.clear()
        if hasattr(cache, "scheduled_texts"):
            cache.scheduled_texts.cache.clear()
    log.info("textual-inversion embeddings: %s", ", ".join(e.name for e in embeddings) or "none")


def check_recorded(img: str, recorded: list[dict], spec: Any) -> list[str]:
    """Problems with the embeddings an image was made with (ours: `sha256`; A1111's `TI hashes`: 10 hex digits),
    against those `embedding_dirs` gives this run; [] when each is found with its hash."""
    have = {e.name: e for e in resolve(spec).embeddings} if spec.embedding_dirs else {}
    out = []
    for e in recorded:
        got = have.get(e.get("name"))
        if got is None:
            where = ", ".join(spec.embedding_dirs) or "no embedding_dirs given"
            out.append(f"{img} used textual-inversion embedding {e.get('name')!r}, which is not in embedding_dirs "
                       f"({where}); give embedding_dirs=[FOLDER]")
        elif not got.sha256.startswith(str(e.get("sha256") or "")):
            out.append(f"embedding {got.name!r} ({got.path}) has sha256 {got.sha256[:10]}…, but {img} was made with "
                       f"{str(e.get('sha256'))[:10]}…")
    return out
