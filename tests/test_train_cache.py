"""t2i-train's latent and text-embedding caches: a run with the disk cache writes the same LoRA bytes as one
without; a second run reads every entry (no VAE or text-encoder call); a changed image recomputes only its own
entries; what cannot be cached (random crops, shuffled tags) is said in one line and trained uncached; each
family's `collate` of per-caption encodings equals the pipeline's own batch encoding."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from runner.common.errors import ConfigError

MODELS = {"sd15": "tiny", "sdxl": "tiny-sdxl", "flux1": "tiny-flux1", "sd3": "tiny-sd3",
          "qwenimage": "tiny-qwenimage", "zimage": "tiny-zimage", "flux2": "tiny-flux2"}


def _data(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rgb in {"red": (220, 30, 30), "blue": (30, 40, 220)}.items():
        im = Image.new("RGB", (40, 32), rgb)
        im.paste((255, 255, 255), (0, 0, 8, 32))  # not symmetric: a flip is another view
        im.save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {name} square, plain")
    return folder


def _cfg(family: str, data: Path, cache: Path | None, **data_over: object) -> dict:
    disk = {"cache_latents": True, "cache_text": True, "cache_dir": str(cache)} if cache else {}
    return {"model": {"id": f"builtin:{MODELS[family]}"},
            "data": {"dir": str(data), "resolution": 32, "flip": True, "caption_dropout": 0.3, **disk, **data_over},
            "lora": {"rank": 4, "name": "x"},
            "train": {"steps": 3, "lr": 1e-2, "batch_size": 2, "checkpoint_every": 3},
            "validation": {"prompts": []}, "progress": False}


class Calls:
    """Counts the frozen encoders' calls (VAE encodes, caption encodes) during a run."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from runner.train import families

        self.vae = self.text = 0
        vae_params, encode = families.TrainAdapter.vae_params, families.ADAPTERS

        def count_vae(adapter, pixels):
            self.vae += 1
            return vae_params(adapter, pixels)

        monkeypatch.setattr(families.TrainAdapter, "vae_params", count_vae)
        for cls in {c for c in encode.values()}:
            if "vae_params" in cls.__dict__:
                own = cls.__dict__["vae_params"]
                monkeypatch.setattr(cls, "vae_params", lambda a, p, own=own: (self._bump("vae"), own(a, p))[1])
            own_enc = cls.__dict__["encode"]
            monkeypatch.setattr(cls, "encode", lambda a, c, own=own_enc: (self._bump("text"), own(a, c))[1])

    def _bump(self, what: str) -> None:
        setattr(self, what, getattr(self, what) + 1)

    def take(self) -> tuple[int, int]:
        out = (self.vae, self.text)
        self.vae = self.text = 0
        return out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _same(a: Path, b: Path) -> bool:
    x, y = _weights(a), _weights(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("family", ["sd15", "qwenimage"])
@pytest.mark.slow
def test_cache_changes_nothing_and_is_read_back(family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    from runner.train.loop import train

    data, cache = _data(tmp_path / "data"), tmp_path / "cache"
    calls = Calls(monkeypatch)
    plain = train(_cfg(family, data, None), tmp_path / "plain")
    plain_calls = calls.take()
    cold = train(_cfg(family, data, cache), tmp_path / "cold")
    cold_calls = calls.take()
    warm = train(_cfg(family, data, cache), tmp_path / "warm")
    warm_calls = calls.take()
    assert _same(plain.lora_file, cold.lora_file) and _same(plain.lora_file, warm.lora_file)
    latents, texts = sorted((cache / "latents").iterdir()), sorted((cache / "text").iterdir())
    assert cold_calls == (len(latents), len(texts)) and len(latents) >= 2 and len(texts) >= 2
    assert plain_calls[0] == 3 * 2  # without the cache every view is encoded each time it is drawn
    assert warm_calls == (0, 0)  # every view and caption read from disk
    # another image (same name): only its own views are encoded again, and the new result differs; a truncated
    # entry is recomputed with one warning
    Image.new("RGB", (40, 32), (20, 200, 20)).save(data / "red.png")
    texts[0].write_bytes(texts[0].read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        again = train(_cfg(family, data, cache), tmp_path / "again")
    vae_calls, text_calls = calls.take()
    assert 1 <= vae_calls <= 2 and text_calls == 1 and not _same(again.lora_file, warm.lora_file)
    assert sum("is unreadable" in r.getMessage() for r in caplog.records) == 1
    assert len(list((cache / "latents").iterdir())) == len(latents) + vae_calls


def test_uncacheable_settings_train_uncached_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    from runner.train.loop import train

    data, cache = _data(tmp_path / "data"), tmp_path / "cache"
    with caplog.at_level(logging.WARNING):
        train(_cfg("sd15", data, cache, crop="random", shuffle_tags=True), tmp_path / "run")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data.cache_")]
    assert len(lines) == 2 and "crop=random" in lines[0] and "shuffle_tags" in lines[1]
    assert not cache.exists()


def test_unwritable_cache_dir_is_one_line(tmp_path: Path) -> None:
    from runner.train.loop import train

    data = _data(tmp_path / "data")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"data.cache_dir: the cache folder .*file/c cannot be written"):
        train(_cfg("sd15", data, tmp_path / "file" / "c"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("family", list(MODELS))
def test_collate_equals_the_pipelines_batch_encoding(family: str) -> None:
    from runner.train.config import validate_train
    from runner.train.families import make_adapter
    from runner.train.model import load_pipe

    spec = validate_train({"model": {"id": f"builtin:{MODELS[family]}"}, "data": {"dir": "."}})
    pipe, fam = load_pipe(spec)
    adapter = make_adapter(fam, pipe, "cpu", torch.float32)
    captions = ["a red square", "a big blue square with white dots, plain background", ""]
    with torch.no_grad():
        batch = adapter.encode(captions)
        joined = adapter.collate([adapter.encode([c]) for c in captions])
    assert batch.keys() == joined.keys()
    for k, v in batch.items():
        w = joined[k]
        if v is None or w is None:
            assert v is None and w is None, k
        elif isinstance(v, list):
            assert len(v) == len(w) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(v, w, strict=True)), k
        else:
            assert v.shape == w.shape and v.dtype == w.dtype and torch.allclose(v.float(), w.float(), atol=1e-5), k
