"""Rollout arithmetic and naming (the live rollback cases run against a real endpoint in tests/flows)."""

from __future__ import annotations

import pytest

from tasks.backends.base import DeploymentInfo, EndpointInfo, ModelVersion
from tasks.config import Settings
from tasks.rollout import (
    deployment_name,
    fresh_name,
    full_traffic,
    is_live,
    reconcile,
    retire_old,
    rollout_order,
    split_traffic,
    version_of,
)


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
    # After model-v3 was retired, a redeploy still sorts after model-v3-1, the one it replaces.
    assert fresh_name(_endpoint({"model-v3-1": 100}, {"model-v3-1": "ready"}), "3") == "model-v3-2"
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


class _Endpoint:
    """Just the three calls reconcile and retire_old make, recorded (the decisions are what is tested here; the
    real endpoint's side runs in tests/flows)."""

    def __init__(self, traffic: dict[str, int], states: dict[str, str]) -> None:
        self.traffic, self.states, self.deleted = dict(traffic), dict(states), []

    def get_endpoint(self) -> EndpointInfo:
        return _endpoint(self.traffic, self.states)

    def set_traffic(self, weights: dict[str, int]) -> None:
        self.traffic = {k: v for k, v in weights.items() if v}

    def delete_deployment(self, name: str) -> None:
        self.deleted.append(name)
        del self.states[name]


def test_reconcile_keeps_the_deployment_a_forced_redeploy_replaced_and_deletes_one_cut_short(tmp_path) -> None:
    settings = Settings.model_validate({"state_dir": str(tmp_path), "data": {"path": str(tmp_path / "chat.jsonl")}})
    champion = ModelVersion(name="m", version="3", source_job_id="job-3", uri="models:/m/3")
    # `--refresh deploy` finished: model-v3-1 took over from model-v3, which stays as the kept previous deployment.
    done = _Endpoint({"model-v3-1": 100}, {"model-v2": "ready", "model-v3": "ready", "model-v3-1": "ready"})
    assert not reconcile(done, champion, settings).changed and done.deleted == []
    assert retire_old(done, "model-v3-1", keep=1, settings=settings) == ["model-v2"]  # the newest old one stays
    # A redeploy cut short at 10%: the newer copy of the same version is the unfinished one.
    cut = _Endpoint(
        {"model-v3": 90, "model-v3-1": 10}, {"model-v3": "ready", "model-v3-1": "ready", "model-v4": "ready"}
    )
    report = reconcile(cut, champion, settings)
    assert cut.traffic == {"model-v3": 100} and sorted(cut.deleted) == ["model-v3-1", "model-v4"], report.actions
    assert (
        rollout_order("model-v3-2") == (3, 2) and rollout_order("model-v10") == (10, 0) and rollout_order("b") is None
    )
