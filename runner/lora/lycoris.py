"""LyCORIS (LoHa, LoKr, LoCon incl. Tucker, full) and DoRA files as `Delta`s for the merge engine (merge.py).

diffusers loads plain LoRA and LoCon files but not LoHa, LoKr, Tucker LoCon (`lora_mid`) or full-difference
modules, and it maps DoRA onto peft's DoRA, whose weight 0 is not the base model. Each module of such a file
becomes a `Delta`: the change to one base weight at multiplier 1.0, computed the way A1111's `extensions-builtin/
Lora/network_{lora,hada,lokr,full}.py` compute `updown` (alpha/rank scale included), and for DoRA decomposed
against the pristine weight first (`network.py: apply_weight_decompose`), so the multiplier scales the decomposed
change linearly and 0 is the base weight exactly.

Deltas return float32 on the base weight's device (the engine accumulates in float32).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..common.errors import ConfigError
from .detect import LoraInfo, Module, _split_key
from .kohya import Rows, module_index, module_path
from .merge import BIAS


def _f32(t: Any, base: Any) -> Any:
    import torch

    return t.to(device=base.device, dtype=torch.float32)


def _rebuild(up: Any, down: Any) -> Any:
    """`up @ down` with both flattened to matrices (A1111's `rebuild_conventional`)."""
    return up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)


def _cp(t: Any, wa: Any, wb: Any) -> Any:
    """Tucker/CP rebuild (A1111's `make_weight_cp`): t [r, r, k, k], wa [r, out], wb [r, in] -> [out, in, k, k]."""
    import torch

    return torch.einsum("i j k l, i p, j r -> p r k l", t, wa, wb)


@dataclass(frozen=True, eq=False)
class LoraDelta:
    """kohya LoRA / LoCon: up @ down (or the Tucker rebuild with `mid`) times alpha/rank."""

    up: Any
    down: Any
    mid: Any = None
    scale: float = 1.0

    def __call__(self, base: Any) -> Any:
        import torch

        up, down = _f32(self.up, base), _f32(self.down, base)
        if self.mid is not None:
            mid = _f32(self.mid, base)
            delta = torch.einsum("n m k l, i n, m j -> i j k l", mid, up.reshape(up.shape[0], -1),
                                 down.reshape(down.shape[0], -1))
        else:
            delta = _rebuild(up, down)
        return (delta * self.scale).reshape(base.shape)


@dataclass(frozen=True, eq=False)
class LohaDelta:
    """LoHa: (w1a @ w1b) ⊙ (w2a @ w2b) times alpha/rank; with `t1`/`t2` the Tucker rebuild of each factor."""

    w1a: Any
    w1b: Any
    w2a: Any
    w2b: Any
    t1: Any = None
    t2: Any = None
    scale: float = 1.0

    def __call__(self, base: Any) -> Any:
        w1a, w1b, w2a, w2b = (_f32(t, base) for t in (self.w1a, self.w1b, self.w2a, self.w2b))
        left = _cp(_f32(self.t1, base), w1a, w1b) if self.t1 is not None else _rebuild(w1a, w1b)
        right = _cp(_f32(self.t2, base), w2a, w2b) if self.t2 is not None else _rebuild(w2a, w2b)
        return (left.reshape(base.shape) * right.reshape(base.shape)) * self.scale


@dataclass(frozen=True, eq=False)
class LokrDelta:
    """LoKr: w1 ⊗ w2 (each factor full, `a @ b`, or for w2 a Tucker rebuild) times alpha/rank when a factor is
    low-rank, else 1 (A1111 and LyCORIS ignore alpha for two full factors)."""

    w1: Any = None
    w1a: Any = None
    w1b: Any = None
    w2: Any = None
    w2a: Any = None
    w2b: Any = None
    t2: Any = None
    scale: float = 1.0

    def __call__(self, base: Any) -> Any:
        import torch

        w1 = _f32(self.w1, base) if self.w1 is not None else _f32(self.w1a, base) @ _f32(self.w1b, base)
        if self.w2 is not None:
            w2 = _f32(self.w2, base)
        elif self.t2 is not None:
            w2 = _cp(_f32(self.t2, base), _f32(self.w2a, base), _f32(self.w2b, base))
        else:
            w2 = _f32(self.w2a, base) @ _f32(self.w2b, base)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return (torch.kron(w1, w2.contiguous()) * self.scale).reshape(base.shape)


@dataclass(frozen=True, eq=False)
class FullDelta:
    """LyCORIS `full`: the stored difference itself."""

    diff: Any

    def __call__(self, base: Any) -> Any:
        return _f32(self.diff, base).reshape(base.shape)


@dataclass(frozen=True, eq=False)
class DoraDelta:
    """DoRA: `inner`'s change, decomposed against the base weight (A1111's order: scale by alpha/rank, decompose,
    then the multiplier scales the result linearly, so multiplier 0 is the base weight).

    The norm is taken per input column (A1111, kohya/LyCORIS default) or per output row (peft's
    `lora_magnitude_vector`, LyCORIS `wd_on_out`), as the magnitude's shape says.
    """

    inner: Any
    magnitude: Any
    per_output: bool

    def __call__(self, base: Any) -> Any:
        w0 = base.float()
        merged = w0 + self.inner(base)
        extra = [1] * (merged.dim() - 1)
        if self.per_output:
            norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(merged.shape[0], *extra)
            magnitude = _f32(self.magnitude, base).reshape(merged.shape[0], *extra)
        else:
            cols = merged.transpose(0, 1)
            norm = cols.reshape(cols.shape[0], -1).norm(dim=1, keepdim=True).reshape(cols.shape[0], *extra)
            norm = norm.transpose(0, 1)
            magnitude = _f32(self.magnitude, base).reshape(norm.shape)
        return merged * (magnitude / norm) - w0


@dataclass(frozen=True, eq=False)
class RowsDelta:
    """The rows of a fused original-layout module's change that belong to one model module (BFL's fused `qkv`
    is diffusers' to_q, to_k, to_v): `inner` computed at the fused shape, then these row ranges."""

    inner: Any
    rows: int
    pieces: tuple[tuple[int, int], ...]

    def __call__(self, base: Any) -> Any:
        import torch

        full = self.inner(base.new_empty((self.rows, *base.shape[1:])))
        return torch.cat([full[a:b] for a, b in self.pieces]).reshape(base.shape)


def dora_per_output(magnitude_shape: tuple[int, ...], weight_shape: tuple[int, ...], peft: bool) -> bool:
    """Whether a DoRA magnitude is per output row (else per input column), from its shape.

    peft's `lora_magnitude_vector` is always per output; a kohya/LyCORIS `dora_scale` is `[1, in, 1, 1]` (A1111,
    per input) or `[out, 1, 1, 1]` (LyCORIS `wd_on_out`); a square ambiguous 1-D vector counts as per input.
    """
    if peft:
        return True
    out, inp = weight_shape[0], weight_shape[1]
    if len(magnitude_shape) >= 2:
        return magnitude_shape[0] == out and all(d == 1 for d in magnitude_shape[1:]) and not (
            magnitude_shape[0] == 1 and magnitude_shape[1] == inp)
    return len(magnitude_shape) == 1 and magnitude_shape[0] == out and out != inp


def _scale(alpha: float | None, rank: int | None) -> float:
    """A1111's `calc_scale`: alpha/rank when both are known, else 1."""
    return alpha / rank if alpha is not None and rank else 1.0


def module_delta(mod: Module, tensors: Mapping[str, Any], weight_shape: tuple[int, ...]) -> Any:
    """The `Delta` of one parsed module, given its tensors by role (`up`, `w1_a`, …, `dora`)."""
    t = tensors
    scale = mod.scale if mod.scale is not None else _scale(mod.alpha, mod.rank)
    if mod.kind in ("lora", "locon"):
        delta: Any = LoraDelta(t["up"], t["down"], t.get("mid"), scale)
    elif mod.kind == "loha":
        delta = LohaDelta(t["w1_a"], t["w1_b"], t["w2_a"], t["w2_b"], t.get("t1"), t.get("t2"), scale)
    elif mod.kind == "lokr":
        delta = LokrDelta(t.get("w1"), t.get("w1_a"), t.get("w1_b"), t.get("w2"), t.get("w2_a"), t.get("w2_b"),
                          t.get("t2"), scale)
    elif mod.kind == "full":
        delta = FullDelta(t["diff"])
    else:
        raise ValueError(f"module {mod.key}: no weights")
    if "dora" in t:
        magnitude = t["dora"]
        peft = t.get("dora_key", "").startswith("lora_magnitude_vector")
        delta = DoraDelta(delta, magnitude, dora_per_output(tuple(magnitude.shape), weight_shape, peft))
    return delta


def _grouped(state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Tensors by module key and role (`dora_key` keeps which DoRA key it was, for its orientation)."""
    from .detect import SUFFIXES

    out: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        split = _split_key(key)
        if split is None:
            continue
        mkey, suffix = split
        kind, role = SUFFIXES[suffix]
        slot = out.setdefault(mkey, {})
        if kind == "dora":
            slot["dora"], slot["dora_key"] = value, suffix
        elif kind not in ("meta", "unknown"):
            slot[role] = value
    return out


def _nonfinite(state: Mapping[str, Any]) -> str | None:
    import torch

    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return key
    return None


def check_finite(state: Mapping[str, Any], file: str) -> None:
    """NaN or inf weights are found at load (one line), not as a black image later."""
    bad = _nonfinite(state)
    if bad is not None:
        raise ConfigError(f"{file} has NaN or infinite values in {bad}; the file is damaged (re-download or "
                          "re-export it)")


def file_deltas(pipe: Any, state: Mapping[str, Any], info: LoraInfo, file: str) -> dict[str, Any]:
    """Every module path the file changes in `pipe`, with its `Delta`; ConfigError naming the first problem.

    Checks, in order: structure (pairs, ranks, unknown LyCORIS types), values (NaN/inf), that every module
    exists in the model, and that its change has the module's shape.
    """
    # 1. Structure and values, before anything touches the model.
    why = info.problem()
    if why:
        raise ConfigError(f"{file} cannot be applied: {why}")
    check_finite(state, file)
    # 2. Map every module to the model and check its shape.
    index = module_index(pipe)
    tensors = _grouped(state)
    deltas: dict[str, Any] = {}
    missing: list[str] = []
    wrong: list[tuple[str, tuple, tuple]] = []
    for mkey, mod in info.modules.items():
        target = module_path(index, mkey)
        if target is None:
            missing.append(mkey)
            continue
        have = mod.weight_shape() or ()
        if isinstance(target, Rows):  # one fused module of the file -> row ranges of several model modules
            if mod.dora:
                raise ConfigError(f"{file} cannot be applied: module {mkey} is DoRA on a fused projection, which "
                                  "cannot be split into the model's separate projections")
            for path, pieces in target.parts:
                need = tuple(_weight(pipe, path).shape)
                rows = sum(b - a for a, b in pieces)
                if not have or have[0] != target.rows or _numel(have) != target.rows * _numel(need[1:]) or \
                        rows != need[0]:
                    wrong.append((path, have, (target.rows, *need[1:])))
                    break
                deltas[path] = RowsDelta(module_delta(mod, tensors[mkey], (target.rows, *need[1:])), target.rows,
                                         pieces)
                if "diff_b" in mod.roles:
                    _check_bias(pipe, file, mkey, mod, path, rows)
                    deltas[path + BIAS] = RowsDelta(FullDelta(tensors[mkey]["diff_b"]), target.rows, pieces)
            continue
        need = tuple(_weight(pipe, target).shape)
        if not have or _numel(have) != _numel(need) or have[0] != need[0]:
            wrong.append((target, have, need))
            continue
        deltas[target] = module_delta(mod, tensors[mkey], need)
        if "diff_b" in mod.roles:  # A1111 (network_full.py) and LyCORIS add the stored bias change too
            _check_bias(pipe, file, mkey, mod, target, need[0])
            deltas[target + BIAS] = FullDelta(tensors[mkey]["diff_b"])
    # 3. One line for what does not fit.
    total = len(info.modules)
    if wrong:
        path, have, need = wrong[0]
        raise ConfigError(f"{file} is not a LoRA for this model: {len(wrong)} layer(s) have other shapes, e.g. "
                          f"{path} is {list(have)} in the file but {list(need)} in the model (a LoRA for another "
                          "base model?)")
    if missing:
        comps = sorted({mod.component for k, mod in info.modules.items() if k in missing} - set(index))
        if comps:
            raise ConfigError(f"{file} is not a LoRA for this model: it has weights for {', '.join(comps)}, which "
                              f"this {type(pipe).__name__} lacks; is it for another base model?")
        raise ConfigError(f"{file} is not a LoRA for this model: {len(missing)} of its {total} layers match no "
                          f"layer of the model (e.g. {missing[0]}); is it for another base model?")
    return deltas


def _weight(pipe: Any, path: str) -> Any:
    comp, _, rest = path.partition(".")
    return getattr(pipe, comp).get_submodule(rest).weight


def _check_bias(pipe: Any, file: str, mkey: str, mod: Module, path: str, rows: int) -> None:
    """A `diff_b` must meet a bias of its module's rows; A1111 would create a missing bias, which this runner
    refuses (the base model's module structure stays as loaded)."""
    comp, _, rest = path.partition(".")
    bias = getattr(getattr(pipe, comp).get_submodule(rest), "bias", None)
    diff_b = mod.roles["diff_b"]
    if bias is None or _numel(diff_b) != (mod.weight_shape() or (rows,))[0]:
        what = "has no bias" if bias is None else f"has a bias of {rows} values"
        raise ConfigError(f"{file} cannot be applied: module {mkey} has a bias change (diff_b) of shape "
                          f"{list(diff_b)}, but the model's {path} {what}")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
