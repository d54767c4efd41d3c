"""The merge engine: an adapter set's weight changes written into the base weights on switch, restored exactly.

Why merge: a merged adapter costs nothing per denoising step (an unmerged peft LoRA adds two matmuls per targeted
layer per step), every LoRA set runs the same code path (torch.compile does not recompile per set), and formats
peft cannot stack (LyCORIS LoHa/LoKr, DoRA from A1111's point of view) become one more kind of `Delta`.

Exactness: every touched weight keeps a pristine copy taken before any merge. A switch restores the touched
weights from those copies and adds the new set's changes in a fixed order, in float32, so a weight depends only
on the active set — never on the sets before it — and an empty set (or scale 0) is the base weight bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)
Block = Callable[[str], float] | None  # per-module multiplier (LoRA block weights); None = 1.0 everywhere
BIAS = "#bias"  # a Delta path ending in this changes the module's bias (LyCORIS `full`'s `diff_b`), not its weight


class Delta(Protocol):
    """The change one adapter makes to one base weight at multiplier 1.0 (same shape as `base`)."""

    def __call__(self, base: Any) -> Any: ...


@dataclass(frozen=True)
class PeftDelta:
    """A peft LoRA layer's change for one adapter, from its own factors at unit scale (alpha/rank applied).

    Plain linear LoRAs are multiplied out in float32 here; other layer kinds (conv, embedding) use peft's
    `get_delta_weight`. A DoRA layer's change is its decomposed weight minus the base (A1111's order: decompose
    the full change, then scale it linearly).
    """

    layer: Any  # peft BaseTunerLayer
    adapter: str

    def _unit(self) -> float:
        import math

        layer, a = self.layer, self.adapter
        rank = layer.r[a]
        return layer.lora_alpha[a] / (math.sqrt(rank) if layer.use_rslora.get(a, False) else rank)

    def __call__(self, base: Any) -> Any:
        import torch

        layer, a = self.layer, self.adapter
        if a in getattr(layer, "lora_A", {}) and isinstance(layer.get_base_layer(), torch.nn.Linear):
            delta = layer.lora_B[a].weight.float() @ layer.lora_A[a].weight.float()
            delta = (delta.T if layer.fan_in_fan_out else delta) * self._unit()
        else:
            saved = layer.scaling[a]
            layer.scaling[a] = self._unit()
            try:
                delta = layer.get_delta_weight(a).float()
            finally:
                layer.scaling[a] = saved
        if getattr(layer, "use_dora", {}).get(a, False):
            magnitude = layer.lora_magnitude_vector[a]
            merged = base.float() + delta
            norm = magnitude.get_weight_norm(base.float(), delta, scaling=1).detach()
            factor = (magnitude.weight.float() / norm).view(-1, *([1] * (merged.dim() - 1)))
            delta = factor * merged - base.float()
        return delta.reshape(base.shape)


def peft_deltas(pipe: Any, adapter: str, components: dict[str, Any]) -> dict[str, Delta]:
    """Every module path (component first) carrying peft adapter `adapter`, with its `PeftDelta`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out: dict[str, Delta] = {}
    for comp, model in components.items():
        for name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer) and (
                    adapter in getattr(module, "lora_A", {}) or adapter in getattr(module, "lora_embedding_A", {})):
                out[f"{comp}.{name}"] = PeftDelta(module, adapter)
    return out


def _weight(pipe: Any, path: str) -> Any:
    """The base weight parameter of the module at `path` (a peft layer's base layer's weight; its bias for a
    path ending in `BIAS`)."""
    comp, _, rest = path.removesuffix(BIAS).partition(".")
    module = getattr(pipe, comp).get_submodule(rest)
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return base.bias if path.endswith(BIAS) else base.weight


class MergeEngine:
    """Registered adapters' `Delta`s per module path, pristine copies of the weights they touch, and `apply`."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.adapters: dict[str, dict[str, Delta]] = {}
        self._pristine: dict[str, Any] = {}  # path -> exact copy of the weight before any merge
        self._params: dict[str, Any] = {}  # path -> the live weight parameter
        self._applied: tuple = ()  # ((adapter, scale, block), ...) now written into the weights
        self.after_apply: list[Callable[[], None]] = []  # e.g. refresh fused QKV projections

    @property
    def applied(self) -> tuple[str, ...]:
        """Adapters whose changes are in the weights now."""
        return tuple(a for a, _, _ in self._applied)

    def register(self, adapter: str, deltas: dict[str, Delta]) -> None:
        """Add an adapter's changes; copies each newly touched weight (no registered adapter has changed it yet)."""
        if not deltas:
            raise ValueError(f"adapter {adapter} changes no weight")
        for path in deltas:
            if path not in self._pristine:
                param = _weight(self.pipe, path)
                self._params[path] = param
                self._pristine[path] = param.detach().clone()
        self.adapters[adapter] = dict(deltas)

    def forget(self, adapter: str) -> None:
        """Drop an adapter (taking its changes out of the weights first); free copies nobody needs any more."""
        if adapter not in self.adapters:
            return
        if adapter in self.applied:
            self.apply([entry for entry in self._applied if entry[0] != adapter])
        del self.adapters[adapter]
        used = {p for deltas in self.adapters.values() for p in deltas}
        for path in [p for p in self._pristine if p not in used]:
            del self._pristine[path], self._params[path]

    def apply(self, active: Sequence[tuple[str, float, Block]]) -> None:
        """Make the weights base + the sum of `active`'s changes (in order, float32); a no-op if already so."""
        import torch

        wanted = tuple((a, float(s), b) for a, s, b in active if s != 0)
        unknown = [a for a, _, _ in wanted if a not in self.adapters]
        if unknown:
            raise KeyError(f"adapter {unknown[0]} is not registered")
        if wanted == self._applied:
            return
        touched = {p for a, _, _ in (*self._applied, *wanted) for p in self.adapters[a]}
        with torch.no_grad():
            for path in sorted(touched):
                base = self._pristine[path]
                terms = [(s * (b(path.removesuffix(BIAS)) if b else 1.0), self.adapters[a][path]) for a, s, b in wanted
                         if path in self.adapters[a]]
                terms = [(s, d) for s, d in terms if s != 0]
                param = self._params[path]
                if not terms:
                    param.copy_(base)
                    continue
                acc = base.float()
                for scale, delta in terms:
                    acc = acc + scale * delta(base).to(acc.device)
                param.copy_(acc.to(param.dtype))
        self._applied = wanted
        for hook in self.after_apply:
            hook()
