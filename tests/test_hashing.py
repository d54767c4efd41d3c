"""A diffusers folder's model hash covers the components model_index.json names, and nothing else there."""

from __future__ import annotations

import json
from pathlib import Path

from runner.common.hashing import model_sha256


def _folder(root: Path, index: bool = True) -> Path:
    (root / "unet").mkdir(parents=True)
    (root / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"unet weights")
    if index:
        (root / "model_index.json").write_text(json.dumps({"_class_name": "X", "unet": ["diffusers", "U"]}))
    return root


def test_model_hash_is_its_components_weights(tmp_path: Path) -> None:
    model = _folder(tmp_path / "m")
    before = model_sha256(model)
    for extra in ("loras", "samples"):  # LoRAs or other files kept beside the components are no part of it
        (model / extra).mkdir()
        (model / extra / "style.safetensors").write_bytes(b"lora")
    assert model_sha256(model) == before
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"retrained unet")
    assert model_sha256(model) != before


def test_a_folder_without_an_index_hashes_every_subfolder(tmp_path: Path) -> None:
    model = _folder(tmp_path / "m", index=False)
    before = model_sha256(model)
    (model / "loras").mkdir()
    (model / "loras" / "x.safetensors").write_bytes(b"x")
    assert model_sha256(model) != before  # nothing says which folders are the model's: all of them
