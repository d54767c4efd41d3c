"""LoRA adapters: load each file once per process into a pipeline, activate sets by weight, evict LRU."""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

from ..common.errors import ConfigError, first_line
from ..common.hashing import file_sha256
from ..common.paths import is_safetensors
from .detect import check_base, detect_state, read_header
from .files import ResolvedLora, read_state_dict
from .lycoris import check_finite, file_deltas
from .merge import Block, MergeEngine, peft_deltas

log = logging.getLogger(__name__)
_DOWN = re.compile(r"(lora_A|lora\.down|lora_down|lora_linear_layer\.down|lora_embedding_A)$")
_SIZE = re.compile(r"size mismatch for (\S+?): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) from "
                   r"checkpoint, the shape in current model is torch\.Size\(\[([\d, ]*)\]\)")
_UNEXPECTED = re.compile(r"unexpected keys found in the model: ([^,\s]+)")


@contextlib.contextmanager
def _captured_diffusers_log() -> Iterator[list[str]]:
    """Collect diffusers' warnings (e.g. unmatched keys) instead of printing them; hide peft's chatter."""
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("diffusers")
    saved = (logger.level, logger.propagate, logger.handlers[:])
    logger.handlers, logger.propagate = [_Collect()], False
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"peft\.")
            yield messages
    finally:
        logger.level, logger.propagate, logger.handlers = saved[0], saved[1], saved[2]


def _mismatch(r: ResolvedLora, text: str) -> str | None:
    """A one-line explanation of a shape mismatch in a load error, or None."""
    found = _SIZE.findall(text)
    if not found:
        return None
    key, got, need = found[0]
    key = re.sub(r"\.(lora_[AB]|lora_embedding_[AB])\.[^.]+\.weight$", r".\1.weight", key)
    return (f"{r.file} is not a LoRA for this model: {len(found)} layer(s) have other shapes, e.g. {key} is "
            f"[{got}] in the file but [{need}] in the model (a LoRA for another base model, "
            "e.g. SDXL on SD 1.5?)")


def _copied(state: dict) -> dict:
    return {k: v.clone() if hasattr(v, "clone") else v for k, v in state.items()}


def _alphas_baked(state: dict, info: Any) -> dict:
    """A kohya file whose modules have different alphas (or some none): each module's alpha/rank multiplied into
    its `lora_up` (copies) and the `.alpha`s dropped, so every module gets its own scale as A1111 and kohya read it
    (no alpha: alpha = rank). diffusers gives the SD UNet one alpha per file and, for a module without one, the
    file's most common alpha."""
    alphas = {m.alpha for m in info.modules.values()}
    if len(alphas) <= 1:
        return state  # one alpha everywhere (or none): diffusers' reading is A1111's
    out = dict(state)
    for key, m in info.modules.items():
        up = key + ".lora_up.weight"
        if m.kind in ("lora", "locon") and "mid" not in m.roles and up in state and m.rank:
            out[up] = state[up] * (m.alpha / m.rank if m.alpha is not None else 1.0)
            out.pop(key + ".alpha", None)
    return out


def _peft_scales_baked(state: dict, info: Any) -> dict:
    """A peft-keys file with its peft config in the metadata (diffusers' `save_lora_weights`): each LoRA module's
    alpha/r (`detect.peft_scales`) multiplied into its up factor (copies). diffusers reads that config only from a
    file, and this loader hands it a state dict, for which diffusers takes alpha = rank."""
    from .detect import SUFFIXES

    ups = [s for s, (kind, role) in SUFFIXES.items() if kind == "lora" and role == "up"]
    out = dict(state)
    for key, m in info.modules.items():
        if m.scale is None or m.scale == 1.0 or m.kind not in ("lora", "locon"):
            continue
        for suffix in ups:
            if f"{key}.{suffix}" in state:
                out[f"{key}.{suffix}"] = state[f"{key}.{suffix}"] * m.scale
    return out


def _short(info: Any, expected: dict[str, list[str]], pipe: Any) -> str | None:
    """A component of the file with fewer layers after diffusers' conversion than modules in the file (diffusers
    drops what it cannot convert, e.g. Flux.1 T5 keys `lora_te3_…`, at INFO level; Flux.2's kohya converter its
    modulation layers), or None. A fused original-layout module (BFL `qkv`) counts as the model modules it splits
    into, so that the split cannot hide a dropped module."""
    from .kohya import Rows, module_index, module_path

    index = module_index(pipe) if info.layout in ("kohya", "BFL", "ai-toolkit") else {}
    have: dict[str, int] = {}
    for key, m in info.modules.items():
        target = module_path(index, key) if index else None
        have[m.component] = have.get(m.component, 0) + (len(target.parts) if isinstance(target, Rows) else 1)
    for comp, n in have.items():
        names = ("unet", "transformer") if comp == "denoiser" else (comp,)
        if sum(len(expected.get(c, [])) for c in names) < n:
            return comp
    return None


class AdapterManager:
    """Loads each adapter once into a pipeline and switches sets with `set_adapters` (base never reloaded)."""

    def __init__(self, pipe: Any, max_loaded: int = 8) -> None:
        self.pipe = pipe
        self.max_loaded = max_loaded
        self.loaded: OrderedDict[str, ResolvedLora] = OrderedDict()
        self.loads = 0  # adapter file loads (tests assert adapters are loaded once)
        self.active: tuple[str, ...] = ()  # adapters in effect now (peft-computed or merged)
        self.merge = False  # perf.fuse_lora: every adapter goes through the merge engine
        self.merge_only: set[str] = set()  # adapters only the merge engine can apply (e.g. LyCORIS)
        self._engine: MergeEngine | None = None

    @property
    def engine(self) -> MergeEngine:
        """The pipeline's merge engine (created on first use)."""
        if self._engine is None:
            self._engine = MergeEngine(self.pipe)
        return self._engine

    def _components(self) -> dict[str, Any]:
        names = getattr(self.pipe, "_lora_loadable_modules", ["unet", "text_encoder"])
        return {n: getattr(self.pipe, n) for n in names if getattr(self.pipe, n, None) is not None}

    def layers(self, adapter: str) -> dict[str, int]:
        """How many layers of each pipeline component carry `adapter`."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        counts = {}
        for comp, model in self._components().items():
            counts[comp] = sum(1 for m in model.modules() if isinstance(m, BaseTunerLayer) and (
                adapter in getattr(m, "lora_A", {}) or adapter in getattr(m, "lora_embedding_A", {})))
        return counts

    def _expected(self, r: ResolvedLora, state: dict) -> dict[str, list[str]]:
        """The LoRA layers the file holds per component, after diffusers' own format conversion."""
        unet = getattr(self.pipe, "unet", None)
        try:
            # SD-class loaders map SGM block names with the UNet config; transformer families take none
            kw = {"unet_config": unet.config} if unet is not None else {}
            # copies: diffusers' converters scale tensors in place (`*=`), and load_lora_weights converts again
            with _captured_diffusers_log():  # e.g. "Unsupported keys": `_short` sends such a file to the engine
                converted = type(self.pipe).lora_state_dict(_copied(state), **kw)
            converted = converted[0] if isinstance(converted, tuple) else converted
        except Exception as exc:  # noqa: BLE001 - diffusers' converters raise ValueError/KeyError/...
            raise ConfigError(f"{r.file} is not a LoRA diffusers can read ({first_line(exc, 200)})") from exc
        layers: dict[str, list[str]] = {}
        for key in converted:
            if _DOWN.search(key.removesuffix(".weight")):
                comp, _, rest = key.partition(".")
                layers.setdefault(comp, []).append(re.split(r"[._]lora[._]", rest)[0])
        return layers

    def _unmatched(self, comp: str, layers: list[str]) -> str | None:
        """A layer of the file whose parent module the model lacks (an example for the error), or None."""
        model = self._components().get(comp)
        if model is None:
            return None
        names = {n.removeprefix("text_model.") for n, _ in model.named_modules()}
        for layer in layers:
            parent = layer.rsplit(".", 1)[0].removesuffix(".processor").removeprefix("text_model.")
            if parent not in names:
                return f"{comp}.{layer}"
        return None

    def _load(self, r: ResolvedLora) -> None:
        if file_sha256(r.file) != r.sha256:
            raise ConfigError(f"LoRA file {r.file} changed since it was hashed; run again")
        # 1. What the file is: structure (pairs, ranks, known algorithm), family and base model, values.
        state = read_state_dict(r)
        info = detect_state(state, read_header(r.file)[2] if is_safetensors(r.file) else None)
        if not state or not (info.is_adapter or any("lora" in k or k.endswith(".alpha") for k in state)):
            raise ConfigError(f"{r.file} is not a LoRA file (no LoRA weights in it)")
        if info.is_adapter:
            why = info.problem()
            if why:
                raise ConfigError(f"{r.file} cannot be applied: {why}")
            check_base(info, self.pipe, r.file)
        check_finite(state, r.file)
        # 2. LyCORIS, Tucker LoCon and DoRA: Deltas for the merge engine (diffusers cannot apply them faithfully);
        # so is any file whose diffusers conversion drops modules (every module is applied, or the file refused),
        # and a kohya file diffusers' converters cannot place: they assume the published widths (Flux.1's BFL
        # layout: 3072) and know no kohya names for some families (SD3, Qwen-Image, Z-Image, Flux.2); the merge
        # engine maps the file's own module names onto this model's modules instead.
        if info.needs_merge:
            self._register_merge(r, state, info)
            return
        peft_state = _peft_scales_baked(_alphas_baked(state, info), info)
        try:
            expected = self._expected(r, peft_state)
        except ConfigError:
            if self._merged(r, state, info):  # e.g. a Flux kohya file whose CLIP-L part diffusers cannot read
                return
            raise
        kohya = info.is_adapter and info.layout == "kohya"
        if (kohya and (not expected or any(c not in self._components() for c in expected))) or \
                (info.is_adapter and _short(info, expected, self.pipe)):
            self._register_merge(r, state, info)
            return
        # 3. Everything else: diffusers' loader (with its own format conversions) into peft layers.
        with _captured_diffusers_log() as messages:
            try:
                self.pipe.load_lora_weights(peft_state, adapter_name=r.adapter)
            except Exception as exc:  # noqa: BLE001 - diffusers raises ValueError/RuntimeError/KeyError here
                msg = _mismatch(r, str(exc)) or f"{r.file} is not a LoRA for this model ({first_line(exc, 300)})"
                error = self._fail(r.adapter, msg)
                if self._merged(r, state, info):  # e.g. SD 1.x kohya files in LDM names (A1111 reads them)
                    return
                raise error from exc
        got = self.layers(r.adapter)
        missing = {c: len(v) - got.get(c, 0) for c, v in expected.items() if len(v) > got.get(c, 0)}
        if missing or not any(got.values()):
            absent = [c for c in missing if c not in self._components()]
            if absent:
                why = f"it has weights for {', '.join(absent)}, which this {type(self.pipe).__name__} lacks"
            else:
                total = sum(len(v) for v in expected.values())
                hit = next((h for c in missing if (h := self._unmatched(c, expected[c]))), None)
                hit = hit or next((m for text in messages for m in _UNEXPECTED.findall(text)), None)
                why = f"{sum(missing.values())} of its {total} LoRA layers match no layer of the model"
                why += f" (e.g. {hit})" if hit else ""
            msg = f"{r.file} is not a LoRA for this model: {why}; is it for another base model?"
            raise self._fail(r.adapter, msg)
        self.loads += 1
        log.info("loaded LoRA %s (%s) as %s: %s", r.name, r.file, r.adapter, got)

    def _register_merge(self, r: ResolvedLora, state: dict, info: Any) -> None:
        self.engine.register(r.adapter, file_deltas(self.pipe, state, info, r.file))
        self._loaded_merged(r, info)

    def _loaded_merged(self, r: ResolvedLora, info: Any) -> None:
        self.merge_only.add(r.adapter)
        self.loads += 1
        log.info("loaded %s %s (%s) as %s: %s", info.format, r.name, r.file, r.adapter, info.components)

    def _merged(self, r: ResolvedLora, state: dict, info: Any) -> bool:
        """A file diffusers' loader refuses, applied by the merge engine when it can place every module (as A1111
        does); False (the loader's error stands) when it cannot."""
        if not info.is_adapter:
            return False
        try:
            deltas = file_deltas(self.pipe, state, info, r.file)
        except ConfigError:
            return False
        self.engine.register(r.adapter, deltas)
        self._loaded_merged(r, info)
        return True

    def _forget(self, adapter: str) -> None:
        from diffusers import ModelMixin
        from diffusers.utils.peft_utils import delete_adapter_layers

        if self._engine is not None:
            self._engine.forget(adapter)  # its change leaves the weights before its factors go
        self.merge_only.discard(adapter)
        for model in self._components().values():
            try:
                with warnings.catch_warnings():  # peft warns when the deleted adapter was the active one
                    warnings.simplefilter("ignore")
                    if isinstance(model, ModelMixin):
                        model.delete_adapters([adapter])
                    else:
                        delete_adapter_layers(model, adapter)
            except Exception:  # noqa: BLE001 - a partly injected adapter may be missing in some components
                log.debug("could not delete adapter %s", adapter)
        self.loaded.pop(adapter, None)

    def _fail(self, adapter: str, msg: str) -> ConfigError:
        """Remove a half-loaded adapter and leave the pipeline with LoRA off; return the error to raise."""
        self._forget(adapter)
        if self.loaded:
            self.pipe.disable_lora()
        self.active = ()
        return ConfigError(msg)

    def ensure(self, loras: tuple[ResolvedLora, ...]) -> None:
        """Load any adapter of the set not loaded yet; evict least-recently-used ones beyond the cap."""
        for r in loras:
            if r.adapter in self.loaded:
                self.loaded.move_to_end(r.adapter)
                continue
            self._load(r)
            self.loaded[r.adapter] = r
        keep = {r.adapter for r in loras}
        for adapter in list(self.loaded):
            if len(self.loaded) <= max(self.max_loaded, len(keep)):
                break
            if adapter not in keep:
                self._forget(adapter)

    def preload(self, sets: Iterable[tuple[ResolvedLora, ...]]) -> None:
        """Load (and so check against the model) every adapter of `sets` before anything is written.

        Sets are loaded last-first, so with a cap the first sets used stay loaded; the pipeline is left
        with LoRA disabled until `activate`.
        """
        for loras in reversed(list(sets)):
            self.ensure(loras)
        if self.loaded:
            self.pipe.disable_lora()
        self.active = ()

    def activate(self, loras: tuple[ResolvedLora, ...], weights: tuple[float, ...],
                 blocks: tuple[Block, ...] | None = None) -> None:
        """Make exactly this set active at these weights; an empty or all-zero set is the base model.

        Merged adapters (all of them with `merge`, those only the engine can apply, and those with block
        weights: `blocks` holds each adapter's per-module multiplier or None) are written into the base weights
        by the merge engine; the rest are computed by peft. Loaded adapters outside the set are left out of
        peft's active list, so they are not computed. A weight-0 member of a mixed peft set stays in the list
        at scale 0 (its term is exactly zero).
        """
        self.ensure(loras)
        blocks = blocks or (None,) * len(loras)
        self.active = tuple(r.adapter for r in loras) if any(w != 0 for w in weights) else ()
        members = list(zip(loras, weights, blocks, strict=True))
        merged = [(r, w, b) for r, w, b in members if self.merge or r.adapter in self.merge_only or b is not None]
        computed = [(r, w) for r, w, b in members if (r, w, b) not in merged]
        if merged or self._engine is not None:
            engine = self.engine
            for r, _, _ in merged:
                if r.adapter not in engine.adapters:
                    engine.register(r.adapter, peft_deltas(self.pipe, r.adapter, self._components()))
            engine.apply([(r.adapter, w, b) for r, w, b in merged])
        if not self.loaded:
            return
        if not any(w != 0 for _, w in computed):
            self.pipe.disable_lora()
            return
        self.pipe.enable_lora()
        self.pipe.set_adapters([r.adapter for r, _ in computed], adapter_weights=[w for _, w in computed])
