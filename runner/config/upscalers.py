"""Model upscalers for hires. fix (A1111's ESRGAN-class upscalers): `hires.upscaler` names a model file by its
stem, found in `upscaler_dirs` (A1111's models/ESRGAN, models/RealESRGAN, …), or by its path. Found and checked
here, before anything loads; loaded with spandrel (models/upscalers.py)."""

from __future__ import annotations

import os
from pathlib import Path

from ..common.errors import ConfigError, did_you_mean, first_line

MODEL_EXT = (".safetensors", ".pth", ".pt")  # what A1111's ESRGAN upscaler lists (modelloader ext_filter)
PICKLE_EXT = (".pth", ".pt")
INSTALL = "pip install 't2i-runner[upscale]'"


def model_files(dirs: tuple[str, ...]) -> dict[str, Path]:
    """Upscaler model files in `dirs` (recursive) by file stem, the name A1111 lists and records; the first folder
    wins, and a .safetensors file before a pickle one of the same stem."""
    out: dict[str, Path] = {}
    for d in dirs:
        root = Path(os.path.expanduser(d))
        for ext in MODEL_EXT:
            for f in sorted(root.rglob(f"*{ext}")) if root.is_dir() else ():
                out.setdefault(f.stem, f)
    return out


def spandrel_problem() -> str | None:
    """Why spandrel (the model loader) cannot be used here, or None when it can."""
    try:
        import spandrel  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure (missing, or a torchvision built for another torch)
        return first_line(exc, 160)
    return None


def resolve(name: str, dirs: tuple[str, ...], allow_pickle: bool, builtin: tuple[str, ...]) -> Path:
    """The model file `hires.upscaler=name` means; ConfigError (one line) when there is none, when it is a pickle
    file without `allow_pickle_upscalers`, or when spandrel cannot be used."""
    path = Path(os.path.expanduser(name))
    found = model_files(dirs)
    if name.lower().endswith(MODEL_EXT) and path.is_file():
        file = path
    elif name in found:
        file = found[name]
    else:
        where = f"upscaler_dirs ({', '.join(dirs)})" if dirs else "upscaler_dirs (none set)"
        raise ConfigError(f"hires.upscaler={name!r} is not known{did_you_mean(name, (*builtin, *found))}; valid: "
                          f"{', '.join((*builtin, *found))}, or a model file ({', '.join(MODEL_EXT)}) in {where} "
                          "or its path")
    if file.suffix.lower() in PICKLE_EXT and not allow_pickle:
        raise ConfigError(f"hires.upscaler={name!r} is {file.name}, a pickle file (it can run code when loaded); "
                          "use a .safetensors file, or set allow_pickle_upscalers=true if you trust it")
    problem = spandrel_problem()
    if problem is not None:
        raise ConfigError(f"hires.upscaler={name!r} is a model upscaler ({file.name}), loaded with spandrel, which "
                          f"cannot be imported here ({problem}); {INSTALL}")
    return file.resolve()
