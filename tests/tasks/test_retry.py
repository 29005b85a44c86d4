"""Retries: only transient faults, exponential backoff with real jitter (clients retrying in lock-step make
throttling worse)."""

from __future__ import annotations

import random
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import httpx
import pytest

from tasks.backends.base import BackendError, JobFailedError, RetriesExhaustedError, TransientBackendError
from tasks.config import RetryConfig
from tasks.retry import (
    POLL_BACKOFF_CAP,
    backoff_delay,
    call_with_retry,
    is_transient,
    jitter_bounds,
    poll_policy,
    retry_condition_fn,
)

POLICY = RetryConfig(attempts=5, base_delay_s=0.01, max_delay_s=0.05, jitter=0.5)


class _Flaky(BaseHTTPRequestHandler):
    """Answers the scripted statuses in order (503, 429, then 200), like a throttled service."""

    script: ClassVar[list[int]] = []

    def do_GET(self) -> None:
        status = self.script.pop(0) if self.script else 200
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:  # keep pytest output quiet
        pass


@pytest.fixture()
def flaky_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _get(url: str) -> int:
    response = httpx.get(url, timeout=5)
    response.raise_for_status()
    return response.status_code


def test_429_and_503_from_a_real_server_are_retried_with_growing_jittered_delays(flaky_server) -> None:
    _Flaky.script = [503, 429, 503]
    delays: list[float] = []
    url = f"http://127.0.0.1:{flaky_server.server_address[1]}/"
    assert call_with_retry(_get, url, policy=POLICY, sleep=delays.append, rng=random.Random(7)) == 200
    assert len(delays) == 3
    for attempt, delay in enumerate(delays):
        low, high = jitter_bounds(attempt, POLICY)
        assert low <= delay <= high
    assert len(set(delays)) == 3  # jitter: no two waits alike


def test_jitter_spreads_over_the_whole_band_and_caps_at_max_delay() -> None:
    rng = random.Random(0)
    draws = [backoff_delay(1, POLICY, rng) for _ in range(200)]
    low, high = jitter_bounds(1, POLICY)
    assert all(low <= d <= high for d in draws)
    assert max(draws) - min(draws) > 0.8 * (high - low)  # not a constant: the factor really varies
    capped = [backoff_delay(10, POLICY, rng) for _ in range(50)]
    assert max(capped) <= POLICY.max_delay_s * (1 + POLICY.jitter)


def test_final_faults_are_not_retried() -> None:
    calls = []

    def failing() -> None:
        calls.append(1)
        raise JobFailedError("the training script exited with status 1")

    with pytest.raises(JobFailedError):
        call_with_retry(failing, policy=POLICY, sleep=lambda _: None)
    assert calls == [1]


def test_gives_up_after_the_configured_attempts() -> None:
    calls = []

    def always_throttled() -> None:
        calls.append(1)
        raise TransientBackendError("HTTP 429 too many requests")

    with pytest.raises(TransientBackendError):
        call_with_retry(always_throttled, policy=POLICY, sleep=lambda _: None)
    assert len(calls) == POLICY.attempts


def test_connection_refused_is_transient_and_http_400_is_not() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(httpx.ConnectError) as refused:
        httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
    assert is_transient(refused.value)
    request = httpx.Request("POST", "http://x/score")
    bad = httpx.HTTPStatusError("bad", request=request, response=httpx.Response(400, request=request))
    busy = httpx.HTTPStatusError("busy", request=request, response=httpx.Response(429, request=request))
    assert not is_transient(bad)
    assert is_transient(busy)


def _failed(exc: Exception):
    from prefect.states import Failed

    return Failed(data=exc)


def test_the_task_retry_condition_retries_transient_faults_only() -> None:
    from prefect.task_engine import TaskRunTimeoutError

    assert retry_condition_fn(None, None, _failed(TransientBackendError("HTTP 503")))
    assert retry_condition_fn(None, None, _failed(ConnectionResetError("reset by peer")))
    assert not retry_condition_fn(None, None, _failed(JobFailedError("the training script exited with code 1")))
    # A backend that already retried a transient fault to its limit: the whole task may still try again later.
    assert retry_condition_fn(None, None, _failed(RetriesExhaustedError("HTTP 503 (gave up after 5 attempts)")))
    assert not retry_condition_fn(None, None, _failed(BackendError("no such workspace")))
    # Prefect's own task timeout is a TimeoutError, but the task spent its whole budget: no second one.
    assert not retry_condition_fn(None, None, _failed(TaskRunTimeoutError("Scope timed out after 60 second(s).")))


def test_a_huge_attempt_number_gives_the_capped_delay_not_an_overflow() -> None:
    low, high = jitter_bounds(5000, POLICY)
    assert (low, high) == pytest.approx((POLICY.max_delay_s * 0.5, POLICY.max_delay_s * 1.5))
    assert low <= backoff_delay(5000, POLICY) <= high


def test_the_poll_schedule_doubles_from_the_interval_to_its_cap_with_the_policys_jitter() -> None:
    schedule = poll_policy(30.0, POLICY)
    assert (schedule.base_delay_s, schedule.max_delay_s, schedule.jitter) == (30.0, 30.0 * POLL_BACKOFF_CAP, 0.5)
    bases = [sum(jitter_bounds(n, schedule)) / 2 for n in range(5)]
    assert bases == [30.0, 60.0, 120.0, 120.0, 120.0]
