from __future__ import annotations

import pytest

from tasks.config import ConfigError, RolloutConfig, load_config
from tasks.guardrails.plan import bake_seconds, traffic_plan


@pytest.mark.parametrize(
    ("fields", "plan"),
    [
        ({"strategy": "all_at_once"}, [100]),
        ({"strategy": "canary", "canary_percent": 5}, [5, 100]),
        ({"strategy": "linear", "linear_steps": 4}, [25, 50, 75, 100]),
        ({"strategy": "linear", "linear_steps": 3}, [33, 67, 100]),
        ({"strategy": "linear", "linear_steps": 1}, [100]),
        ({"traffic_steps": [20, 100]}, [20, 100]),
        ({}, [10, 50, 100]),
    ],
)
def test_each_strategy_gives_increasing_steps_ending_at_100(fields: dict, plan: list[int]) -> None:
    assert traffic_plan(RolloutConfig(**fields)) == plan


def test_the_final_step_bakes_for_final_bake_s() -> None:
    rollout = RolloutConfig(strategy="canary", bake_s=30, final_bake_s=60)
    assert [bake_seconds(rollout, p) for p in traffic_plan(rollout)] == [30, 60]


def test_a_canary_of_100_percent_is_refused_with_the_field_named(tmp_path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("data: {path: x.jsonl}\nrollout: {strategy: canary, canary_percent: 100}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"rollout\.canary_percent"):
        load_config(config)
