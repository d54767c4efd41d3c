"""A1111's behaviour as test vectors (tests/data/a1111_vectors.json: which file and function each area came from):
the attention parser's outputs and the hashes A1111 writes (`Model hash` AutoV2, `Lora hashes` AutoV3)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from runner.common.hashing import addnet_sha256, autov2, file_sha256
from runner.prompt.syntax import parse_attention

VECTORS = json.loads((Path(__file__).parent / "data" / "a1111_vectors.json").read_text())


def test_vector_counts() -> None:
    """Every area has its vectors and says where they came from."""
    assert {k: len(VECTORS[k]) for k in VECTORS["sources"]} == {"parser": 206, "hashes": 24}
    assert all(s["file"].startswith("modules/") for s in VECTORS["sources"].values())


@pytest.mark.parametrize("vector", VECTORS["parser"], ids=lambda v: repr(v["prompt"])[:40])
def test_parser_matches_a1111(vector: dict) -> None:
    got = [list(pair) for pair in parse_attention(vector["prompt"])]
    want = vector["parsed"]
    assert [t for t, _ in got] == [t for t, _ in want]
    assert all(math.isclose(g, w, rel_tol=1e-12) for (_, g), (_, w) in zip(got, want, strict=True)), (got, want)


@pytest.mark.parametrize("vector", VECTORS["hashes"], ids=lambda v: v["file"])
def test_hashes_match_a1111(vector: dict, tmp_path: Path) -> None:
    header = vector["header"].encode()
    f = tmp_path / vector["file"]
    f.write_bytes(len(header).to_bytes(8, "little") + header + bytes.fromhex(vector["payload_hex"]))
    sha = file_sha256(f)
    assert sha == vector["sha256"]
    assert autov2(sha) == vector["autov2"]
    assert addnet_sha256(f)[:12] == vector["autov3"]
