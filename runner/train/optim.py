"""The optimizer (`train.optimizer`) and the EMA of the adapter weights (`train.ema_decay`).

`adamw` is torch's; `adamw8bit` (bitsandbytes) and `prodigy` (prodigyopt) are optional extras
(`pip install 't2i-runner[train]'`): asked for without the package, one line names what to install, before the model
loads.
"""

from __future__ import annotations

from typing import Any

from ..common.errors import ConfigError

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
_PACKAGE = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt"}


def check_optimizer(name: str) -> None:
    """ConfigError when the optimizer's package is not installed."""
    import importlib

    package = _PACKAGE.get(name)
    if package is None:
        return
    try:
        importlib.import_module(package)
    except ImportError as exc:
        raise ConfigError(f"train.optimizer={name} needs the {package} package, which is not installed: pip install "
                          f"'t2i-runner[train]' (or {package}); or use train.optimizer=adamw") from exc


def make_optimizer(params: list, t: Any) -> Any:
    """The optimizer over `params` with the run's learning rate, betas, epsilon and weight decay."""
    import torch

    check_optimizer(t.optimizer)
    kw = {"lr": t.lr, "betas": (t.adam_beta1, t.adam_beta2), "weight_decay": t.weight_decay}
    if t.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, eps=t.adam_epsilon, **kw)
    if t.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, eps=t.adam_epsilon, **kw)  # lr is Prodigy's multiplier: 1.0 as its authors advise
    return torch.optim.AdamW(params, eps=t.adam_epsilon, **kw)


class Ema:
    """Exponential moving average of the trainable weights; the saved LoRA holds the average when enabled."""

    def __init__(self, params: list, decay: float) -> None:
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]

    def update(self) -> None:
        import torch

        with torch.no_grad():
            for s, p in zip(self.shadow, self.params, strict=True):
                s.mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)

    def tensors(self) -> dict[str, Any]:
        return {f"ema.{i}": s for i, s in enumerate(self.shadow)}

    def load(self, tensors: dict[str, Any]) -> None:
        for i, s in enumerate(self.shadow):
            s.copy_(tensors[f"ema.{i}"])

    def swapped(self) -> Any:
        """A context in which the params hold the average (for writing the LoRA)."""
        import contextlib

        @contextlib.contextmanager
        def swap():
            import torch

            with torch.no_grad():
                saved = [p.detach().clone() for p in self.params]
                for p, s in zip(self.params, self.shadow, strict=True):
                    p.copy_(s)
                try:
                    yield
                finally:
                    for p, s in zip(self.params, saved, strict=True):
                        p.copy_(s)

        return swap()
