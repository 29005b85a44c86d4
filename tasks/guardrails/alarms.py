"""The alarm decision: the new deployment's numbers against the champion's over the same window.

:func:`decide` is pure. It answers ``alarm`` (roll back now), ``pass`` (enough requests and nothing fired) or
``wait`` (too few requests for a verdict yet). An alarm may fire before ``min_requests`` only when it is already
certain: errors so far that would break the ceiling even if every request still to come succeeded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from tasks.config import AlarmConfig
from tasks.guardrails.metrics import WindowStats

Status = Literal["alarm", "pass", "wait"]


@dataclass(frozen=True)
class Verdict:
    status: Status
    alarm: str | None = None  # which alarm fired: error_rate, error_rate_ratio, latency, ended_share
    reason: str = ""
    compared: list[str] = field(default_factory=list)  # the comparisons that could be made (the rest lacked data)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "alarm": self.alarm, "reason": self.reason, "compared": list(self.compared)}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1000:.1f} ms"


def decide(candidate: WindowStats, champion: WindowStats | None, alarms: AlarmConfig) -> Verdict:
    """Judge ``candidate`` against ``champion`` (None, or too few requests: absolute ceilings only).

    The champion's numbers come from the same window when it still takes traffic; at 100% (the final bake) the
    caller passes the champion's last window with enough requests instead.
    """
    enough = candidate.requests >= alarms.min_requests
    # An error count no future success can bring under the ceiling: fire without waiting for min_requests.
    if not enough and candidate.errors > alarms.max_error_rate * alarms.min_requests:
        return Verdict(
            "alarm",
            "error_rate",
            f"{candidate.errors} server errors in the first {candidate.requests} requests: the error rate cannot end "
            f"under rollout.alarms.max_error_rate {alarms.max_error_rate:.0%} over {alarms.min_requests} requests",
            ["error_rate"],
        )
    if not enough:
        return Verdict("wait", reason=f"{candidate.requests} of rollout.alarms.min_requests={alarms.min_requests}")
    reference = champion if champion is not None and champion.requests >= alarms.min_requests else None
    compared = ["error_rate"]
    rate = candidate.error_rate or 0.0
    if rate > alarms.max_error_rate:
        return Verdict(
            "alarm",
            "error_rate",
            f"error rate {_pct(rate)} ({candidate.errors}/{candidate.requests}) over rollout.alarms.max_error_rate "
            f"{alarms.max_error_rate:.0%}",
            compared,
        )
    if reference is None:
        return Verdict("pass", reason="no champion numbers to compare with: absolute ceilings only", compared=compared)

    champion_rate = reference.error_rate or 0.0
    if champion_rate > 0:
        compared.append("error_rate_ratio")
        if rate > alarms.max_error_rate_ratio * champion_rate:
            return Verdict(
                "alarm",
                "error_rate_ratio",
                f"error rate {_pct(rate)} is more than {alarms.max_error_rate_ratio:g}x the champion's "
                f"{_pct(champion_rate)}",
                compared,
            )

    latency = _latency_ratio(candidate, reference)
    if latency is not None:
        ratio, what, mine, theirs = latency
        compared.append("latency")
        if ratio > alarms.max_latency_ratio:
            return Verdict(
                "alarm",
                "latency",
                f"p95 {what} {_ms(mine)} is {ratio:.1f}x the champion's {_ms(theirs)} "
                f"(rollout.alarms.max_latency_ratio {alarms.max_latency_ratio:g})",
                compared,
            )

    mine_ended, theirs_ended = candidate.ended_share, reference.ended_share
    if mine_ended is not None and theirs_ended is not None and candidate.replies >= alarms.min_requests:
        compared.append("ended_share")
        if theirs_ended - mine_ended > alarms.max_ended_share_drop:
            return Verdict(
                "alarm",
                "ended_share",
                f"{_pct(mine_ended)} of replies ended (finish_reason stop) against the champion's "
                f"{_pct(theirs_ended)} (rollout.alarms.max_ended_share_drop {alarms.max_ended_share_drop:.0%})",
                compared,
            )
    return Verdict("pass", reason="no alarm", compared=compared)


def _latency_ratio(candidate: WindowStats, champion: WindowStats) -> tuple[float, str, float, float] | None:
    """Per generated token when both sides have it (long replies do not trip it), else per request."""
    for what, mine, theirs in (
        ("seconds per token", candidate.p95_s_per_token, champion.p95_s_per_token),
        ("request latency", candidate.request_p95_s, champion.request_p95_s),
    ):
        if mine is not None and theirs is not None and theirs > 0:
            return mine / theirs, what, mine, theirs
    return None


__all__ = ["Verdict", "decide"]
