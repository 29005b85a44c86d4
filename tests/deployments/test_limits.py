"""429 under a burst, 429 past the queue wait and 408 past the timeout (also while streaming), on servers with tight
limits (one request at a time)."""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.deployments.conftest import LiveEndpoint, wait_for

LONG = {"input_data": ["Tell me a long story."] * 4, "params": {"max_new_tokens": 480}}
SHORT = {"input_data": ["hi"], "params": {"max_new_tokens": 2}}
# The model is untrained: a greedy reply to one prompt may happen to hit <|end|> within the 400 ms budget (seen on
# some CPUs), so tests that need a reply to run long try these in turn.
PROMPTS = ("Tell me a long story.", "Describe every Prefect feature.", "List all numbers.", "Say hello.", "Why?")


@pytest.fixture(scope="module")
def tight(launch, tiny_model_dir: Path) -> LiveEndpoint:
    # 1 request generates at a time; Azure's rule makes 2 the most in flight; a queued one waits at most 50 ms;
    # a request may take 400 ms in all; 4 x 480 new tokens on the tiny model take seconds.
    endpoint = launch(max_concurrent_requests=1, max_queue_wait_ms=50, request_timeout_ms=400, max_new_tokens_cap=480)
    endpoint.deploy(tiny_model_dir, {"blue": 100})
    return endpoint


@pytest.fixture(scope="module")
def queued(launch, tiny_model_dir: Path) -> LiveEndpoint:
    # 1 request generates at a time but up to 8 may be in flight, so a second request is not refused at the door
    # (TooManyPendingRequests): it waits for the slot, 50 ms at most; the timeout is far away.
    endpoint = launch(
        max_concurrent_requests=1,
        max_pending_requests=8,
        max_queue_wait_ms=50,
        request_timeout_ms=60_000,
        max_new_tokens_cap=480,
    )
    endpoint.deploy(tiny_model_dir, {"blue": 100})
    return endpoint


def test_past_the_request_timeout_is_408(tight: LiveEndpoint) -> None:
    started = time.monotonic()
    response = httpx.post(f"{tight.url}/score", json=LONG, headers=tight.headers(), timeout=30)
    elapsed = time.monotonic() - started
    assert response.status_code == 408
    assert response.json()["error"]["code"] == "RequestTimeout"
    assert elapsed < 3.0  # answered at the timeout, not after the whole generation
    # a short request still fits in the same budget
    assert httpx.post(f"{tight.url}/score", json=SHORT, headers=tight.headers(), timeout=30).status_code == 200


def test_burst_over_the_limits_gets_429_with_retry_after(tight: LiveEndpoint) -> None:
    def one(_: int) -> httpx.Response:
        return httpx.post(f"{tight.url}/score", json=LONG, headers=tight.headers(), timeout=30)

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(one, range(8)))
    codes = Counter(r.status_code for r in responses)
    assert set(codes) <= {200, 408, 429}, codes
    assert codes[429] >= 5  # at most 2 in flight (1 running, 1 waiting 50 ms): the rest are refused at once
    refused = [r for r in responses if r.status_code == 429]
    assert all(r.headers.get("retry-after", "").isdigit() for r in refused)
    assert {r.json()["error"]["code"] for r in refused} <= {"TooManyPendingRequests", "TooManyRequests"}
    # the endpoint recovers once the burst is over
    time.sleep(0.5)
    assert httpx.post(f"{tight.url}/score", json=SHORT, headers=tight.headers(), timeout=30).status_code == 200


def test_waiting_past_the_queue_wait_is_429_with_retry_after(queued: LiveEndpoint) -> None:
    url = f"{queued.url}/score"
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(httpx.post, url, json=LONG, headers=queued.headers(), timeout=60)
        wait_for(lambda: queued.in_flight("blue") == 1, "the first request to take the only slot")
        started = time.monotonic()
        waited = httpx.post(url, json=SHORT, headers=queued.headers(), timeout=30)
        elapsed = time.monotonic() - started
        first = running.result()
    assert waited.status_code == 429, waited.text
    error = waited.json()["error"]
    assert error["code"] == "TooManyRequests" and "50 ms" in error["message"]  # not TooManyPendingRequests
    assert waited.headers["retry-after"] == "1"  # the 50 ms wait, rounded up to whole seconds
    assert elapsed >= 0.05  # it waited in the queue before the refusal
    assert first.status_code == 200  # the request holding the slot is not disturbed


def test_openai_route_uses_the_openai_error_shape_for_limits(tight: LiveEndpoint) -> None:
    timed_out = None
    for prompt in PROMPTS:
        # Greedy: chat completions sample at temperature 1 by default (OpenAI's), and a sampled reply of the untrained
        # model may draw <|end|> early; its greedy reply never ends (the same token again and again).
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 480, "temperature": 0}
        response = httpx.post(f"{tight.url}/v1/chat/completions", json=body, headers=tight.headers(), timeout=30)
        if response.status_code == 200:
            assert response.json()["choices"][0]["finish_reason"] == "stop", response.text
            continue
        timed_out = response
        break
    assert timed_out is not None, "every prompt ended within 400 ms: no reply ran long enough to time out"
    assert timed_out.status_code == 408, timed_out.text
    error = timed_out.json()["error"]
    assert set(error) >= {"message", "type", "code", "param"} and error["type"] == "timeout_error"


def stream_events(live: LiveEndpoint, prompt: str) -> list[dict | str]:
    """A streamed chat completion's events, decoded (``"[DONE]"`` stays a string); the status must be 200."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 480, "temperature": 0, "stream": True}
    url = f"{live.url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=live.headers(), timeout=30) as response:
        assert response.status_code == 200  # sent with the first chunk, before any timeout can happen
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


def test_a_timeout_while_streaming_is_an_error_event(tight: LiveEndpoint) -> None:
    for prompt in PROMPTS:
        events = stream_events(tight, prompt)
        assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"
        last = events[-2]
        if "error" not in last:
            assert last["choices"][0]["finish_reason"] == "stop", events  # ended within the budget: try another
            continue
        error = last["error"]
        assert error["code"] == "RequestTimeout" and error["type"] == "timeout_error", events
        assert all("error" not in e for e in events[:-2])  # one error event, the last before [DONE]
        return
    pytest.fail("every prompt ended within 400 ms: no streamed reply ran long enough to time out")
