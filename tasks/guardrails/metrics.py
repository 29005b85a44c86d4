"""Per-deployment request numbers over a window of time, and what the alarms read from them.

A metrics source hands out :class:`Counters`: cumulative totals for one deployment (requests by HTTP status,
finish reasons, a histogram of seconds per generated token, rescued requests). The numbers of a window are the
difference of two readings (:meth:`Counters.minus`), so a reader never needs the server to keep windows; a
source whose backend aggregates windows itself (Azure Monitor) builds the window's :class:`Counters` directly.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Seconds per generated token: geometric buckets from 0.5 ms (factor 1.2, 55 of them, up to 9.4 s), the bounds
# of the router's histogram. A p95 is interpolated inside its bucket, so the bucket's width bounds the error of a
# ratio of two p95s: with 2.5x-wide buckets two deployments 10% apart read as 2.4x apart (a false latency alarm seen
# in CI); with 1.2x buckets the error stays under 1.2x, well inside max_latency_ratio 2.
SECONDS_PER_TOKEN_BOUNDS: tuple[float, ...] = tuple(round(0.0005 * 1.2**i, 7) for i in range(55))
# The crashed-container answer: the router's code when the model server process died under a request (Azure ML
# answers 502 when the scoring container crashed).
CRASHED_CONTAINER = 502


def is_server_error(status: int) -> bool:
    """A failure the deployment caused: any 5xx, 408 (timed out), 424 (model error); not a client's 4xx."""
    return status >= 500 or status in (408, 424)


@dataclass(frozen=True)
class Counters:
    """Cumulative (or one window's) numbers of one deployment.

    ``latency_counts[i]`` counts requests whose seconds per generated token were at most ``latency_bounds[i]``
    and above the previous bound; an entry past the last bound counts the rest. ``request_p95_s`` is set only by
    sources that report per-request latency percentiles themselves (Azure Monitor): percentiles of two readings
    cannot be subtracted.
    """

    statuses: Mapping[int, int] = field(default_factory=dict)
    finish_reasons: Mapping[str, int] = field(default_factory=dict)
    latency_counts: Sequence[int] = ()
    rescued: int = 0
    request_p95_s: float | None = None
    latency_bounds: tuple[float, ...] = SECONDS_PER_TOKEN_BOUNDS

    def minus(self, earlier: Counters) -> Counters:
        """The numbers between ``earlier`` and this reading (a restarted server's counters start again at 0)."""
        if any(self.statuses.get(k, 0) < v for k, v in earlier.statuses.items()):
            return self  # the counters went backwards: the server restarted, everything counted is new
        width = len(self.latency_bounds) + 1
        mine, theirs = _padded(self.latency_counts, width), _padded(earlier.latency_counts, width)
        latency = [a - b for a, b in zip(mine, theirs, strict=True)]
        return Counters(
            statuses={k: v - earlier.statuses.get(k, 0) for k, v in self.statuses.items()},
            finish_reasons={k: v - earlier.finish_reasons.get(k, 0) for k, v in self.finish_reasons.items()},
            latency_counts=latency if any(latency) else (),
            rescued=self.rescued - earlier.rescued,
            request_p95_s=self.request_p95_s,
            latency_bounds=self.latency_bounds,
        )

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def errors(self) -> int:
        return sum(n for code, n in self.statuses.items() if is_server_error(code))

    def stats(self) -> WindowStats:
        ended = self.finish_reasons.get("stop", 0)
        replies = ended + self.finish_reasons.get("length", 0)
        return WindowStats(
            requests=self.requests,
            errors=self.errors,
            p95_s_per_token=quantile(self.latency_counts, 0.95, self.latency_bounds),
            request_p95_s=self.request_p95_s,
            ended=ended,
            replies=replies,
            rescued=self.rescued,
        )


def _padded(counts: Sequence[int], width: int) -> list[int]:
    return list(counts) + [0] * (width - len(counts))


def bucket_of(seconds_per_token: float, bounds: Sequence[float] = SECONDS_PER_TOKEN_BOUNDS) -> int:
    """The histogram bucket a value falls in: the first bound at or above it (``len(bounds)`` above the last)."""
    return bisect.bisect_left(bounds, seconds_per_token)


def quantile(counts: Sequence[int], q: float, bounds: Sequence[float] = SECONDS_PER_TOKEN_BOUNDS) -> float | None:
    """The ``q`` quantile of a histogram over ``bounds``, interpolated inside its bucket; None for an empty
    histogram. Values above the last bound count as the last bound (a floor, never a guess)."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i >= len(bounds):
                return bounds[-1]
            low = bounds[i - 1] if i else 0.0
            return low + (bounds[i] - low) * (rank - seen) / n
        seen += n
    return bounds[-1]


@dataclass(frozen=True)
class WindowStats:
    """What the alarms compare, for one deployment over one window."""

    requests: int
    errors: int
    p95_s_per_token: float | None = None
    request_p95_s: float | None = None  # sources without a per-token histogram (Azure Monitor)
    ended: int = 0
    replies: int = 0  # replies with a known finish reason (stop or length)
    rescued: int = 0

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def ended_share(self) -> float | None:
        return self.ended / self.replies if self.replies else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "p95_s_per_token": self.p95_s_per_token,
            "request_p95_s": self.request_p95_s,
            "ended_share": self.ended_share,
            "replies": self.replies,
            "rescued": self.rescued,
        }


def _histogram(payload: Mapping[str, Any] | None) -> tuple[tuple[float, ...], list[int]]:
    """Bounds and per-bucket counts from a histogram entry: ``{"counts"}`` per bucket over the shared bounds, or
    Prometheus-style ``{"le", "counts", "count"}`` (cumulative counts, ``count`` the total)."""
    if not payload:
        return SECONDS_PER_TOKEN_BOUNDS, []
    counts = [int(n) for n in payload.get("counts", [])]
    if "le" not in payload:
        return SECONDS_PER_TOKEN_BOUNDS, counts
    bounds = tuple(float(b) for b in payload["le"])
    per_bucket = [c - (counts[i - 1] if i else 0) for i, c in enumerate(counts)]
    return bounds, [
        *per_bucket,
        int(payload.get("count", counts[-1] if counts else 0)) - (counts[-1] if counts else 0),
    ]


def counters_from_json(payload: Mapping[str, Any]) -> Counters:
    """One deployment's entry of the router's ``GET /admin/metrics``: answers by status under
    ``requests_by_status`` (or ``statuses``), the seconds-per-token histogram under ``latency_per_token_seconds``
    (Prometheus-style, or ``seconds_per_token`` over the shared bounds), ``finish_reasons``, ``rescued``."""
    statuses = payload.get("statuses") or payload.get("requests_by_status") or {}
    bounds, latency = _histogram(payload.get("seconds_per_token") or payload.get("latency_per_token_seconds"))
    return Counters(
        statuses={int(k): int(v) for k, v in statuses.items()},
        finish_reasons={str(k): int(v) for k, v in (payload.get("finish_reasons") or {}).items()},
        latency_counts=latency,
        rescued=int(payload.get("rescued", 0)),
        latency_bounds=bounds,
    )


__all__ = [
    "CRASHED_CONTAINER",
    "SECONDS_PER_TOKEN_BOUNDS",
    "Counters",
    "WindowStats",
    "bucket_of",
    "counters_from_json",
    "is_server_error",
    "quantile",
]
