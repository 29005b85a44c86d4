from __future__ import annotations

import pytest

from tasks.guardrails.metrics import (
    SECONDS_PER_TOKEN_BOUNDS,
    Counters,
    bucket_of,
    counters_from_json,
    is_server_error,
    quantile,
)


@pytest.mark.parametrize(
    ("status", "server"),
    [
        (500, True),
        (502, True),
        (503, True),
        (408, True),
        (424, True),
        (400, False),
        (401, False),
        (404, False),
        (429, False),
        (200, False),
    ],
)
def test_server_errors_are_5xx_408_424_not_a_clients_4xx(status: int, server: bool) -> None:
    assert is_server_error(status) is server


def _histogram(values: list[float]) -> list[int]:
    counts = [0] * (len(SECONDS_PER_TOKEN_BOUNDS) + 1)
    for v in values:
        counts[bucket_of(v)] += 1
    return counts


def test_p95_from_the_histogram_is_within_one_bucket_of_the_true_value() -> None:
    values = [0.01] * 95 + [0.2] * 5
    p95 = quantile(_histogram(values), 0.95)
    assert p95 is not None and 0.01 / 1.5 <= p95 <= 0.01 * 1.5
    assert quantile(_histogram([0.05] * 100), 0.95) == pytest.approx(0.05, rel=0.5)
    assert quantile([], 0.95) is None
    assert quantile(_histogram([100.0]), 0.95) == SECONDS_PER_TOKEN_BOUNDS[-1]


def test_a_5x_slower_deployment_shows_a_p95_ratio_near_5() -> None:
    fast = quantile(_histogram([0.004 + 0.0001 * i for i in range(50)]), 0.95)
    slow = quantile(_histogram([0.02 + 0.0005 * i for i in range(50)]), 0.95)
    assert fast and slow and 3.5 <= slow / fast <= 7


def test_a_window_is_the_difference_of_two_readings() -> None:
    earlier = Counters({200: 10, 500: 1}, {"stop": 9, "length": 1}, _histogram([0.01] * 10), rescued=1)
    later = Counters({200: 30, 500: 4, 404: 2}, {"stop": 20, "length": 10}, _histogram([0.01] * 30), rescued=3)
    stats = later.minus(earlier).stats()
    assert (stats.requests, stats.errors, stats.rescued) == (25, 3, 2)
    assert stats.error_rate == pytest.approx(3 / 25)
    assert stats.ended_share == pytest.approx(11 / 20)
    assert stats.p95_s_per_token == pytest.approx(0.01, rel=0.5)


def test_counters_that_went_backwards_mean_a_restarted_server_and_count_from_zero() -> None:
    later = Counters({200: 3})
    assert later.minus(Counters({200: 50})).stats().requests == 3


def test_an_empty_window_has_no_rates() -> None:
    stats = Counters().stats()
    assert (stats.requests, stats.error_rate, stats.ended_share, stats.p95_s_per_token) == (0, None, None, None)


def test_the_admin_route_payload_reads_back() -> None:
    counters = counters_from_json(
        {
            "statuses": {"200": 4, "500": 1},
            "finish_reasons": {"stop": 4},
            "seconds_per_token": {"counts": [0, 4]},
            "rescued": 1,
        }
    )
    assert counters.statuses == {200: 4, 500: 1} and counters.rescued == 1 and counters.stats().replies == 4


def test_a_prometheus_style_cumulative_histogram_reads_back_per_bucket() -> None:
    counters = counters_from_json(
        {"requests_by_status": {"200": 10}, "finish_reasons": {"stop": 10},
         "latency_per_token_seconds": {"le": [0.01, 0.1, 1.0], "counts": [2, 9, 10], "sum": 1.0, "count": 11}}
    )  # fmt: skip
    assert counters.statuses == {200: 10} and list(counters.latency_counts) == [2, 7, 1, 1]
    assert counters.latency_bounds == (0.01, 0.1, 1.0)
    p95 = counters.stats().p95_s_per_token
    assert p95 is not None and 0.1 <= p95 <= 1.0


def test_two_deployments_10pct_apart_read_under_1_25x_apart_through_the_routers_histogram() -> None:
    """The router's own buckets decide how far apart two p95s can read: with 2.5x-wide buckets 9.5 and 10.5 ms per
    token (the two sides of a bound) read as about 2.4x apart, a false latency alarm at max_latency_ratio 2."""
    from deployments.server import Metrics

    metrics = Metrics()
    for i in range(40):
        jitter = 1 + 0.001 * i  # 9.5 to 9.9 ms against 10.5 to 10.9 ms
        metrics.generated("champion", 10, 0.0095 * 10 * jitter, ["stop"])
        metrics.generated("candidate", 10, 0.0105 * 10 * jitter, ["stop"])
    snapshot = metrics.snapshot({})
    champion = counters_from_json(snapshot["champion"]).stats().p95_s_per_token
    candidate = counters_from_json(snapshot["candidate"]).stats().p95_s_per_token
    assert champion and candidate and 1.0 <= candidate / champion <= 1.25, (champion, candidate)
