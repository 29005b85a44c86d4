"""Per-deployment live numbers for the rollout's alarms, served as JSON on ``GET /admin/metrics``.

Cumulative since the server started, per deployment: answers by HTTP status, finish reasons of the replies
(``stop``: the reply ended; ``length``: it ran into its token budget), a histogram of seconds per generated token
(bounds: :data:`tasks.guardrails.metrics.SECONDS_PER_TOKEN_BOUNDS`), and requests rescued by the champion. The
rollout reads two of these and subtracts (:meth:`tasks.guardrails.metrics.Counters.minus`), so the server keeps no
windows.

    {"seconds_per_token_bounds": [...],
     "deployments": {"model-v2": {"statuses": {"200": 41, "500": 3}, "finish_reasons": {"stop": 40, "length": 1},
                                  "seconds_per_token": {"counts": [...], "sum": 0.61, "count": 41},
                                  "rescued": 3}}}
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from tasks.guardrails.metrics import SECONDS_PER_TOKEN_BOUNDS, bucket_of


class _DeploymentNumbers:
    def __init__(self) -> None:
        self.statuses: dict[int, int] = defaultdict(int)
        self.finish_reasons: dict[str, int] = defaultdict(int)
        self.latency_counts = [0] * (len(SECONDS_PER_TOKEN_BOUNDS) + 1)
        self.latency_sum = 0.0
        self.rescued = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "finish_reasons": dict(self.finish_reasons),
            "seconds_per_token": {
                "counts": list(self.latency_counts),
                "sum": round(self.latency_sum, 6),
                "count": sum(self.latency_counts),
            },
            "rescued": self.rescued,
        }


class LiveMetrics:
    """Thread-safe counters; ``record`` is called once per answered scoring request."""

    def __init__(self) -> None:
        self._by_deployment: dict[str, _DeploymentNumbers] = defaultdict(_DeploymentNumbers)
        self._lock = threading.Lock()

    def record(
        self, deployment: str, status: int, seconds: float, tokens: int = 0, finish_reasons: Iterable[str] = ()
    ) -> None:
        """One answer. Latency per token is recorded for answers that generated tokens (an error has none)."""
        with self._lock:
            numbers = self._by_deployment[deployment]
            numbers.statuses[int(status)] += 1
            for reason in finish_reasons:
                if reason:
                    numbers.finish_reasons[reason] += 1
            if tokens > 0 and status < 400:
                per_token = seconds / tokens
                numbers.latency_counts[bucket_of(per_token)] += 1
                numbers.latency_sum += per_token

    def rescued(self, deployment: str) -> None:
        """A request that failed on ``deployment`` and was answered by the champion instead."""
        with self._lock:
            self._by_deployment[deployment].rescued += 1

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {
                "seconds_per_token_bounds": list(SECONDS_PER_TOKEN_BOUNDS),
                "deployments": {n: d.to_json() for n, d in sorted(self._by_deployment.items()) if n != "none"},
            }


__all__ = ["LiveMetrics"]
