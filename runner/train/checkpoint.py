"""Write the trained LoRA (diffusers + kohya files) and resumable checkpoints; find and read them back.

Not `accelerate`'s save_state/load_state: those write the optimizer, LR-scheduler and random states with torch.save
(`random_states_0.pkl`, `optimizer.bin`), which only torch.load's unpickling reads back. A checkpoint here is
safetensors tensors plus JSON, read without unpickling anything, as every other file this project loads by default.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..common.errors import ConfigError
from ..lora.kohya import to_kohya
from .config import TrainSpec

CKPT_DIR = "checkpoints"
STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def lora_states(unet: Any, text_encoder: Any | None) -> tuple[dict, dict | None]:
    """The LoRA weights of the UNet (and text encoder) in peft naming."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(unet), get_peft_model_state_dict(text_encoder) if text_encoder else None


def save_lora(folder: Path, name: str, unet: Any, text_encoder: Any | None, rank: int, alpha: float) -> Path:
    """Write `name.safetensors` (diffusers) and `name_kohya.safetensors` (A1111/ComfyUI) atomically."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import save_file

    unet_state, te_state = lora_states(unet, text_encoder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".lora-", dir=folder))
    try:
        StableDiffusionPipeline.save_lora_weights(
            tmp,
            unet_lora_layers=convert_state_dict_to_diffusers(unet_state),
            text_encoder_lora_layers=convert_state_dict_to_diffusers(te_state) if te_state else None,
            weight_name=f"{name}.safetensors",
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
            text_encoder_lora_adapter_metadata=text_encoder.peft_config["default"].to_dict()
            if te_state
            else None,
        )
        kohya = {
            k: v.float() if v.is_floating_point() else v
            for k, v in to_kohya(unet_state, te_state, alpha).items()
        }
        save_file(
            kohya,
            str(tmp / f"{name}_kohya.safetensors"),
            metadata={"ss_network_dim": str(rank), "ss_network_alpha": f"{alpha:g}"},
        )
        for f in tmp.iterdir():
            f.replace(folder / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / f"{name}.safetensors"


def _rng_state() -> tuple[dict, dict]:
    import numpy as np
    import torch

    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return tensors, meta


def _set_rng_state(tensors: dict, meta: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = meta["numpy"]
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), *npst[2:]))


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoints/step-N (LoRA, optimizer, LR schedule, RNGs, counters) atomically; prune old ones.

    `state` holds: modules {prefix: module}, optimizer, lr_scheduler, generator (torch.Generator),
    scaler (GradScaler or None), lora (callable writing the LoRA files into a folder), info (JSON-able dict),
    ema (optional `optim.Ema`, its averages saved beside the weights).
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    root = run_dir / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}-", dir=root))
    try:
        tensors, meta = _rng_state()
        for prefix, module in state["modules"].items():
            tensors.update({f"{prefix}.{k}": v for k, v in get_peft_model_state_dict(module).items()})
        opt = state["optimizer"].state_dict()
        opt_meta: dict[str, dict] = {}
        for idx, pstate in opt["state"].items():
            for key, value in pstate.items():
                if hasattr(value, "shape"):
                    tensors[f"optimizer.{idx}.{key}"] = value
                else:
                    opt_meta.setdefault(str(idx), {})[key] = value
        tensors["generator"] = state["generator"].get_state()
        if state.get("ema") is not None:
            tensors.update(state["ema"].tensors())
        doc = {
            "step": step,
            "rng": meta,
            "optimizer": {"param_groups": opt["param_groups"], "state": opt_meta},
            "lr_scheduler": state["lr_scheduler"].state_dict(),
            "scaler": state["scaler"].state_dict() if state.get("scaler") else None,
            **state["info"],
        }
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(doc, indent=1), encoding="utf-8")
        state["lora"](tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(run_dir, keep)
    return final


def prune(run_dir: Path, keep: int) -> None:
    """Keep the last `keep` checkpoints (0: all) and the best by validation loss (`checkpoints/best.json`)."""
    if not keep:
        return
    try:
        best = json.loads((Path(run_dir) / CKPT_DIR / "best.json").read_text(encoding="utf-8"))["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        best = None
    for old in list_checkpoints(run_dir)[:-keep]:
        if old.name != best:
            shutil.rmtree(old, ignore_errors=True)


def clean_partial(run_dir: Path) -> None:
    """Remove checkpoint folders a killed process left half-written (they never got their final name)."""
    root = Path(run_dir) / CKPT_DIR
    for tmp in root.glob(".step-*") if root.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_JSON).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def find_resume(resume: str | bool, run_dir: Path) -> Path | None:
    """The checkpoint to continue from: this run dir's last (auto), a given run/checkpoint folder, or None."""
    if resume is False:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume).expanduser()
    if (path / STATE_JSON).is_file():
        return path
    found = list_checkpoints(path) if path.is_dir() else []
    if not found:
        raise ConfigError(
            f"resume={resume!r} is not a training run or checkpoint folder (no {CKPT_DIR}/step-N/"
            f"{STATE_JSON}); valid: auto, false, or such a folder"
        )
    return found[-1]


def read_info(ckpt: Path) -> dict:
    """The JSON part of a checkpoint (step, config fingerprint, counters)."""
    return json.loads((ckpt / STATE_JSON).read_text(encoding="utf-8"))


def load_checkpoint(ckpt: Path, state: dict[str, Any]) -> dict:
    """Restore what `save_checkpoint` wrote into the live objects of `state`; return the JSON part."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    doc = read_info(ckpt)
    tensors = load_file(str(ckpt / STATE_TENSORS))
    for prefix, module in state["modules"].items():
        sub = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        result = set_peft_model_state_dict(module, sub)
        if getattr(result, "unexpected_keys", None):
            raise ConfigError(
                f"checkpoint {ckpt} does not match this LoRA layout ({result.unexpected_keys[0]})"
            )
    opt_state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = value
    for idx, extra in doc["optimizer"]["state"].items():
        opt_state.setdefault(int(idx), {}).update(extra)
    state["optimizer"].load_state_dict({"state": opt_state, "param_groups": doc["optimizer"]["param_groups"]})
    state["lr_scheduler"].load_state_dict(doc["lr_scheduler"])
    if state.get("scaler") and doc.get("scaler"):
        state["scaler"].load_state_dict(doc["scaler"])
    state["generator"].set_state(tensors["generator"].to(torch.uint8))
    if state.get("ema") is not None:
        state["ema"].load(tensors)
    _set_rng_state(tensors, doc["rng"])
    return doc


def fingerprint(spec: TrainSpec, name: str) -> dict:
    """What must not change when a run resumes: the model and the LoRA layout."""
    lo = spec.lora
    return {
        "model": spec.model.id,
        "type": lo.type,
        "rank": lo.rank,
        "alpha": spec.alpha,
        "targets": list(lo.target_modules or []),
        "preset": lo.preset,
        "text_encoder": lo.text_encoder,
        "te_targets": list(lo.text_encoder_target_modules),
        "name": name,
    }


# What a resume takes from the checkpoint (besides the LoRA weights, optimizer moments, step, random state and loss
# log): the fingerprint (model + LoRA layout) and train.seed, which seeds the data order and every random draw;
# changing one of those is refused. Every other setting is applied from the new config (train.lr included).
FROM_CHECKPOINT = ("train.seed",)


def settings(spec: TrainSpec, processes: int = 1) -> dict:
    """The training settings a checkpoint records (compared on resume). `processes` (the data-parallel world
    size) is one of them: a run may resume on another count, which, like train.batch_size, changes the global
    batch (train.batch_size x processes) from there on."""
    import dataclasses

    out = {"processes": processes}
    out |= {f"train.{k}": v for k, v in dataclasses.asdict(spec.train).items()}
    out |= {f"data.{k}": v for k, v in dataclasses.asdict(spec.data).items()}
    out |= {f"validation.{k}": v for k, v in dataclasses.asdict(spec.validation).items()}
    return out


def changed_settings(ckpt: Path, spec: TrainSpec, processes: int = 1) -> dict[str, tuple[Any, Any]]:
    """Settings that differ from the checkpoint's ({key: (old, new)}); ConfigError for those that must not."""
    old = read_info(ckpt).get("settings") or {}
    new = settings(spec, processes)
    changed = {k: (old[k], v) for k, v in new.items() if k in old and old[k] != v}
    for key in FROM_CHECKPOINT:
        if key in changed:
            was, now = changed[key]
            raise ConfigError(f"cannot resume from {ckpt} with {key}={now!r}: it was trained with {was!r}, which "
                              "seeds its data order and random state; use the same value or resume=false")
    return changed


def apply_optimizer_settings(optimizer: Any, lr_scheduler: Any, spec: TrainSpec) -> None:
    """After loading a checkpoint: this run's learning rate and AdamW settings, on the restored moments.

    A loaded state dict brings back the old run's base learning rate and betas; the new schedule (built from this
    run's config) is kept and re-evaluated at the restored step."""
    t = spec.train
    lr_scheduler.base_lrs = [t.lr for _ in optimizer.param_groups]
    lambdas = getattr(lr_scheduler, "lr_lambdas", None) or [lambda _: 1.0] * len(optimizer.param_groups)
    for group, lam in zip(optimizer.param_groups, lambdas, strict=True):
        group.update(initial_lr=t.lr, lr=t.lr * lam(lr_scheduler.last_epoch), betas=(t.adam_beta1, t.adam_beta2),
                     eps=t.adam_epsilon, weight_decay=t.weight_decay)
    lr_scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def check_resume(ckpt: Path, fingerprint: dict) -> int:
    """The checkpoint's step, after checking it was trained with the same model and LoRA layout."""
    info = read_info(ckpt)
    old = info.get("fingerprint", {})
    for key, value in fingerprint.items():
        if old.get(key) != value:
            raise ConfigError(
                f"cannot resume from {ckpt}: it was trained with {key}={old.get(key)!r}, this run has "
                f"{value!r}; use the same settings or resume=false with a new output dir"
            )
    return int(info["step"])
