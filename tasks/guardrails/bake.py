"""One traffic step's bake: watch the alarms on live traffic for ``bake_s``, roll back the moment one fires.

:func:`bake` runs on an injected clock and sleep, reads a :class:`MetricsSource` every
``rollout.alarms.check_interval_s`` and judges the window so far with :func:`~tasks.guardrails.alarms.decide`:

- an alarm ends the bake at once (not at the end of the window) with ``decided_by="live"``;
- at the end of the bake, enough requests and no alarm pass it (``decided_by="live"``);
- too few requests: the bake extends up to ``rollout.alarms.max_extension_s``; still too few, the synthetic probes
  (the pinned smoke test and unpinned requests of a bake-less step) decide, ``decided_by="probes"``.

A metrics source that cannot be read counts as a check without numbers (logged in the result), never as a pass.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from tasks.config import AlarmConfig
from tasks.guardrails.alarms import Verdict, decide
from tasks.guardrails.metrics import Counters, WindowStats

_LOG = logging.getLogger("finetune_phi.guardrails")


class MetricsSource(Protocol):
    """Per-deployment numbers since a mark. ``mark`` is opaque: a reading (local) or a timestamp (Azure Monitor)."""

    name: str

    def mark(self) -> Any: ...
    def since(self, mark: Any) -> dict[str, Counters]: ...


# The synthetic probes: (passed, one line saying what they saw).
Probe = Callable[[], tuple[bool, str]]
DecidedBy = Literal["live", "probes"]


@dataclass
class Sample:
    """One check during a bake, for the picture and the run log."""

    t: float  # seconds since the rollout's first step began
    percent: int
    traffic: dict[str, int]
    stats: dict[str, dict[str, Any]]  # deployment -> WindowStats.to_dict() of the step's window so far
    status: str  # the verdict's status at this check


@dataclass
class BakeResult:
    percent: int
    bake_s: float
    waited_s: float
    decided_by: DecidedBy
    passed: bool
    verdict: Verdict
    candidate: WindowStats
    champion: WindowStats | None
    reason: str
    samples: list[Sample] = field(default_factory=list)
    read_errors: int = 0
    champion_earlier: bool = False  # ``champion`` is its earlier window (it took too little traffic in this one)

    def to_dict(self) -> dict[str, Any]:
        return {
            "percent": self.percent,
            "bake_s": self.bake_s,
            "waited_s": round(self.waited_s, 2),
            "decided_by": self.decided_by,
            "passed": self.passed,
            "verdict": self.verdict.to_dict(),
            "candidate": self.candidate.to_dict(),
            "champion": self.champion.to_dict() if self.champion else None,
            "reason": self.reason,
            "read_errors": self.read_errors,
            "champion_earlier": self.champion_earlier,
        }


@dataclass(frozen=True)
class BakeStep:
    """What one bake watches: the new deployment, the champion (None on a first rollout) and the split."""

    candidate: str
    champion: str | None
    percent: int
    traffic: dict[str, int]
    bake_s: float


def bake(
    source: MetricsSource,
    step: BakeStep,
    alarms: AlarmConfig,
    probe: Probe,
    *,
    reference: WindowStats | None = None,
    origin: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    on_check: Callable[[Sample, Verdict], None] | None = None,
) -> BakeResult:
    """Bake ``step`` and return the verdict with the numbers of both deployments.

    ``reference``: the champion's numbers from an earlier window, compared with when the champion takes too little
    traffic in this one (at 100% it takes none). ``origin``: the clock value the samples' times count from.
    """
    started = clock()
    origin = started if origin is None else origin
    deadline, limit = started + step.bake_s, started + step.bake_s + alarms.max_extension_s
    mark, read_errors = _mark(source), 0
    samples: list[Sample] = []
    while True:
        now = clock()
        windows: dict[str, Counters] | None = None
        if mark is None:
            mark = _mark(source)
        else:
            try:
                windows = source.since(mark)
            except Exception as exc:  # a missed reading is a check without numbers, never a pass
                read_errors += 1
                _LOG.warning("could not read %s metrics (%s): this check has no numbers", source.name, exc)
        if mark is None:
            read_errors += 1
        candidate = (windows or {}).get(step.candidate, Counters()).stats()
        champion_now = (windows or {}).get(step.champion, Counters()).stats() if step.champion else None
        champion = (
            champion_now if champion_now is not None and champion_now.requests >= alarms.min_requests else reference
        )
        verdict = decide(candidate, champion, alarms) if windows is not None else Verdict("wait", reason="no numbers")
        stats = {step.candidate: candidate.to_dict()}
        if step.champion and champion_now is not None:
            stats[step.champion] = champion_now.to_dict()
        sample = Sample(round(now - origin, 3), step.percent, dict(step.traffic), stats, verdict.status)
        samples.append(sample)
        if on_check is not None:
            on_check(sample, verdict)

        waited = now - started
        if verdict.status == "alarm":
            decided_by, passed = "live", False
            reason = f"alarm at {step.percent}% after {waited:.1f} s: {verdict.reason}"
            break
        if verdict.status == "pass" and now >= deadline:
            decided_by, passed = "live", True
            reason = f"{candidate.requests} live requests, no alarm over {waited:.1f} s"
            break
        if now >= limit:
            decided_by, (passed, seen) = "probes", probe()
            verdict = Verdict("pass" if passed else "alarm", None if passed else "probes", seen)
            reason = (
                f"at {step.percent}% only {candidate.requests} live requests to {step.candidate} in {waited:.1f} s "
                "(fewer than "
                f"rollout.alarms.min_requests={alarms.min_requests} after the extension): the synthetic probes "
                f"decided: {seen}"
            )
            break
        sleep(max(0.0, min(alarms.check_interval_s, (deadline if now < deadline else limit) - now)))
    earlier = champion is not None and champion is not champion_now
    shown = champion if earlier else champion_now
    return BakeResult(
        step.percent, step.bake_s, waited, decided_by, passed, verdict, candidate, shown, reason, samples, read_errors,
        earlier,
    )  # fmt: skip


def _mark(source: MetricsSource) -> Any:
    try:
        return source.mark()
    except Exception as exc:
        _LOG.warning("could not read %s metrics (%s): the bake's window starts at the next reading", source.name, exc)
        return None


__all__ = ["BakeResult", "BakeStep", "MetricsSource", "Probe", "Sample", "bake"]
