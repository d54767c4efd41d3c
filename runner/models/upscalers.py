"""Model upscalers (ESRGAN, Real-ESRGAN, SwinIR, SPAN, …) for hires. fix, loaded with spandrel, the maintained
loader ComfyUI and Forge use; each file is loaded once per process (by path, size and mtime) and run as A1111's
`upscale_pil_patch` runs it (modules/upscaler_utils.py, v1.10): the image as a BGR tensor in [0, 1], the model's
output clipped to 0..255 and truncated to uint8. The file was found and checked by config/upscalers.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

_LOADED: dict[tuple, Callable[[Any], Any]] = {}


def upscaler(path: str, device: Any) -> Callable[[Any], Any]:
    """A PIL -> PIL function running the model in `path` once (at its native scale), loaded on first use."""
    stat = Path(path).stat()
    key = (path, stat.st_size, stat.st_mtime_ns, str(device))
    if key not in _LOADED:
        _LOADED[key] = _load(path, device)
    return _LOADED[key]


def _load(path: str, device: Any) -> Callable[[Any], Any]:
    import numpy as np
    import torch
    from PIL import Image
    from spandrel import ImageModelDescriptor, ModelLoader

    from ..common.errors import ConfigError

    if path.lower().endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:  # allow_pickle_upscalers: still only tensors, never arbitrary objects
        state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model = ModelLoader().load_from_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - spandrel's "unsupported model" and malformed files alike
        raise ConfigError(f"hires.upscaler={Path(path).stem!r}: {Path(path).name} is not a model spandrel "
                          f"knows ({type(exc).__name__}: {exc})") from exc
    if not isinstance(model, ImageModelDescriptor):
        raise ConfigError(f"hires.upscaler={Path(path).stem!r}: {Path(path).name} is a "
                          f"{type(model).__name__} ({model.architecture.name}), not an image upscaler")
    model.to(device).eval()
    param = next(model.model.parameters())

    def run(im: Any) -> Any:
        bgr = np.asarray(im.convert("RGB"))[:, :, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(bgr.transpose(2, 0, 1)) / 255).unsqueeze(0)
        with torch.inference_mode():
            out = model(x.to(device=param.device, dtype=param.dtype))
        arr = 255.0 * np.moveaxis(out[0].detach().float().cpu().numpy(), 0, 2)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)[:, :, ::-1].copy(), "RGB")

    return run
