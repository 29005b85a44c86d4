"""The admin client is the one retry layer of a local endpoint call: a transient fault is retried exactly as the
config's ``retry`` says, never multiplied by the rollout or the flow around it."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deployments.client import EndpointAdminClient
from tasks.backends.base import RetriesExhaustedError, TransientBackendError
from tasks.config import RetryConfig

RETRY = RetryConfig(attempts=3, base_delay_s=0.01, max_delay_s=0.02, jitter=0.5)


class FlakyAdmin(ThreadingHTTPServer):
    """A loopback admin API whose first ``failures`` requests answer 503; counts every request it gets."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.requests: list[str] = []
        super().__init__(("127.0.0.1", 0), _Handler)  # port 0: a free port, picked by the OS


class _Handler(BaseHTTPRequestHandler):
    server: FlakyAdmin

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.requests.append(self.path)
        failing = len(self.server.requests) <= self.server.failures
        status, body = (503, {"error": {"message": "busy"}}) if failing else (200, {"traffic": {"model-v1": 100}})
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def flaky() -> Iterator[Callable[[int], FlakyAdmin]]:
    servers: list[FlakyAdmin] = []

    def start(failures: int) -> FlakyAdmin:
        server = FlakyAdmin(failures)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _client(server: FlakyAdmin, retry: RetryConfig | None = RETRY) -> EndpointAdminClient:
    host, port = server.server_address[:2]
    return EndpointAdminClient(f"http://{host}:{port}", "admin-key", timeout_s=5, retry=retry)


def test_one_transient_fault_is_retried_once(flaky) -> None:
    server = flaky(failures=1)
    assert _client(server).set_traffic({"model-v1": 100}) == {"traffic": {"model-v1": 100}}
    assert server.requests == ["/admin/traffic", "/admin/traffic"]


def test_a_lasting_fault_gets_exactly_retry_attempts_requests_then_a_final_error(flaky) -> None:
    server = flaky(failures=100)
    with pytest.raises(RetriesExhaustedError, match="503") as caught:
        _client(server).set_traffic({"model-v1": 100})
    assert len(server.requests) == RETRY.attempts  # 3, not 3 x 3: nobody above the client retries on the spot
    assert not isinstance(caught.value, TransientBackendError)  # so callers do not multiply the attempts


def test_without_a_policy_the_fault_is_raised_at_once(flaky) -> None:
    server = flaky(failures=1)
    with pytest.raises(TransientBackendError, match="503"):
        _client(server, retry=None).set_traffic({"model-v1": 100})
    assert len(server.requests) == 1
