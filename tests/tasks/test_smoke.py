"""The smoke test's verdicts, against a real HTTP server that answers like an OpenAI-compatible endpoint.

The end-to-end smoke test of the real endpoint server runs in tests/flows; here each way an answer can be wrong
is produced on purpose by a scripted server on a free loopback port.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest

from tasks.config import SmokeConfig
from tasks.smoke import PIN_HEADER, smoke_test

KEY = "test-key-not-a-secret"


class _Scripted(BaseHTTPRequestHandler):
    """Answers by prompt: 'ok' ends, 'rambling' is cut at max_tokens, 'empty', 'boom' (500), 'slow'."""

    seen_headers: ClassVar[list[dict[str, str]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen_headers.append(dict(self.headers))
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            return self._send(401, {"error": {"code": "unauthorized", "message": "bad key"}})
        prompt = body["messages"][-1]["content"]
        if prompt == "boom":
            return self._send(500, {"error": {"code": "internal", "message": "model crashed"}})
        if prompt == "slow":
            time.sleep(0.3)
        content, finish = {"rambling": ("and and and", "length"), "empty": ("  ", "stop")}.get(prompt, ("Hi.", "stop"))
        choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
        self._send(200, {"choices": [choice]}, served_by=self.headers.get(PIN_HEADER) or "model-v1")

    def _send(self, status: int, payload: dict[str, Any], served_by: str | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if served_by:
            self.send_header(PIN_HEADER, served_by)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def base_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _problems(base_url: str, prompt: str, **config: Any) -> str | None:
    report = smoke_test(base_url, KEY, SmokeConfig(prompts=[prompt], **config))
    return report.cases[0].problem


def test_a_good_reply_passes_and_the_table_has_the_answer(base_url) -> None:
    report = smoke_test(base_url, KEY, SmokeConfig(prompts=["hello", "what?"]))
    assert report.passed and report.error_rate == 0.0
    assert [row["reply"] for row in report.table()] == ["Hi.", "Hi."]
    assert "2/2 passed" in report.summary()


def test_each_kind_of_bad_answer_is_named(base_url) -> None:
    assert "did not end" in _problems(base_url, "rambling")
    assert _problems(base_url, "empty") == "empty reply"
    assert "HTTP 500" in _problems(base_url, "boom") and "model crashed" in _problems(base_url, "boom")
    assert "latency budget" in _problems(base_url, "slow", latency_budget_s=0.1)
    assert "HTTP 401" in (smoke_test(base_url, "wrong", SmokeConfig(prompts=["hi"])).cases[0].problem or "")


def test_no_server_is_a_failed_case_not_a_crash() -> None:
    report = smoke_test("http://127.0.0.1:9/v1", KEY, SmokeConfig(prompts=["hi"], timeout_s=2))
    assert not report.passed
    assert report.cases[0].status is None and "no answer" in (report.cases[0].problem or "")


def test_pinning_sends_the_deployment_header(base_url) -> None:
    _Scripted.seen_headers.clear()
    report = smoke_test(base_url, KEY, SmokeConfig(prompts=["hi"]), deployment="model-v7")
    assert report.target == "deployment model-v7"
    assert _Scripted.seen_headers[-1][PIN_HEADER] == "model-v7"
    assert report.cases[0].served_by == "model-v7"
    # A mixed report's error rate is the failed share.
    mixed = smoke_test(base_url, KEY, SmokeConfig(prompts=["hi", "boom", "hi", "rambling"]))
    assert mixed.error_rate == pytest.approx(0.5)
