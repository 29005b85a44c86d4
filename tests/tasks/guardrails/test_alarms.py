from __future__ import annotations

from tasks.config import AlarmConfig
from tasks.guardrails.alarms import decide
from tasks.guardrails.metrics import WindowStats

ALARMS = AlarmConfig(min_requests=20)
HEALTHY = WindowStats(requests=200, errors=0, p95_s_per_token=0.01, ended=190, replies=200)


def test_a_healthy_canary_passes_and_says_what_it_compared() -> None:
    verdict = decide(WindowStats(40, 0, 0.012, ended=38, replies=40), HEALTHY, ALARMS)
    assert verdict.status == "pass"
    assert verdict.compared == ["error_rate", "latency", "ended_share"]


def test_too_few_requests_wait_for_a_verdict() -> None:
    verdict = decide(WindowStats(19, 0, 0.5), HEALTHY, ALARMS)
    assert verdict.status == "wait" and "19 of rollout.alarms.min_requests=20" in verdict.reason


def test_errors_above_the_absolute_ceiling_fire_whatever_the_champion_does() -> None:
    verdict = decide(WindowStats(30, 9, 0.01), None, ALARMS)
    assert (verdict.status, verdict.alarm) == ("alarm", "error_rate")
    assert "30.0% (9/30)" in verdict.reason


def test_a_certain_breach_fires_before_min_requests() -> None:
    # 2 errors in 3 requests: over 20 requests the rate is at least 10% > 5% whatever comes next.
    verdict = decide(WindowStats(3, 2), HEALTHY, ALARMS)
    assert (verdict.status, verdict.alarm) == ("alarm", "error_rate")
    assert decide(WindowStats(3, 1), HEALTHY, ALARMS).status == "wait"  # 1/20 = 5% is not over 5%


def test_error_rate_ratio_to_a_champion_that_errs_too() -> None:
    alarms = AlarmConfig(min_requests=20, max_error_rate=0.5, max_error_rate_ratio=2.0)
    champion = WindowStats(100, 10)
    assert decide(WindowStats(100, 19), champion, alarms).status == "pass"
    verdict = decide(WindowStats(100, 21), champion, alarms)
    assert (verdict.status, verdict.alarm) == ("alarm", "error_rate_ratio")


def test_latency_per_token_ratio_fires_on_a_slower_model() -> None:
    verdict = decide(WindowStats(40, 0, 0.05), HEALTHY, ALARMS)
    assert (verdict.status, verdict.alarm) == ("alarm", "latency")
    assert "5.0x" in verdict.reason
    assert decide(WindowStats(40, 0, 0.019), HEALTHY, ALARMS).status == "pass"


def test_request_latency_is_compared_when_no_per_token_histogram_exists() -> None:
    champion = WindowStats(100, 0, request_p95_s=0.2)
    verdict = decide(WindowStats(40, 0, request_p95_s=1.0), champion, ALARMS)
    assert (verdict.alarm, "request latency" in verdict.reason) == ("latency", True)


def test_replies_that_never_end_fire_the_ended_share_alarm() -> None:
    verdict = decide(WindowStats(40, 0, 0.01, ended=0, replies=40), HEALTHY, ALARMS)
    assert (verdict.status, verdict.alarm) == ("alarm", "ended_share")


def test_without_a_champion_with_enough_requests_only_absolute_ceilings_apply() -> None:
    slow_unended = WindowStats(40, 0, 1.0, ended=0, replies=40)
    verdict = decide(slow_unended, WindowStats(5, 0, 0.01, ended=5, replies=5), ALARMS)
    assert verdict.status == "pass" and verdict.compared == ["error_rate"]
    assert "absolute ceilings only" in verdict.reason
