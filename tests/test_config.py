"""Config validation: every bad value is a one-line ConfigError naming it and what is valid."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from runner.config import ConfigError, RunConfig, validate


def spec(**over):
    return validate(OmegaConf.merge(OmegaConf.structured(RunConfig), over))


def test_defaults_validate() -> None:
    s = spec()
    assert s.steps == (None,) and s.guidance_scale == (None,) and s.lora_sets == ((),)  # None = the model's default
    assert s.batch_size is None and s.device == "auto"


def test_prompts_strings_and_mappings() -> None:
    s = spec(prompts=["a", {"prompt": "b", "negative_prompt": "ugly"}], negative_prompt="blurry")
    assert [(p.prompt, p.negative_prompt) for p in s.prompts] == [("a", "blurry"), ("b", "ugly")]


def test_lists_for_sweep_keys() -> None:
    s = spec(steps=[2, 3], guidance_scale=[1, 7.5], scheduler=["euler", None], width=[32, 64])
    assert s.steps == (2, 3) and s.guidance_scale == (1.0, 7.5)
    assert s.scheduler == ("euler", None) and s.width == (32, 64) and s.height == (None,)


def test_lora_specs_normalised() -> None:
    s = spec(lora_sets=[[], ["some/dir"], [{"source": "x.safetensors", "weight_name": "null", "scale": 0.5}]])
    assert s.lora_sets[0] == ()
    assert s.lora_sets[1][0].source == "some/dir" and s.lora_sets[1][0].scale == 1.0
    assert s.lora_sets[2][0].weight_name is None and s.lora_sets[2][0].scale == 0.5


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"steps": 0}, "steps=0 is out of range"),
        ({"steps": -3}, "steps=-3"),
        ({"steps": 2.5}, "steps=2.5 is not an integer"),
        ({"steps": "many"}, "steps='many' is not an integer"),
        ({"steps": []}, "steps=[] is empty"),
        ({"width": 100}, "width=100 is not a multiple of 8"),
        ({"height": 0}, "height=0 is out of range"),
        ({"width": 100000}, "width=100000 is out of range"),
        ({"guidance_scale": -1}, "guidance_scale=-1"),
        ({"prompts": []}, "prompts=[] is empty"),
        ({"prompts": [""]}, "prompts[0] is empty"),
        ({"prompts": [{"prompt": "a", "negativ": "b"}]}, "prompts[0]="),
        ({"seeds": ["x"]}, "seeds='x' is not an integer"),
        ({"seeds": [-2]}, "seeds=-2 is out of range"),
        ({"scheduler": "eulr"}, "did you mean 'euler'"),
        ({"device": "tpu"}, "device='tpu' is not valid"),
        ({"model": {"dtype": "fp8"}}, "model.dtype='fp8'"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"lora_sets": [[{"source": "a", "scal": 1}]]}, "did you mean 'scale'"),
        ({"lora_sets": [[{"weight_name": "w.safetensors"}]]}, "source=None is missing"),
        ({"lora_sets": [[{"source": "a", "name": "x"}, {"source": "b", "name": "x"}]]}, "names adapter 'x' twice"),
        ({"lora_sets": [[{"source": "a", "weight_name": "../x.safetensors"}]]}, "not a plain file name"),
        ({"lora_scales": []}, "lora_scales=[] is empty"),
        ({"shard": {"index": 4, "count": 4}}, "shard.index=4 is out of range"),
    ],
)
def test_bad_values(over: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        spec(**over)
    msg = str(exc.value)
    assert needle in msg
    assert "\n" not in msg


def test_random_seed_minus_one_is_drawn_from_the_run_seed() -> None:
    from runner.plan import draw_seeds

    s = spec(seeds=[-1, 5, -1])
    assert s.seeds == (-1, 5, -1)  # drawn later, from the run seed (plan.draw_seeds)
    drawn = draw_seeds(s.seeds, 7)
    assert drawn[1] == 5 and all(0 <= d < 2**32 for d in drawn) and drawn[0] != drawn[2]
    assert draw_seeds([-1], 7) == drawn[:1] and draw_seeds(s.seeds, 8) != drawn


@pytest.mark.parametrize("path", ["config.yaml", "train.yaml", "server/default.yaml", "recipe/default.yaml"])
def test_default_values_live_only_in_the_schema(path: str) -> None:
    """conf/ picks groups; every default value is written once, in the structured schema (config/schema.py,
    train/config.py), so the YAML and the dataclasses cannot drift apart."""
    from runner.config.overrides import CONF_DIR

    assert set(OmegaConf.load(CONF_DIR / path) or {}) <= {"defaults"}


@pytest.mark.parametrize(("name", "schema_of", "groups"), [
    ("config", "runner.config.schema:RunConfig", {"model", "lora_sets"}),
    ("train", "runner.train.config:TrainRunConfig", {"model"}),
])
def test_composed_defaults_are_the_schema_defaults(name: str, schema_of: str, groups: set[str]) -> None:
    """What `t2i --cfg job` shows is the schema's defaults, but for what the default groups (model, lora) set."""
    import importlib

    from hydra import compose, initialize_config_dir

    from runner.config import register_configs
    from runner.config.overrides import CONF_DIR
    from runner.train.config import register_configs as register_train

    register_configs()
    register_train()
    module, _, cls = schema_of.partition(":")
    schema = OmegaConf.to_container(OmegaConf.structured(getattr(importlib.import_module(module), cls)))
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        composed = OmegaConf.to_container(compose(name))
    for key in groups:
        composed.pop(key), schema.pop(key)
    assert composed == schema
