"""LyCORIS maths against the reference implementation (`lycoris-lora`, `lycoris.functional`), not our own reading.

For every format (LoRA, LoCon incl. Tucker, LoHa incl. Tucker, LoKr with a low-rank and a full second factor, full
incl. `diff_b`, DoRA in A1111's per-input and LyCORIS' per-output layout) on the tiny SD 1.5, SDXL and Flux.1
models: the weights the runner merges at multiplier s equal W0 + s·ΔW with ΔW from `lycoris.functional`
(`locon/loha/lokr.diff_weight`, `weight_decompose` for DoRA), at s = 0, 0.5, 1, 2. A1111 scales every format's
change linearly (`network.py: finalize_updown`); so does LyCORIS for all but DoRA, whose multiplier LyCORIS
applies inside the decomposition: DoRA is compared at s = 1 and s = 0 (docs/differences-from-a1111.md).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch
from lora_zoo import lycoris_state, module_tensors
from safetensors.torch import save_file

lycoris_functional = pytest.importorskip("lycoris.functional")

from runner.common.hashing import file_sha256  # noqa: E402
from runner.lora.adapters import AdapterManager  # noqa: E402
from runner.lora.files import ResolvedLora  # noqa: E402

SCALES = (0.0, 0.5, 1.0, 2.0)
SD_KINDS = ("lora", "locon", "locon_tucker", "loha", "loha_tucker", "lokr", "lokr_full", "full", "full_diff_b",
            "dora_in", "dora_out")
DIT_KINDS = ("lora", "loha", "lokr", "lokr_full", "full", "full_diff_b", "dora_in", "dora_out")
ALPHA, RANK = 1.5, 2


def reference_delta(t: dict[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
    """ΔW at multiplier 1 by lycoris.functional, from one module's tensors (suffix -> tensor)."""
    f = lycoris_functional
    if "lora_down.weight" in t:
        down, up, mid = t["lora_down.weight"], t["lora_up.weight"], t.get("lora_mid.weight")
        return f.locon.diff_weight(down, up, mid, gamma=alpha / down.shape[0], backend="torch")
    if "hada_w1_a" in t:
        rank = t["hada_w1_b"].shape[0]
        return f.loha.diff_weight(t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], t.get("hada_t1"),
                                  t.get("hada_t2"), gamma=alpha / rank, backend="torch")
    if "lokr_w1" in t or "lokr_w1_a" in t:
        return f.lokr.diff_weight(t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b"), t.get("lokr_w2"),
                                  t.get("lokr_w2_a"), t.get("lokr_w2_b"), t.get("lokr_t2"), gamma=alpha,
                                  backend="torch")
    return t["diff"]


def reference_change(w0: torch.Tensor, t: dict[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
    """The change to `w0` at multiplier 1 (DoRA: the decomposed weight minus `w0`)."""
    delta = reference_delta(t, alpha).reshape(w0.shape).float()
    if "dora_scale" not in t:
        return delta
    wd_on_out = t["dora_scale"].shape[0] == w0.shape[0] and t["dora_scale"].shape[1] == 1
    merged = lycoris_functional.general.weight_decompose(w0.float() + delta, t["dora_scale"].float(), 1,
                                                         wd_on_out, backend="torch")
    return merged - w0.float()


def _dora(state: dict, key: str, w: torch.Tensor, per_out: bool, gen: torch.Generator) -> None:
    w0 = w.detach().float()
    if per_out:
        norm = w0.reshape(w0.shape[0], -1).norm(dim=1).reshape(w0.shape[0], *[1] * (w0.dim() - 1))
    else:
        norm = w0.transpose(0, 1).reshape(w0.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(w0.shape[1], *[1] * (w0.dim() - 1)).transpose(0, 1)
    state[f"{key}.dora_scale"] = norm * (1 + 0.2 * torch.rand(norm.shape, generator=gen))


def build_file(targets: dict[str, tuple[str, torch.Tensor, torch.nn.Module]], kind: str, seed: int
               ) -> tuple[dict, dict]:
    """(state dict, {path: (module, tensors by suffix, alpha)}) for one format over `targets`."""
    gen = torch.Generator().manual_seed(seed)
    base_kind = {"full_diff_b": "full", "dora_in": "lora", "dora_out": "lora"}.get(kind, kind)
    state: dict = {}
    modules: dict = {}
    for key, (path, w, module) in targets.items():
        if base_kind in ("lora", "loha", "lokr") and w.dim() == 4 and w.shape[2:] != (1, 1):
            continue  # conv layers: the conv kinds (locon, *_tucker) cover them
        tensors = module_tensors(base_kind, w.detach(), RANK, gen, 0.3)
        alpha = None if base_kind == "full" else ALPHA
        if alpha is not None:
            tensors["alpha"] = torch.tensor(alpha)
        if kind == "full_diff_b":
            if getattr(module, "bias", None) is None:
                continue
            tensors["diff_b"] = torch.randn(module.bias.shape, generator=gen) * 0.3
        for name, t in tensors.items():
            state[f"{key}.{name}"] = t.contiguous()
        if kind.startswith("dora"):
            _dora(state, key, w, kind == "dora_out", gen)
            tensors["dora_scale"] = state[f"{key}.dora_scale"]
        modules[path] = (module, tensors, alpha)
    return state, modules


def check(pipe, tmp: Path, targets: dict, kind: str) -> int:
    """Merge one file at every scale and compare each module with the reference; returns modules compared."""
    state, modules = build_file(targets, kind, seed=zlib.crc32(kind.encode()) % 1000)
    assert modules, kind
    path = tmp / f"{kind}.safetensors"
    save_file(state, str(path))
    r = ResolvedLora(kind, str(path), None, str(path), file_sha256(path))
    manager = AdapterManager(pipe)
    manager.merge = True  # plain LoRA files load into peft layers: the engine writes their change into the weights
    pristine = {p: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
                for p, (m, _, _) in modules.items()}
    scales = (0.0, 1.0) if kind.startswith("dora") else SCALES
    changes = {p: reference_change(pristine[p][0], tensors, alpha) for p, (_, tensors, alpha) in modules.items()}
    try:
        for s in scales:
            manager.activate((r,), (s,))
            for p, (m, tensors, _) in modules.items():
                w0, b0 = pristine[p]
                want = w0.float() + s * changes[p]
                torch.testing.assert_close(m.weight.detach().float(), want, rtol=1e-5, atol=2e-6,
                                           msg=lambda e, p=p, s=s: f"{kind} {p} at {s}: {e}")
                if "diff_b" in tensors:
                    torch.testing.assert_close(m.bias.detach().float(), b0.float() + s * tensors["diff_b"],
                                               rtol=1e-5, atol=2e-6)
                if s == 0:
                    assert torch.equal(m.weight, w0), f"{kind} {p}: scale 0 is not the base weight"
    finally:
        manager.activate((), ())
        manager._forget(r.adapter)
    for p, (m, _, _) in modules.items():
        assert torch.equal(m.weight, pristine[p][0])
    return len(modules)


def sd_targets(pipe, sdxl: bool) -> dict:
    from lora_zoo import targets

    out = {}
    for key, (path, w) in targets(pipe, conv=True, te=True, sdxl=sdxl).items():
        comp, _, rest = path.partition(".")
        out[key] = (path, w, getattr(pipe, comp).get_submodule(rest))
    return out


def flux_targets(pipe) -> dict:
    """The Flux.1 transformer's linear layers in LyCORIS' diffusers naming (`lycoris_transformer_blocks_0_…`)."""
    out = {}
    for name, m in pipe.transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith(("transformer_blocks", "single_transformer_blocks")):
            out["lycoris_" + name.replace(".", "_")] = (f"transformer.{name}", m.weight, m)
    return out


@pytest.fixture(scope="module")
def pipes(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from runner.models.tiny import build_tiny_pipeline
    from runner.models.tiny_families import build_flux1, build_sdxl

    return {"sd15": build_tiny_pipeline(tmp_path_factory.mktemp("ref-sd")),
            "sdxl": build_sdxl(tmp_path_factory.mktemp("ref-xl")),
            "flux1": build_flux1(tmp_path_factory.mktemp("ref-flux"))}


@pytest.mark.parametrize("kind", SD_KINDS)
def test_sd15_matches_lycoris(pipes, tmp_path: Path, kind: str) -> None:
    assert check(pipes["sd15"], tmp_path, sd_targets(pipes["sd15"], False), kind) > 0


@pytest.mark.parametrize("kind", SD_KINDS)
@pytest.mark.slow
def test_sdxl_matches_lycoris(pipes, tmp_path: Path, kind: str) -> None:
    assert check(pipes["sdxl"], tmp_path, sd_targets(pipes["sdxl"], True), kind) > 0


@pytest.mark.parametrize("kind", DIT_KINDS)
def test_flux1_matches_lycoris(pipes, tmp_path: Path, kind: str) -> None:
    assert check(pipes["flux1"], tmp_path, flux_targets(pipes["flux1"]), kind) > 0


def test_lycoris_state_helper_is_what_lycoris_reads(pipes) -> None:
    """The test files' tensor layout is LyCORIS' own: its loha/lokr modules rebuild the same ΔW from them."""
    state = lycoris_state(pipes["sd15"], "loha", rank=RANK, alpha=ALPHA, te=False)
    key = next(k for k in state if k.endswith("hada_w1_a")).removesuffix(".hada_w1_a")
    t = {k.removeprefix(key + "."): v for k, v in state.items() if k.startswith(key + ".")}
    ours = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * (ALPHA / RANK)
    torch.testing.assert_close(reference_delta(t, ALPHA).reshape(ours.shape), ours)
