"""The smoke test's verdicts, against a real HTTP server that answers like our endpoint and like Azure ML's.

The end-to-end smoke test of the real endpoint server runs in tests/flows (both routes); here each way an answer
can be wrong is produced on purpose by a scripted server on a free loopback port, on ``/v1/chat/completions`` and on
``/score`` (with the local server's ``x-finish-reason`` header, or without it as an Azure ML MLflow deployment).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest

from tasks.backends.base import EndpointInfo
from tasks.config import SmokeConfig
from tasks.smoke import FINISH_HEADER, PIN_HEADER, resolve_route, smoke_endpoint, smoke_test

KEY = "test-key-not-a-secret"


class _Scripted(BaseHTTPRequestHandler):
    """Answers by prompt: 'ok' ends, 'rambling' is cut at max_tokens, 'empty', 'boom' (500), 'slow', 'odd' (a body
    of the wrong shape). ``/score`` answers a JSON list; under ``/azure`` without ``x-finish-reason``, as Azure ML."""

    seen: ClassVar[list[tuple[str, dict[str, str], dict[str, Any]]]] = []  # (path, headers, body)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((self.path, dict(self.headers), body))
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            return self._send(401, {"error": {"code": "unauthorized", "message": "bad key"}})
        score = self.path.endswith("/score")
        prompt = body["input_data"][0] if score else body["messages"][-1]["content"]
        if prompt == "boom":
            return self._send(500, {"error": {"code": "internal", "message": "model crashed"}})
        if prompt == "odd":
            return self._send(200, {"unexpected": True})
        if prompt == "slow":
            time.sleep(0.3)
        content, finish = {"rambling": ("and and and", "length"), "empty": ("  ", "stop")}.get(prompt, ("Hi.", "stop"))
        served_by = self.headers.get(PIN_HEADER) or "model-v1"
        if score:
            finish_header = None if self.path.startswith("/azure") else finish
            return self._send(200, [content], served_by=served_by, finish=finish_header)
        choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
        self._send(200, {"choices": [choice]}, served_by=served_by)

    def _send(self, status: int, payload: Any, served_by: str | None = None, finish: str | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if served_by:
            self.send_header(PIN_HEADER, served_by)
        if finish:
            self.send_header(FINISH_HEADER, finish)
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
    _Scripted.seen.clear()
    report = smoke_test(base_url, KEY, SmokeConfig(prompts=["hi"]), deployment="model-v7")
    assert report.target == "deployment model-v7"
    assert _Scripted.seen[-1][0] == "/v1/chat/completions" and _Scripted.seen[-1][1][PIN_HEADER] == "model-v7"
    assert report.cases[0].served_by == "model-v7"
    # A mixed report's error rate is the failed share.
    mixed = smoke_test(base_url, KEY, SmokeConfig(prompts=["hi", "boom", "hi", "rambling"]))
    assert mixed.error_rate == pytest.approx(0.5)


def _score(base_url: str, prompt: str, azure: bool = False, **config: Any):
    root = base_url.removesuffix("/v1") + ("/azure" if azure else "")
    report = smoke_test(
        base_url, KEY, SmokeConfig(prompts=[prompt], **config), route="score", scoring_uri=f"{root}/score"
    )
    return report.cases[0]


def test_score_route_sends_the_samples_body_and_reads_the_finish_header(base_url) -> None:
    _Scripted.seen.clear()
    case = _score(base_url, "hello", max_new_tokens=12)
    path, headers, body = _Scripted.seen[-1]
    assert path == "/score"
    assert body == {
        "input_data": ["hello"],
        "params": {"max_new_tokens": 12, "do_sample": False, "return_full_text": False},
    }
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert case.ok and case.reply == "Hi." and case.finish_reason == "stop" and case.end_checked
    # Cut at max_new_tokens, as the local server reports it in x-finish-reason: the same verdict as on /v1.
    assert "did not end" in (_score(base_url, "rambling").problem or "")
    assert _score(base_url, "empty").problem == "empty reply"
    assert "HTTP 500" in (_score(base_url, "boom").problem or "")
    assert "not a JSON list of replies" in (_score(base_url, "odd").problem or "")
    assert "latency budget" in (_score(base_url, "slow", latency_budget_s=0.1).problem or "")


def test_score_route_without_a_finish_reason_passes_on_a_timely_reply_and_says_the_end_was_not_checked(
    base_url,
) -> None:
    """Azure ML's MLflow server does not say why a reply ended: 'rambling' cannot be told from a good reply."""
    config = SmokeConfig(prompts=["hello", "rambling"])
    root = base_url.removesuffix("/v1") + "/azure"
    report = smoke_test(base_url, KEY, config, route="score", scoring_uri=f"{root}/score", deployment="model-v2")
    assert report.passed and report.route == "score"
    assert [c.finish_reason for c in report.cases] == [None, None] and not report.cases[0].end_checked
    assert [row["result"] for row in report.table()] == ["ok (end not reported)"] * 2
    assert "2 without an end check" in report.summary() and "via /score" in report.summary()
    assert report.cases[0].served_by == "model-v2" and _Scripted.seen[-1][1][PIN_HEADER] == "model-v2"
    # What it still catches there: an empty reply, an error, a slow reply.
    assert _score(base_url, "empty", azure=True).problem == "empty reply"
    assert "HTTP 500" in (_score(base_url, "boom", azure=True).problem or "")
    assert "latency budget" in (_score(base_url, "slow", azure=True, latency_budget_s=0.1).problem or "")


def test_the_route_follows_the_config_and_auto_follows_the_backend(base_url) -> None:
    assert resolve_route(SmokeConfig(), "local") == "chat"
    assert resolve_route(SmokeConfig(), "azureml") == "score"
    assert resolve_route(SmokeConfig(route="chat"), "azureml") == "chat"
    assert resolve_route(SmokeConfig(route="score"), "local") == "score"
    root = base_url.removesuffix("/v1")
    endpoint = EndpointInfo("ep", f"{root}/azure/score", base_url, {"model-v1": 100}, [])
    _Scripted.seen.clear()
    assert smoke_endpoint(endpoint, KEY, SmokeConfig(prompts=["hi"]), "azureml").route == "score"
    assert smoke_endpoint(endpoint, KEY, SmokeConfig(prompts=["hi"]), "local").route == "chat"
    assert [path for path, _, _ in _Scripted.seen] == ["/azure/score", "/v1/chat/completions"]
