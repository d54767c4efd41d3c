"""Planning: the product of axes, stable indices and names, batching groups, shards."""

from __future__ import annotations

from omegaconf import OmegaConf

from runner.common.paths import slug
from runner.config import RunConfig, validate
from runner.plan import batches, expand, shard


def plan(**over):
    return expand(validate(OmegaConf.merge(OmegaConf.structured(RunConfig), over)), "m")


def test_product_of_axes() -> None:
    jobs = plan(prompts=["a", "b"], seeds=[1, 2, 3], steps=[2, 4], lora_sets=[[], ["x"]])
    assert len(jobs) == 2 * 3 * 2 * 2
    assert [j.index for j in jobs] == list(range(len(jobs)))
    assert len({j.filename(j.index) for j in jobs}) == len(jobs)
    assert len({j.key for j in jobs}) == len(jobs)


def test_no_lora_set_not_repeated_per_scale() -> None:
    jobs = plan(prompts=["a"], seeds=[1], lora_sets=[[], ["x"]], lora_scales=[0.0, 0.5, 1.0])
    assert len(jobs) == 1 + 3
    assert [j.lora_scale for j in jobs if not j.loras] == [None]
    assert sorted(j.adapter_weights[0] for j in jobs if j.loras) == [0.0, 0.5, 1.0]


def test_keys_are_stable_and_content_based() -> None:
    a = plan(prompts=["a", "b"], seeds=[1, 2])
    b = plan(prompts=["b", "a"], seeds=[2, 1])
    assert {j.key for j in a} == {j.key for j in b}
    assert [j.key for j in a] == [j.key for j in plan(prompts=["a", "b"], seeds=[1, 2])]


def test_batches_group_same_settings_and_order_lora_sets() -> None:
    jobs = plan(prompts=["a", "b"], seeds=[1, 2, 3], lora_sets=[[], ["x"]], guidance_scale=[1, 7])
    out = list(batches(jobs, 4))
    for b in out:
        assert len({j.group_key for j in b}) == 1 and len(b) <= 4
    sets = [b[0].lora_set for b in out]
    assert sets == sorted(sets)  # each LoRA set is activated once
    assert sorted(j.index for b in out for j in b) == list(range(len(jobs)))


def test_shards_partition_the_plan() -> None:
    jobs = plan(prompts=["a", "b", "c"], seeds=list(range(7)))
    parts = [shard(jobs, i, 3) for i in range(3)]
    keys = [j.key for p in parts for j in p]
    assert sorted(keys) == sorted(j.key for j in jobs) and len(keys) == len(set(keys))


def test_slug_is_file_safe() -> None:
    assert slug("../../etc/passwd") == "etc-passwd"
    assert slug("Ünïcödé fox 🦊!") == "unicode-fox"
    assert slug("///") == "x"
    assert len(slug("a" * 500)) <= 40
