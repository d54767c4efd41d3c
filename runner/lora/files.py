"""LoRA files: resolve a spec (file, folder + weight_name, hub repo) to the one file read, and read it; expand a
glob or a folder of training checkpoints into one set per file; find a LoRA in `lora_dirs` by name or hash."""

from __future__ import annotations

import dataclasses
import glob
import itertools
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..common.errors import ConfigError, first_line
from ..common.hashing import addnet_sha256, autov2, file_sha256
from ..common.paths import PICKLE_EXT, WEIGHT_EXT, hub_offline, hub_unreachable, is_hub_id, is_safetensors
from ..config import LoraSpec, RunSpec, lora_name
from ..config.blocks import spec_label
from ..config.validate import check_unique_names
from ..models.tiny import builtin_path

log = logging.getLogger(__name__)

DEFAULT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")  # the seed's two defaults


@dataclass(frozen=True)
class ResolvedLora:
    """A LoRA spec pinned to the file actually read and its sha256."""

    name: str
    source: str
    weight_name: str | None  # the file name picked inside a folder or hub repo; None for a direct file path
    file: str
    sha256: str

    @property
    def adapter(self) -> str:
        """Internal peft adapter name: one per file content, so a file loads once whatever it is called."""
        return f"lora_{self.sha256[:16]}"

    @property
    def autov3(self) -> str:
        """A1111's `Lora hashes` entry / Civitai's AutoV3 (cached like the sha256)."""
        return addnet_sha256(self.file)[:12]

    def record(self, weight: float, blocks: object = None) -> dict:
        out = {"name": self.name, "source": self.source, "weight_name": self.weight_name, "scale": weight,
               "sha256": self.sha256, "autov2": autov2(self.sha256), "autov3": self.autov3, "file": self.file}
        if blocks is not None:
            out["blocks"] = spec_label(blocks)  # type: ignore[arg-type]
        return out


def _listing(files: Iterable[str]) -> str:
    found = sorted(f for f in files if is_safetensors(f))
    return ", ".join(found) if found else "none"


def _default_in_dir(folder: Path) -> Path | None:
    """The one LoRA file a folder stands for: a default name, else its only `.safetensors` file."""
    for default in DEFAULT_NAMES:
        if (folder / default).is_file():
            return folder / default
    found = sorted(folder.glob("*.safetensors"))
    return found[0] if len(found) == 1 else None


def _pick_in_dir(spec: LoraSpec, folder: Path) -> Path:
    if spec.weight_name:
        f = folder / spec.weight_name
        if not f.is_file():
            there = _listing(p.name for p in folder.iterdir())
            raise ConfigError(f"weight_name={spec.weight_name!r} is not in {spec.source}; "
                              f".safetensors files there: {there}")
        return f
    picked = _default_in_dir(folder)
    if picked is not None:
        return picked
    found = sorted(folder.glob("*.safetensors"))
    raise ConfigError(f"no default LoRA file ({' or '.join(DEFAULT_NAMES)}) in {spec.source}; "
                      f"set weight_name to one of: {_listing(p.name for p in found)}")


def _hub_listing(repo: str) -> list[str] | None:
    """The files of a hub repo (from the local cache when offline); None if the repo itself is unknown."""
    try:
        if hub_offline():
            from huggingface_hub import snapshot_download

            snap = Path(snapshot_download(repo, local_files_only=True))
            return [p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()]
        from huggingface_hub import list_repo_files

        return list_repo_files(repo)
    except Exception:  # noqa: BLE001 - not cached / not found / no network all mean "unknown"
        return None


def _hub_file(spec: LoraSpec) -> Path:
    from huggingface_hub import hf_hub_download

    if not hub_offline():
        why = hub_unreachable()
        if why:
            raise ConfigError(f"LoRA source {spec.source!r} is a hub id, but the hub cannot be reached ({why}); "
                              "give a local file or folder, or set HF_HUB_OFFLINE=1 to use the local cache")
    files = _hub_listing(spec.source)
    where = "the local hub cache (HF_HUB_OFFLINE=1)" if hub_offline() else "the hub"
    if files is None:
        raise ConfigError(f"LoRA source {spec.source!r} is not a local file or folder and not a repo in "
                          f"{where}; give an existing path or a hub id")
    if spec.weight_name:
        names = [spec.weight_name]
    else:
        names = [n for n in DEFAULT_NAMES if n in files]
        singles = [f for f in files if is_safetensors(f) and "/" not in f]
        names = names or (singles if len(singles) == 1 else [])
    if not names or names[0] not in files:
        what = f"weight_name={spec.weight_name!r} is" if spec.weight_name else "no default LoRA file is"
        raise ConfigError(f"{what} not in hub repo {spec.source!r} ({where}); .safetensors files there: "
                          f"{_listing(files)}")
    try:
        return Path(hf_hub_download(spec.source, names[0], local_files_only=hub_offline()))
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        raise ConfigError(f"could not download {names[0]!r} from hub repo {spec.source!r} "
                          f"({type(exc).__name__}); give a local file or folder") from exc


def resolve_lora(spec: LoraSpec, allow_pickle: bool = False) -> ResolvedLora:
    """Find the file a spec names (local file, folder + weight_name, or hub repo) and hash it."""
    source = spec.source
    path = builtin_path(source) or Path(os.path.expanduser(source))
    if path.is_dir():
        file = _pick_in_dir(spec, path)
    elif path.is_file():
        file = path
    elif is_hub_id(source):
        file = _hub_file(spec)
    else:
        raise ConfigError(f"LoRA source {source!r} not found (no such file or folder, "
                          "and not a hub id owner/name)")
    if file.suffix.lower() not in (".safetensors", *PICKLE_EXT):  # never unpickle a file of unknown kind
        raise ConfigError(f"LoRA file {file} is not a LoRA weights file; valid: .safetensors (or "
                          f"{', '.join(PICKLE_EXT)} with allow_pickle_lora=true)")
    if file.suffix.lower() in PICKLE_EXT and not allow_pickle:
        raise ConfigError(f"LoRA file {file} is a pickle file; convert it to .safetensors or set "
                          "allow_pickle_lora=true if you trust it")
    if not os.access(file, os.R_OK):
        raise ConfigError(f"LoRA file {file} is not readable")
    weight_name = None if path.is_file() else file.name
    return ResolvedLora(lora_name(spec), source, weight_name, str(file), file_sha256(file))


def resolve_set(specs: Iterable[LoraSpec], allow_pickle: bool, where: str) -> tuple[ResolvedLora, ...]:
    """Resolve one LoRA set; an adapter name or a file may appear only once in a set."""
    resolved = tuple(resolve_lora(s, allow_pickle) for s in specs)
    check_unique_names([r.name for r in resolved], where)
    for i, r in enumerate(resolved):
        for other in resolved[:i]:
            if other.sha256 == r.sha256:
                raise ConfigError(f"{where} uses the same file twice ({other.name!r} and {r.name!r}: "
                                  f"{r.file}); use one entry and set its scale")
    return resolved


def read_state_dict(r: ResolvedLora) -> dict:
    """The tensors of a resolved LoRA file (pickle files only through torch's weights_only loader)."""
    if is_safetensors(r.file):
        from safetensors.torch import load_file

        try:
            return load_file(r.file)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            why = first_line(exc, 200)
            raise ConfigError(f"LoRA file {r.file} is not a readable safetensors file ({why})") from exc
    import torch

    try:
        state = torch.load(r.file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        why = f"{type(exc).__name__}: {first_line(exc, 200)}"
        raise ConfigError(f"LoRA file {r.file} could not be read ({why})") from exc
    return state.get("state_dict", state) if isinstance(state, dict) else {}


# key prefixes of LoRA files that change only the denoiser (UNet / transformer), in the layouts loaders accept
_DENOISER_ONLY = ("lora_unet_", "unet.", "transformer.", "lora_transformer_", "diffusion_model.",
                  "model.diffusion_model.", "base_model.model.down_blocks", "base_model.model.up_blocks",
                  "base_model.model.mid_block")
_TE_MEMO: dict[str, bool] = {}


def touches_text_encoder(r: ResolvedLora) -> bool:
    """Whether a LoRA file may change a text encoder: True unless every key is a denoiser key (safetensors header
    only; other files count as touching it). Used to share prompt embeddings across LoRA sets."""
    if r.sha256 not in _TE_MEMO:
        touches = True
        if is_safetensors(r.file):
            from safetensors import safe_open

            try:
                with safe_open(r.file, "pt") as f:
                    touches = not all(k.startswith(_DENOISER_ONLY) for k in f.keys())  # noqa: SIM118
            except Exception:  # noqa: BLE001 - unreadable here means the loader reports it; assume it does
                touches = True
        _TE_MEMO[r.sha256] = touches
    return _TE_MEMO[r.sha256]


def resolve_loras(spec: RunSpec) -> list[tuple]:
    """Resolve every LoRA set to files + hashes before anything is loaded or written."""
    sets = []
    by_name: dict[str, str] = {}
    for i, specs in enumerate(spec.lora_sets):
        resolved = resolve_set(specs, spec.allow_pickle_lora, spec.lora_set_label(i))
        for r in resolved:
            if by_name.setdefault(r.name, r.sha256) != r.sha256:
                raise ConfigError(f"LoRA name {r.name!r} is used for two different files; give each a unique name")
        sets.append(resolved)
    return sets


# Checkpoint/epoch sweeps: a glob or a folder of checkpoints becomes one LoRA set per file.
GLOB_CHARS = ("*", "?", "[")


def natural_key(text: str) -> list:
    """Sort key that puts `e2` before `e10` (digit runs compare as numbers)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def _adapters_only(files: list[Path]) -> list[Path]:
    """`files` without what is no adapter (t2i-train's training_state.safetensors: optimizer and random state) and
    without the kohya copy `X_kohya.safetensors` that t2i-train writes beside `X.safetensors` (the same LoRA)."""
    from .detect import read_header

    def adapter(f: Path) -> bool:
        try:
            keys = read_header(f)[0]
        except ConfigError:
            return True  # unreadable: resolving it reports that
        return not any(k == "generator" or k.startswith("optimizer.") for k in keys)

    names = {f.name for f in files}
    return [f for f in files if adapter(f) and not (f.stem.endswith("_kohya") and
                                                    f"{f.stem.removesuffix('_kohya')}.safetensors" in names)]


def _by_path(f: Path) -> list:
    return [natural_key(p) for p in f.parts]


def checkpoint_files(spec: LoraSpec) -> list[Path] | None:
    """The files a glob `source` (or a folder of several checkpoints) names, in natural order; None otherwise."""
    source = os.path.expanduser(spec.source)
    if any(c in spec.source for c in GLOB_CHARS) and not Path(source).exists():
        files = [Path(f) for f in glob.glob(source, recursive=True)
                 if f.lower().endswith(WEIGHT_EXT) and Path(f).is_file()]
        files = _adapters_only(files)
        if not files:
            raise ConfigError(f"LoRA source {spec.source!r} matches no weight file (.safetensors); check the "
                              "pattern and the folder")
        return sorted(files, key=_by_path)  # checkpoints/step-N/x.safetensors: by step
    folder = Path(source)
    if folder.is_dir() and not spec.weight_name and _default_in_dir(folder) is None:
        every = sorted(folder.glob("*.safetensors"), key=lambda f: natural_key(f.name))
        found = _adapters_only(every)
        return found if len(found) > 1 or (found and len(found) < len(every)) else None
    return None


def checkpoint_names(files: list[Path]) -> list[str]:
    """A unique name per checkpoint file: its stem, or (t2i-train's checkpoints/step-N/NAME.safetensors, all one
    stem) the shortest tail of its path that tells it apart."""
    for depth in range(1, max(len(f.parts) for f in files) + 1):
        names = ["-".join((*f.parent.parts[-(depth - 1):], f.stem) if depth > 1 else (f.stem,)) for f in files]
        if len(set(names)) == len(names):
            return names
    return [str(f) for f in files]


def _warn_identical(source: str, files: list[Path]) -> None:
    """Byte-identical checkpoints make the same images (one key): say so, not drop a column silently."""
    seen: dict[str, Path] = {}
    for f in files:
        first = seen.setdefault(file_sha256(f), f)
        if first is not f:
            log.warning("LoRA source %r: %s and %s are byte-identical; they make the same images, shown once",
                        source, first.name if first.name != f.name else first, f)


def expand_checkpoints(spec: RunSpec) -> RunSpec:
    """Each LoRA set whose adapters name a glob or a folder of checkpoints, once per file (a product when a
    set has several): the checkpoint/epoch axis. Each file's adapter is named by its stem."""
    sets = []
    for specs in spec.lora_sets:
        options = []
        for s in specs:
            files = checkpoint_files(s)
            if files is None:
                options.append([s])
                continue
            _warn_identical(s.source, files)
            options.append([dataclasses.replace(s, source=str(f), weight_name=None,
                                                name=f"{s.name}-{stem}" if s.name else stem)
                            for f, stem in zip(files, checkpoint_names(files), strict=True)])
        sets += [tuple(combo) for combo in itertools.product(*options)]
    return dataclasses.replace(spec, lora_sets=tuple(sets))


# `lora_dirs`: where a LoRA known only by name or hash (an A1111 infotext, a moved file) is looked up.
def _weight_files(dirs: Iterable[str]) -> list[Path]:
    out = []
    for d in dirs:
        for root, _, files in os.walk(os.path.expanduser(d)):
            out += [Path(root) / f for f in sorted(files) if f.lower().endswith(WEIGHT_EXT)]
    return out


def _meta(f: Path, key: str) -> str | None:
    from .detect import read_header

    try:
        return read_header(f)[2].get(key)
    except ConfigError:
        return None


def _alias(f: Path) -> str | None:
    return _meta(f, "ss_output_name")


def find_in_lora_dirs(dirs: Iterable[str], name: str | None = None, hash_: str | None = None) -> Path | None:
    """A file in `dirs` whose stem (or else alias, `ss_output_name`) is `name` or whose hash starts with `hash_`
    (full SHA-256, AutoV2 or AutoV3).

    A name match is taken when its hash agrees (or no hash is given); otherwise every file is hashed (cached).
    """
    files = _weight_files(dirs)
    want = (hash_ or "").lower()

    def matches(f: Path) -> bool:
        if not want:
            return True
        if file_sha256(f).startswith(want) or (len(want) <= 12 and addnet_sha256(f).startswith(want)):
            return True
        # A1111 takes a file's `sshs_model_hash` metadata as its hash when present (even when stale)
        return is_safetensors(f) and str(_meta(f, "sshs_model_hash") or "").lower().startswith(want)

    if name:
        for f in files:
            if f.stem == name and matches(f):
                return f
        for f in files:  # A1111's alias: the name kohya trained it under (`ss_output_name`), what its UI inserts
            if is_safetensors(f) and _alias(f) == name and matches(f):
                return f
    if want:
        for f in files:
            if matches(f):
                return f
    return None
