"""The validation loss: the training objective on a held-out split at fixed noise levels and fixed noise.

The training loss of one step is one draw of (image, noise level, noise): its spread hides the trend (a flow
family's loss at sigma 0.9 is ten times its loss at sigma 0.1). The validation loss fixes all three: each image of
`validation.dir` (captions read as `data.*` reads them, trigger applied, no dropout or tag shuffle) at LEVELS noise
levels spread over (0, 1), each with its own seeded noise, averaged. It is the same number for the same LoRA, so
checkpoints compare on it (`best`), and on the training images themselves it measures memorisation.

Its random draws come from generators of its own: measuring does not change the training run (resume stays bit
for bit).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..common.errors import ConfigError
from ..common.io import atomic_write_bytes
from .config import TrainSpec
from .data import Example, load_pixels, scan, training_caption
from .losslog import read_rows

LEVELS = (0.125, 0.375, 0.625, 0.875)  # midpoints of four equal parts of the noise range
SEED = 20_240_501  # the noise of image i at level j: seed SEED + 1000 i + j, the same at every measurement
LOG = "val_loss.csv"
BEST = "best.json"  # in checkpoints/: {step, loss, checkpoint}; that folder is kept whatever keep_checkpoints says


def validation_examples(spec: TrainSpec) -> list[Example]:
    """The held-out images of `validation.dir` (none without it)."""
    if not spec.validation.dir:
        return []
    try:
        examples = scan(dataclasses.replace(spec.data, dir=spec.validation.dir))
    except ConfigError as exc:  # scan names data.dir and training images
        raise ConfigError(str(exc).replace("data.dir", "validation.dir").replace("training images",
                                                                                 "held-out images")) from None
    return list(dict.fromkeys(examples))  # a kohya `N_name` subfolder's repeats: each image once


def make_measure(adapter: Any, noise_sched: Any, spec: TrainSpec, examples: list[Example], size: int,
                 modules: dict[str, Any]) -> Callable[[], float]:
    """A function returning the validation loss of the adapter's current weights (no gradients, eval mode)."""
    import torch

    from . import objective

    fixed = dataclasses.replace(spec.data, caption_dropout=0.0, shuffle_tags=False)
    pixels = [load_pixels(e, size, "center", False, None) for e in examples]
    captions = [training_caption(e.caption, fixed, None) for e in examples]
    amp = adapter.dtype != torch.float32
    latents: list[Any] = []
    conds: list[Any] = []

    def measure() -> float:
        was = {name: m.training for name, m in modules.items()}
        for m in modules.values():
            m.train(False)
        total = 0.0
        try:
            with torch.no_grad(), torch.autocast(device_type=adapter.device, dtype=adapter.dtype, enabled=amp):
                if not latents:  # the frozen encoders give the same latents and embeddings every time
                    for i, px in enumerate(pixels):
                        latents.append(adapter.latents(px[None], torch.Generator().manual_seed(SEED - 1 - i)))
                        conds.append(None if spec.lora.text_encoder else adapter.encode([captions[i]]))
                for i, lat in enumerate(latents):
                    cond = conds[i] if conds[i] is not None else adapter.encode([captions[i]])
                    for j, level in enumerate(LEVELS):
                        gen = torch.Generator().manual_seed(SEED + 1000 * i + j)
                        total += float(objective.loss(adapter, lat, cond, gen, spec.train, noise_sched, level=level))
        finally:
            for name, m in modules.items():
                m.train(was[name])
        return total / (len(latents) * len(LEVELS))

    return measure


class ValLog:
    """`val_loss.csv` (step, loss) and `checkpoints/best.json`: the run's validation history and its best."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOG
        self.best_path = Path(run_dir) / "checkpoints" / BEST

    def rows(self) -> list[tuple[int, float]]:
        return [(int(r["step"]), r["val_loss"]) for r in read_rows(self.path, ("step", "val_loss"))]

    def truncate(self, last_step: int) -> None:
        self._write([r for r in self.rows() if r[0] <= last_step])

    def append(self, step: int, loss: float) -> None:
        self._write([r for r in self.rows() if r[0] != step] + [(step, loss)])

    def _write(self, rows: list[tuple[int, float]]) -> None:
        text = "step,val_loss\n" + "".join(f"{s},{v!r}\n" for s, v in rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, text.encode("utf-8"))

    def best(self) -> dict | None:
        """{step, loss, checkpoint} of the best checkpoint so far, or None."""
        try:
            return json.loads(self.best_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def set_best(self, step: int, loss: float, checkpoint: Path) -> None:
        doc = {"step": step, "loss": loss, "checkpoint": checkpoint.name}
        atomic_write_bytes(self.best_path, json.dumps(doc, indent=1).encode("utf-8"))


def write_best_lora(checkpoint: Path, name: str, out_dir: Path, step: int, loss: float) -> list[Path]:
    """Copy the best checkpoint's LoRA files beside the final LoRA as `NAME_best.safetensors` (and
    `NAME_best_kohya.safetensors`), their metadata recording the step and validation loss."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    written = []
    for src, dst in ((f"{name}.safetensors", f"{name}_best.safetensors"),
                     (f"{name}_kohya.safetensors", f"{name}_best_kohya.safetensors")):
        if not (checkpoint / src).is_file():
            continue
        with safe_open(str(checkpoint / src), "pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
        meta |= {"t2i_best_step": str(step), "t2i_best_val_loss": repr(loss), "ss_steps": str(step)}
        tmp = out_dir / f".{dst}.tmp"
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(out_dir / dst)
        written.append(out_dir / dst)
    return written
