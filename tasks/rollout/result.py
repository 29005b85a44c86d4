"""What a rollout did and what its rollback left: the records the run summary shows, and the failure."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from tasks.backends.base import Backend, BackendError
from tasks.rollout.traffic import live_traffic

CHAMPION = "champion"


class RolloutFailed(BackendError):
    """The new deployment failed a check; traffic and alias were restored.

    Raised by :func:`run_rollout` with ``rollout`` set: what the rollout did up to the failure and what the
    rollback left (``rollout.rollback``), so a failed run's summary can say so. An attribute, not an ``__init__``
    argument, so the exception still pickles (Prefect stores it as the failed state's result)."""

    rollout: RolloutResult | None = None


@dataclass
class Rollback:
    """The endpoint and the alias as read back after the ``on_rollback`` hooks ran, not as the hooks meant them."""

    traffic: dict[str, int] | None  # live weights; None when the endpoint could not be read
    deployments: list[str]  # the endpoint's deployments after the rollback
    champion: str | None  # the version the champion alias points at (None: no champion)
    error: str | None = None  # why the state could not be read back


def read_rollback(backend: Backend) -> Rollback:
    """What a failed rollout left. Never raises: the flow must still fail with the rollout's reason."""
    try:
        endpoint = backend.get_endpoint()
        champion = backend.get_model_by_alias(CHAMPION)
    except Exception as exc:
        return Rollback(None, [], None, f"{type(exc).__name__}: {exc}")
    names = sorted(d.name for d in endpoint.deployments) if endpoint else []
    return Rollback(live_traffic(endpoint), names, champion.version if champion else None)


def rollback_state(rollback: Rollback, deployment: str) -> str:
    """What the rollback left, as read back (not as the hooks meant it), for the failure's message."""
    if rollback.traffic is None:
        return f"the endpoint could not be read back: {rollback.error}"
    gone = "deleted" if deployment not in rollback.deployments else "STILL THERE"
    champion = f"v{rollback.champion}" if rollback.champion else "none"
    return f"traffic now {rollback.traffic or 'none'}, deployment {deployment} {gone}, champion {champion}"


@dataclass
class RolloutResult:
    version: str
    deployment: str
    skipped: bool
    traffic_before: dict[str, int]
    traffic_after: dict[str, int]
    reconcile: list[str] = field(default_factory=list)
    pinned_smoke: dict[str, Any] | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)
    previous_champion: str | None = None
    mirror: dict[str, Any] | None = None  # {"percent", "duration_s", "deployment"} when traffic was mirrored
    strategy: str | None = None  # rollout.strategy, with the plan it gave: "canary [10, 100]"
    live: dict[str, Any] | None = None  # {"samples": [...], "alarm": {...} | None, "picture": path} of the bakes
    rollback: Rollback | None = None  # set when the rollout failed and was rolled back

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


__all__ = [
    "CHAMPION",
    "Rollback",
    "RolloutFailed",
    "RolloutResult",
    "read_rollback",
    "rollback_state",
]
