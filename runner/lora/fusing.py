"""An AdapterManager that merges the active LoRA set into the base weights (`perf.fuse_lora`)."""

from __future__ import annotations

from .adapters import AdapterManager
from .files import ResolvedLora


class FusingAdapterManager(AdapterManager):
    """Like AdapterManager, but merges the active set into the base weights (`fuse_lora`) per group.

    A merged LoRA costs nothing per step, and the UNet's Python code path (what torch.compile guards on) is
    the same for every LoRA set, so switching sets does not recompile. The no-LoRA set runs unmerged.
    """

    fused: bool = False
    _pristine: dict | None = None  # id(base layer) -> (layer, exact copy of its weight before any merge)

    def _lora_base_layers(self) -> list:
        from peft.tuners.tuners_utils import BaseTunerLayer

        parts = [getattr(self.pipe, n, None) for n in ("unet", "text_encoder", "text_encoder_2")]
        return [m.get_base_layer() for part in parts if part is not None
                for m in part.modules() if isinstance(m, BaseTunerLayer)]

    def _snapshot(self) -> None:
        """Keep an exact copy of every LoRA-targeted base weight not copied yet (called while unmerged)."""
        if self._pristine is None:
            self._pristine = {}
        for layer in self._lora_base_layers():
            if id(layer) not in self._pristine:
                self._pristine[id(layer)] = (layer, layer.weight.detach().clone())

    def unfuse(self) -> None:
        """Undo the merge exactly: peft's unmerge subtracts (float rounding drifts), so restore the copies."""
        if self.fused:
            self.pipe.unfuse_lora()
            for layer, weight in (self._pristine or {}).values():
                layer.weight.data.copy_(weight)
            self.fused = False

    def activate(self, loras: tuple[ResolvedLora, ...], weights: tuple[float, ...]) -> None:
        self.unfuse()
        super().activate(loras, weights)
        if loras and any(w != 0 for w in weights):
            self._snapshot()
            self.pipe.fuse_lora(adapter_names=[r.adapter for r in loras], lora_scale=1.0)
            self.fused = True
