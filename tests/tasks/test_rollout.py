"""Rollout arithmetic and naming (the live rollback cases run against a real endpoint in tests/flows)."""

from __future__ import annotations

import pytest

from tasks.backends.base import DeploymentInfo, EndpointInfo
from tasks.rollout import deployment_name, fresh_name, full_traffic, is_live, split_traffic, version_of


def _endpoint(traffic: dict[str, int], states: dict[str, str]) -> EndpointInfo:
    deployments = [DeploymentInfo(name, str(version_of(name)), state) for name, state in states.items()]
    return EndpointInfo("ep", "http://x/score", "http://x/v1", traffic, deployments)


@pytest.mark.parametrize("percent", [1, 10, 33, 50, 99, 100])
@pytest.mark.parametrize(
    "previous", [{"model-v1": 100}, {"model-v1": 70, "model-v2": 30}, {"a": 1, "b": 1, "c": 98}, {}]
)
def test_split_always_sums_to_100_and_gives_the_new_deployment_its_share(previous, percent) -> None:
    weights = split_traffic(previous, "model-v9", percent)
    assert sum(weights.values()) == 100
    assert weights["model-v9"] == (percent if previous else 100)
    assert all(v > 0 for v in weights.values())
    assert set(weights) <= set(previous) | {"model-v9"}


def test_split_keeps_the_old_proportions() -> None:
    assert split_traffic({"model-v1": 60, "model-v2": 40}, "model-v3", 50) == {
        "model-v1": 30,
        "model-v2": 20,
        "model-v3": 50,
    }


def test_names_carry_the_version_and_a_redeploy_gets_a_fresh_name() -> None:
    assert deployment_name("3") == "model-v3"
    assert version_of("model-v3") == 3 and version_of("model-v3-2") == 3
    assert version_of("blue") is None and version_of("model-vx") is None
    endpoint = _endpoint({"model-v3": 100}, {"model-v3": "ready", "model-v3-1": "ready"})
    assert fresh_name(endpoint, "3") == "model-v3-2"
    assert fresh_name(endpoint, "4") == "model-v4"
    # Azure ML deployment names need 3 to 32 characters, starting with a letter.
    assert 3 <= len(deployment_name("1")) <= 32 and deployment_name("1")[0].isalpha()


def test_live_means_all_traffic_on_a_ready_deployment_of_that_version() -> None:
    assert is_live(_endpoint({"model-v3": 100}, {"model-v3": "ready"}), "3")
    assert not is_live(_endpoint({"model-v3": 90, "model-v4": 10}, {"model-v3": "ready", "model-v4": "ready"}), "3")
    assert not is_live(_endpoint({"model-v3": 100}, {"model-v3": "creating"}), "3")
    assert not is_live(_endpoint({"model-v2": 100}, {"model-v2": "ready"}), "3")
    assert not is_live(None, "3")


def test_full_traffic_names_every_deployment() -> None:
    endpoint = _endpoint({"model-v1": 100}, {"model-v1": "ready", "model-v2": "ready"})
    assert full_traffic(endpoint, {"model-v2": 100}) == {"model-v1": 0, "model-v2": 100}
