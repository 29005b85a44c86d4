from __future__ import annotations

import pytest

from tasks.config import AlarmConfig
from tasks.guardrails.bake import BakeStep, bake
from tasks.guardrails.metrics import Counters
from tests.tasks.guardrails.scripted import HEALTHY, Clock, ScriptedSource

ALARMS = AlarmConfig(min_requests=20, max_extension_s=20, check_interval_s=1)
STEP = BakeStep("model-v2", "model-v1", 10, {"model-v1": 90, "model-v2": 10}, bake_s=30)


def _no_probe() -> tuple[bool, str]:
    raise AssertionError("the probes must not run when live traffic decides")


def test_a_healthy_step_bakes_its_full_time_and_passes_on_live_numbers() -> None:
    clock = Clock()
    source = ScriptedSource(clock, {"model-v1": HEALTHY, "model-v2": (5.0, 0.0, 0.011, 0.95)})
    result = bake(source, STEP, ALARMS, _no_probe, clock=clock, sleep=clock.sleep)
    assert result.passed and result.decided_by == "live"
    assert result.waited_s == pytest.approx(30)
    assert result.candidate.requests == 150 and result.champion is not None and result.champion.requests == 600
    assert len(result.samples) == 31  # one check a second, the first at 0 s


def test_a_failing_canary_rolls_back_at_once_not_at_the_end_of_the_bake() -> None:
    clock = Clock()
    source = ScriptedSource(clock, {"model-v1": HEALTHY, "model-v2": (5.0, 0.3, 0.01, 0.95)})
    result = bake(source, STEP, ALARMS, _no_probe, clock=clock, sleep=clock.sleep)
    assert not result.passed and result.verdict.alarm == "error_rate"
    assert result.waited_s <= 3  # 30% errors at 5 req/s: certain within a few seconds, far before 30 s


def test_a_slow_canary_fires_the_latency_alarm_once_it_has_min_requests() -> None:
    clock = Clock()
    source = ScriptedSource(clock, {"model-v1": HEALTHY, "model-v2": (5.0, 0.0, 0.05, 0.95)})
    result = bake(source, STEP, ALARMS, _no_probe, clock=clock, sleep=clock.sleep)
    assert result.verdict.alarm == "latency" and result.waited_s == pytest.approx(4)


def test_too_little_traffic_extends_the_bake_then_the_probes_decide() -> None:
    clock = Clock()
    source = ScriptedSource(clock, {"model-v1": HEALTHY, "model-v2": (0.2, 0.0, 0.01, 0.95)})
    probes: list[float] = []

    def probe() -> tuple[bool, str]:
        probes.append(clock.now)
        return True, "6/6 probe requests answered"

    result = bake(source, STEP, ALARMS, probe, clock=clock, sleep=clock.sleep)
    assert result.passed and result.decided_by == "probes"
    assert probes == [50.0]  # bake_s 30 + max_extension_s 20
    assert "synthetic probes decided" in result.reason and "only 10 live requests" in result.reason


def test_enough_traffic_during_the_extension_decides_live() -> None:
    clock = Clock()
    source = ScriptedSource(clock, {"model-v1": HEALTHY, "model-v2": (0.5, 0.0, 0.01, 0.95)})
    result = bake(source, STEP, ALARMS, _no_probe, clock=clock, sleep=clock.sleep)
    assert result.passed and result.decided_by == "live" and result.waited_s == pytest.approx(40)


def test_at_100_percent_the_champions_earlier_window_is_the_reference() -> None:
    clock = Clock()
    source = ScriptedSource(clock, {"model-v2": (5.0, 0.0, 0.01, 0.0)})
    reference = Counters({200: 100}, {"stop": 95, "length": 5}).stats()
    final = BakeStep("model-v2", "model-v1", 100, {"model-v2": 100}, bake_s=30)
    result = bake(source, final, ALARMS, _no_probe, reference=reference, clock=clock, sleep=clock.sleep)
    assert result.verdict.alarm == "ended_share"


def test_unreadable_metrics_never_pass_a_step() -> None:
    clock = Clock()
    source = ScriptedSource(clock, {"model-v1": HEALTHY, "model-v2": (5.0, 0.0, 0.01, 0.95)})
    source.fail_reads = 10_000
    result = bake(source, STEP, ALARMS, lambda: (False, "0/6 probe requests answered"), clock=clock, sleep=clock.sleep)
    assert not result.passed and result.decided_by == "probes" and result.read_errors > 40


def test_a_reading_that_fails_for_a_while_is_counted_and_the_bake_goes_on() -> None:
    clock = Clock()
    source = ScriptedSource(clock, {"model-v1": HEALTHY, "model-v2": (5.0, 0.0, 0.01, 0.95)})
    source.fail_reads = 3
    result = bake(source, STEP, ALARMS, _no_probe, clock=clock, sleep=clock.sleep)
    assert result.passed and result.read_errors == 3
