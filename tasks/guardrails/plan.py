"""Which traffic percentages a rollout moves through, from ``rollout.strategy``."""

from __future__ import annotations

from tasks.config import RolloutConfig


def traffic_plan(rollout: RolloutConfig) -> list[int]:
    """The new deployment's share at each step, strictly increasing and ending at 100.

    ``all_at_once``: ``[100]``; ``canary``: ``[canary_percent, 100]``; ``linear``: ``linear_steps`` equal steps
    (4 -> ``[25, 50, 75, 100]``); ``traffic_steps``: the explicit list.
    """
    if rollout.strategy == "all_at_once":
        return [100]
    if rollout.strategy == "canary":
        return [rollout.canary_percent, 100]
    if rollout.strategy == "linear":
        n = rollout.linear_steps
        # Rounded, then deduplicated: 3 steps -> 33, 67, 100.
        return sorted({round(100 * i / n) for i in range(1, n + 1)})
    return list(rollout.traffic_steps)


def bake_seconds(rollout: RolloutConfig, percent: int) -> float:
    """How long a step bakes: ``final_bake_s`` at 100% (the old deployment still exists), else ``bake_s``."""
    return rollout.final_bake_s if percent >= 100 else rollout.bake_s


__all__ = ["bake_seconds", "traffic_plan"]
