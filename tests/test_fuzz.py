"""Fuzzing: random values for any config key only give a ConfigError; the server's JSON API never 500s."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.config import ConfigError, RunConfig, validate

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-10, max_value=2000),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["auto", "null", "euler", "fp16", "tiny", "builtin:tiny", "", " ", "../../etc/passwd",
                     "${oops}", "???", "true"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.text(max_size=12), st.integers(-3, 3),
                              st.sampled_from(["source", "scale", "prompt", "negative_prompt", "name"])),
                    inner, max_size=4),
), max_leaves=12)


def _leaves(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every key of the schema (dotted) with its declared type."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out.update(_leaves(t, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = t
    return out


KEYS = _leaves(RunConfig)


def _typed(t: Any) -> st.SearchStrategy:
    """Values of the declared type (so validation gets past the schema merge and into the checks)."""
    args = [a for a in typing.get_args(t) if a is not type(None)]
    base = args[0] if args else t
    simple = {bool: st.booleans(), int: st.integers(-5, 10**6), float: st.floats(allow_nan=False),
              str: st.text(max_size=20)}
    if base in simple:
        return st.one_of(st.none(), simple[base]) if args else simple[base]
    return values


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


configs = st.fixed_dictionaries(
    {}, optional={k: st.one_of(values, _typed(t)) for k, t in KEYS.items()}
).map(_nest)


@SETTINGS
@given(configs)
@pytest.mark.slow
def test_validate_raises_only_config_errors(cfg: dict) -> None:
    try:
        validate(cfg)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)


@SETTINGS
@given(st.dictionaries(st.text(max_size=15), values, max_size=4))
def test_unknown_keys_are_config_errors(cfg: dict) -> None:
    try:
        validate(cfg)
    except ConfigError as exc:
        assert "\n" not in str(exc)


def test_every_schema_key_is_fuzzed() -> None:
    assert {"steps", "seeds", "model.id", "model.dtype", "grid.max_size", "shard.index", "lora_sets",
            "nan_retry_fp32_vae"} <= set(KEYS)


@pytest.mark.parametrize("cfg", [{"verbose": "maybe"}, {"max_loaded_loras": "lots"}, {"stesp": 2},
                                 {"grid": {"max_size": [1]}}, {"model": {"idd": "x"}}])
def test_schema_merge_errors_are_one_line_config_errors(cfg: dict) -> None:
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert "\n" not in str(err.value)
    assert next(iter(cfg)) in str(err.value) or "model.idd" in str(err.value)


# --- the server's API: schemathesis against /openapi.json, in process ----------------------------------------

schemathesis = pytest.importorskip("schemathesis")


def _app(tmp: Path):
    from runner.server.app import compose_config, create_app

    cfg = compose_config(["model=tiny", f"server.output_dir={tmp / 'out'}", "server.max_steps=2",
                          "server.max_images=2", "server.max_side=64", "server.queue_size=4"])
    return create_app(cfg)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory):
    app = _app(tmp_path_factory.mktemp("fuzz-server"))
    app.state.queue.start()  # the in-process transport does not run the app's lifespan
    yield app
    app.state.queue.stop()


def _checker(operation: Any, statuses: list[int]):
    from hypothesis import Phase

    # a 5xx the operation documents is its answer (A1111's img2img: 501, this server is text-to-image only)
    documented = {str(k) for k in (operation.definition.raw.get("responses") or {})}

    @settings(max_examples=30, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(operation.as_strategy())
    def check(case: Any) -> None:
        resp = case.call()
        statuses.append(resp.status_code)
        assert resp.status_code < 500 or str(resp.status_code) in documented, \
            f"{operation.label}: {resp.status_code} {resp.text[:300]}"

    return check


def test_server_api_never_answers_500(api) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", api)
    statuses: list[int] = []
    labels = []
    for op in schema.get_all_operations():
        operation = op.ok()
        labels.append(operation.label)
        _checker(operation, statuses)()
    assert "POST /api/jobs" in labels and "POST /submit" in labels
    assert statuses and any(400 <= s < 500 for s in statuses)
