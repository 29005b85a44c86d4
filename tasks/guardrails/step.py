"""A traffic step judged on live traffic: the bake of :mod:`tasks.guardrails.bake` with the rollout's probes as
its fallback, and :class:`Watch`, what the rollout carries from step to step (the metrics source, the champion's
last numbers, every check for the picture).

``judge_step`` is the plain function; the rollout's Prefect task wraps it. A step with ``bake_s`` 0 (or a backend
without live metrics) is judged by the probes alone, as before the guardrails.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tasks.backends.base import LiveMetricsBackend, RescuingBackend
from tasks.config import Settings
from tasks.guardrails.bake import BakeStep, MetricsSource, Sample, bake
from tasks.guardrails.metrics import Counters, WindowStats
from tasks.guardrails.plan import bake_seconds

_LOG = logging.getLogger("finetune_phi.guardrails")

_NO_BASELINE = "could not read %s metrics (%s): no full-load baseline of the champion"

# The probes of a step: (pinned smoke test passed and unpinned error rate within rollout.max_error_rate, summary).
StepProbe = Callable[[], tuple[bool, str, float]]


@dataclass
class Watch:
    """The rollout's live view across its steps."""

    source: MetricsSource | None
    candidate: str
    champion: str | None  # the deployment that had all traffic before (None: a first rollout)
    origin: float | None = None  # the clock when the first step began (the picture's time 0)
    reference: WindowStats | None = None  # the champion's last window with enough requests
    samples: list[Sample] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)  # every judged step, the failed one too
    alarm: dict[str, Any] | None = None  # {"t", "percent", "alarm", "reason"} once one fired
    # The champion at full load: its numbers from the rollout's start to the first traffic step, while it still took
    # every request. At 100% the new deployment carries that load, so it is judged against these, not against the
    # champion's numbers at a canary's lighter share (queueing behind max_concurrent_requests counts in latency).
    baseline: WindowStats | None = None
    baseline_mark: Any = None

    def begin_baseline(self) -> None:
        """Start the champion's full-load window (call before the new deployment takes any traffic)."""
        if self.source is None or self.champion is None:
            return
        try:
            self.baseline_mark = self.source.mark()
        except Exception as exc:  # no baseline: the final bake compares with the last step's numbers
            _LOG.warning(_NO_BASELINE, self.source.name, exc)

    def end_baseline(self, min_requests: int) -> None:
        """Close the full-load window (just before the first traffic shift); kept only with ``min_requests``."""
        mark, self.baseline_mark = self.baseline_mark, None
        if mark is None or self.source is None or self.champion is None:
            return
        try:
            stats = self.source.since(mark).get(self.champion, Counters()).stats()
        except Exception as exc:
            _LOG.warning(_NO_BASELINE, self.source.name, exc)
            return
        if stats.requests >= min_requests:
            self.baseline = stats


def metrics_source_of(backend: Any) -> MetricsSource | None:
    """The backend's live metrics (a :class:`~tasks.backends.base.LiveMetricsBackend`), or None without any."""
    return backend.live_metrics() if isinstance(backend, LiveMetricsBackend) else None


# How long a rescue outlives the step that armed it: a rollout that died cannot leave it on for longer.
RESCUE_MARGIN_S = 300.0


def arm_rescue(backend: Any, watch: Watch, settings: Settings, percent: int) -> bool:
    """With ``rollout.rescue`` on a backend that can (local), let the champion answer what the new deployment
    fails during this step. False when it is off, not possible or could not be armed (logged, never raised)."""
    if not settings.rollout.rescue or watch.champion is None or not isinstance(backend, RescuingBackend):
        return False
    ttl = bake_seconds(settings.rollout, percent) + settings.rollout.alarms.max_extension_s + RESCUE_MARGIN_S
    try:
        backend.arm_rescue(watch.candidate, watch.champion, ttl)
    except Exception as exc:
        _LOG.warning("could not arm the rescue (%s): the new deployment's failures reach users", exc)
        return False
    return True


def disarm_rescue(backend: Any) -> None:
    """The rollout is over (or rolled back). Never raises: the rescue's own deadline ends it anyway."""
    if isinstance(backend, RescuingBackend):
        try:
            backend.disarm_rescue()
        except Exception as exc:
            _LOG.warning("could not disarm the rescue (%s); it ends by itself within minutes", exc)


def judge_step(
    settings: Settings,
    percent: int,
    weights: dict[str, int],
    watch: Watch,
    probe: StepProbe,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    log: logging.Logger | logging.LoggerAdapter = _LOG,
) -> dict[str, Any]:
    """Bake one step; returns the step's record (always, passed or not: the caller raises on ``passed`` False)."""
    alarms = settings.rollout.alarms
    bake_s = bake_seconds(settings.rollout, percent)
    if watch.origin is None:
        watch.origin = clock()
    probe_rate: list[float] = []

    def run_probe() -> tuple[bool, str]:
        passed, seen, rate = probe()
        probe_rate.append(rate)
        return passed, seen

    if bake_s <= 0 or watch.source is None:
        passed, seen = run_probe()
        why = "no bake (rollout.bake_s / final_bake_s is 0)" if bake_s <= 0 else "no live traffic to watch"
        record: dict[str, Any] = {
            "percent": percent, "traffic": weights, "bake_s": bake_s, "waited_s": 0.0, "decided_by": "probes",
            "passed": passed, "reason": None if passed else f"at {percent}% {seen}", "verdict": None,
            "candidate": None, "champion": None, "note": f"{why}: the synthetic probes decided: {seen}",
        }  # fmt: skip
    else:
        step = BakeStep(watch.candidate, watch.champion, percent, weights, bake_s)

        def on_check(sample: Sample, verdict: Any) -> None:
            log.debug("bake %d%% at %.1f s: %s %s", percent, sample.t, verdict.status, sample.stats)

        use_baseline = percent == 100 and watch.baseline is not None
        reference = watch.baseline if use_baseline else watch.reference
        result = bake(
            watch.source, step, alarms, run_probe, reference=reference, origin=watch.origin, clock=clock,
            sleep=sleep, on_check=on_check,
        )  # fmt: skip
        watch.samples.extend(result.samples)
        if result.champion is not None and result.champion.requests >= alarms.min_requests and percent < 100:
            watch.reference = result.champion
        record = {
            **result.to_dict(), "traffic": weights, "reason": None if result.passed else result.reason,
            "note": result.reason, "champion_window": _champion_window(result, use_baseline),
        }  # fmt: skip
        if not result.passed and result.samples:
            watch.alarm = {
                "t": result.samples[-1].t, "percent": percent, "alarm": result.verdict.alarm, "reason": result.reason,
            }  # fmt: skip
    # Kept for readers of the step's old shape (the summary's error-rate column when the probes decided).
    record["error_rate"] = _error_rate(record, probe_rate)
    watch.steps.append(record)
    log.info(
        "traffic step %d%%: %s (%s decided; %s)",
        percent, "passed" if record["passed"] else "FAILED", record["decided_by"], _numbers(record, watch),
    )  # fmt: skip
    return record


def _champion_window(result: Any, baseline: bool) -> str | None:
    """Which of the champion's windows the step was judged against, in words for the record."""
    if result.champion is None:
        return None
    if not result.champion_earlier:
        return "this step"
    return "before the rollout, with all traffic" if baseline else "an earlier step"


def _error_rate(record: dict[str, Any], probe_rate: list[float]) -> float | None:
    if record["decided_by"] == "probes" and probe_rate:
        return probe_rate[-1]
    return (record.get("candidate") or {}).get("error_rate")


def _numbers(record: dict[str, Any], watch: Watch) -> str:
    """Both deployments' numbers for the run log, in one line."""
    parts = []
    for who, name in (("candidate", watch.candidate), ("champion", watch.champion)):
        stats = record.get(who)
        if stats:
            rate = "n/a" if stats["error_rate"] is None else f"{stats['error_rate']:.1%}"
            p95 = stats["p95_s_per_token"]
            ended = stats["ended_share"]
            parts.append(
                f"{name}: {stats['requests']} requests, errors {rate}, "
                f"p95/token {'n/a' if p95 is None else f'{p95 * 1000:.1f} ms'}, "
                f"ended {'n/a' if ended is None else f'{ended:.0%}'}"
            )
    return "; ".join(parts) or record.get("note") or ""


__all__ = ["StepProbe", "Watch", "arm_rescue", "disarm_rescue", "judge_step", "metrics_source_of"]
