"""Rescue during a rollout: a request the new deployment fails is answered by the champion instead.

The rollout arms it (``PUT /admin/rescue {"candidate", "champion", "ttl_s"}``) while traffic is split and disarms
it after (``DELETE /admin/rescue``); it also ends by itself after ``ttl_s``, so a rollout that died cannot leave
it on. While armed, a request routed by traffic (never a pinned one: a pin asks for that deployment) to the
candidate that fails server-side (5xx, 408, 424) or that the candidate cannot admit (429) is retried once on the
champion before any byte reaches the client; with ``stream: true`` only failures before the first chunk can be.
The failure still counts in the candidate's numbers (the router's ``/metrics`` and ``/admin/metrics``) and in its
``rescued`` counter, so the rollout's alarms see what users were spared.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tasks.guardrails.metrics import is_server_error

NOT_ADMITTED = (429,)


@dataclass(frozen=True)
class RescuePlan:
    candidate: str
    champion: str
    expires_at: float


class Rescue:
    """Whether and where to retry a failed request; pure, on an injected clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._plan: RescuePlan | None = None

    def arm(self, candidate: str, champion: str, ttl_s: float) -> None:
        if candidate == champion:
            raise ValueError("the candidate and the champion must be two deployments")
        self._plan = RescuePlan(candidate, champion, self._clock() + ttl_s)

    def disarm(self) -> None:
        self._plan = None

    @property
    def plan(self) -> RescuePlan | None:
        if self._plan is not None and self._clock() >= self._plan.expires_at:
            self._plan = None
        return self._plan

    def target(self, deployment: str, pinned: bool, status: int) -> str | None:
        """The champion to retry on, or None when this failure is the client's to see."""
        plan = self.plan
        if plan is None or pinned or deployment != plan.candidate:
            return None
        return plan.champion if is_server_error(status) or status in NOT_ADMITTED else None

    def describe(self) -> dict[str, Any] | None:
        plan = self.plan
        if plan is None:
            return None
        left = max(0.0, plan.expires_at - self._clock())
        return {"candidate": plan.candidate, "champion": plan.champion, "expires_in_s": round(left, 1)}


__all__ = ["Rescue", "RescuePlan"]
