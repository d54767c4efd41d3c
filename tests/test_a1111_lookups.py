"""LoRA lookups and names where A1111 succeeds (issue 24): aliases (`ss_output_name`), upper-case extensions hashed
as safetensors (AutoV3), `Lora hashes` for names with `,` or `:`, and A1111's `dyn` tag argument refused with
its documented reason."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from runner.common.errors import ConfigError
from runner.common.hashing import addnet_sha256
from runner.config import LoraSpec
from runner.lora.files import find_in_lora_dirs, resolve_lora
from runner.outputs.metadata import infotext, parse_infotext
from runner.prompt.syntax import split_tags


def _lora(path: Path, metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 4), "lora_unet_x.lora_up.weight": torch.ones(4, 2)},
              str(path), metadata=metadata or {})
    return path


def _payload_sha256(path: Path) -> str:
    """A1111's `addnet_hash_safetensors`: the bytes after the 8-byte length and the JSON header."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()


def test_alias_is_found_by_ss_output_name(tmp_path: Path) -> None:
    f = _lora(tmp_path / "loras" / "pixel_art_v3-000010.safetensors", {"ss_output_name": "pixelart"})
    assert find_in_lora_dirs([str(tmp_path / "loras")], "pixelart") == f
    assert find_in_lora_dirs([str(tmp_path / "loras")], "pixel_art_v3-000010") == f
    assert find_in_lora_dirs([str(tmp_path / "loras")], "other") is None


def test_upper_case_extension_is_hashed_as_safetensors(tmp_path: Path) -> None:
    f = _lora(tmp_path / "loras" / "Style.SAFETENSORS", {"note": "metadata does not change AutoV3"})
    assert addnet_sha256(f) == _payload_sha256(f)
    assert resolve_lora(LoraSpec(str(f))).autov3 == _payload_sha256(f)[:12]
    assert find_in_lora_dirs([str(tmp_path / "loras")], "Style") == f


def _rec(name: str) -> dict:
    return {"prompt": "a fox", "negative_prompt": "", "steps": 2, "sampler": "Euler", "guidance_scale": 7.0,
            "seed": 1, "width": 64, "height": 64, "model": {"name": "tiny", "hash": "0" * 64}, "versions": {},
            "loras": [{"name": name, "scale": 0.8, "sha256": "a" * 64, "autov3": "b" * 12},
                      {"name": "plain", "scale": 1.0, "sha256": "c" * 64, "autov3": "d" * 12}]}


@pytest.mark.parametrize("name", ["style, v2", "style:v2", "a,b:c"])
def test_lora_hashes_of_names_with_separators_read_back(name: str) -> None:
    parsed = parse_infotext(infotext(_rec(name)))
    assert parsed["Lora hashes"] == {name.replace(",", "").replace(":", ""): "b" * 12, "plain": "d" * 12}


@pytest.mark.parametrize("tag", ["<lora:x:1:1:8>", "<lora:x:1:dyn=8>"])
def test_dyn_is_refused_with_its_reason(tag: str) -> None:
    with pytest.raises(ConfigError, match="dyn.*dynamic rank.*differences-from-a1111"):
        split_tags(f"a fox {tag}")


@pytest.mark.parametrize(("prompt", "why"), [("a fox <lora:x:0.5:1>", "different weights"),
                                             ("a fox <lora:x:0.5> <lora:x:0.7>", "two tags for LoRA 'x'")])
def test_documented_tag_refusals(tmp_path: Path, prompt: str, why: str) -> None:
    """Rows of docs/differences-from-a1111.md: one weight per tag, one tag per LoRA."""
    from runner.config import validate
    from runner.lora.tags import resolve_tags

    _lora(tmp_path / "loras" / "x.safetensors")
    spec = validate({"model": {"id": "tiny"}, "prompts": [prompt], "lora_dirs": [str(tmp_path / "loras")]})
    with pytest.raises(ConfigError, match=why):
        resolve_tags(spec)


def test_other_network_tags_are_removed_with_a_warning(caplog) -> None:
    import logging

    with caplog.at_level(logging.WARNING):
        text, tags = split_tags("a fox <hypernet:anime:1>")
    assert "<hypernet" not in text and not tags
    assert any("hypernet" in r.getMessage() for r in caplog.records)


def test_hash_in_sshs_model_hash_metadata_counts_as_the_file_hash(tmp_path: Path) -> None:
    """A1111 writes a file's `sshs_model_hash` metadata as its hash, stale or not: that hash finds the file."""
    f = _lora(tmp_path / "loras" / "renamed.safetensors", {"sshs_model_hash": "0123456789ab" + "0" * 52})
    assert find_in_lora_dirs([str(tmp_path / "loras")], None, "0123456789ab") == f


def test_from_image_falls_back_to_the_name_when_no_hash_matches(tmp_path: Path, caplog) -> None:
    import logging

    from runner.reproduce.from_image import foreign_loras

    f = _lora(tmp_path / "loras" / "style.safetensors")
    rec = {"prompt": "a fox <lora:style:0.6>", "loras": [{"name": "style", "sha256": "deadbeef0000", "scale": None}]}
    with caplog.at_level(logging.WARNING):
        (found,) = foreign_loras(rec, [str(tmp_path / "loras")])
    assert found == {"source": str(f), "name": "style", "scale": 0.6}
    assert any("found by name" in r.getMessage() for r in caplog.records)
