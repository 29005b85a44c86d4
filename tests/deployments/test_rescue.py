from __future__ import annotations

import pytest

from deployments.rescue import Rescue


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_only_unpinned_server_side_or_unadmitted_failures_of_the_candidate_are_rescued() -> None:
    rescue = Rescue(Clock())
    rescue.arm("model-v2", "model-v1", ttl_s=60)
    for status in (500, 502, 503, 408, 424, 429):
        assert rescue.target("model-v2", pinned=False, status=status) == "model-v1", status
    for status in (400, 401, 404, 413, 422):
        assert rescue.target("model-v2", pinned=False, status=status) is None, status
    assert rescue.target("model-v2", pinned=True, status=500) is None  # a pin asks for that deployment
    assert rescue.target("model-v1", pinned=False, status=500) is None  # the champion's own failures are real


def test_off_when_no_rollout_runs_and_it_ends_by_itself() -> None:
    clock = Clock()
    rescue = Rescue(clock)
    assert rescue.target("model-v2", pinned=False, status=500) is None
    rescue.arm("model-v2", "model-v1", ttl_s=60)
    clock.now += 59
    assert rescue.describe() == {"candidate": "model-v2", "champion": "model-v1", "expires_in_s": 1.0}
    clock.now += 1
    assert rescue.target("model-v2", pinned=False, status=500) is None and rescue.describe() is None
    rescue.arm("model-v2", "model-v1", ttl_s=60)
    rescue.disarm()
    assert rescue.plan is None
    with pytest.raises(ValueError, match="two deployments"):
        rescue.arm("model-v2", "model-v2", ttl_s=60)
