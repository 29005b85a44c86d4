"""A real HTTP server on a free loopback port that records every request body it receives.

Two modes:
- ``upstream=None``: it answers ``POST /v1/chat/completions`` and ``POST /score`` itself (scripted replies that
  count the turns it got), checks ``Authorization: Bearer <key>`` and answers 401 otherwise; ``delay_s`` makes it slow.
- ``upstream="http://127.0.0.1:PORT"``: a recording proxy in front of the real endpoint; requests and answers
  pass through unchanged, so a test can assert on exactly what the endpoint received.

``key_rotated = True`` plays the endpoint's key being regenerated under a running client (``pf flow serve`` reads
its connection once, at start): the client's key is refused, by this server itself or, as a proxy, by forwarding
a stale key so that the real endpoint answers with its own 401.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# What a proxy forwards once the key has "rotated": a key no endpoint ever issued.
STALE_KEY = "stale-key-from-before-the-rotation"


class RecordingServer:
    def __init__(
        self, *, key: str = "test-key", upstream: str | None = None, delay_s: float = 0.0, chat_route: bool = True
    ) -> None:
        self.key = key
        self.chat_route = chat_route  # False: only /score exists, like an Azure ML no-code MLflow deployment
        self.upstream = upstream.rstrip("/") if upstream else None
        self.delay_s = delay_s
        self.key_rotated = False
        self.requests: list[dict[str, Any]] = []  # {"path", "headers" (lower-case names), "body"}
        self.responses: list[dict[str, Any]] = []  # proxy mode: {"path", "status", "body"} from upstream
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def bodies(self, path_suffix: str = "/chat/completions") -> list[dict[str, Any]]:
        with self._lock:
            return [r["body"] for r in self.requests if r["path"].endswith(path_suffix)]

    def __enter__(self) -> RecordingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _send(self, status: int, payload: bytes, content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw or b"null")
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                with outer._lock:
                    outer.requests.append(
                        {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body}
                    )
                if outer.upstream:
                    self._forward(raw)
                else:
                    self._answer(body)

            def _forward(self, raw: bytes) -> None:
                # No accept-encoding: the answer is recorded as text and passed on without content-encoding.
                dropped = ("host", "content-length", "accept-encoding")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
                if outer.key_rotated:
                    headers = {k: v for k, v in headers.items() if k.lower() not in ("authorization", "api-key")}
                    headers["Authorization"] = f"Bearer {STALE_KEY}"
                request = urllib.request.Request(outer.upstream + self.path, data=raw, headers=headers, method="POST")
                try:
                    with urllib.request.urlopen(request, timeout=120) as response:
                        status, payload = response.status, response.read()
                        content_type = response.headers.get("Content-Type", "application/json")
                except urllib.error.HTTPError as exc:
                    status, payload = exc.code, exc.read()
                    content_type = exc.headers.get("Content-Type", "application/json")
                with outer._lock:
                    outer.responses.append({"path": self.path, "status": status, "body": payload.decode("utf-8")})
                self._send(status, payload, content_type)

            def _answer(self, body: Any) -> None:
                if outer.key_rotated or self.headers.get("Authorization") != f"Bearer {outer.key}":
                    self._send(401, b'{"error": {"message": "invalid or missing key"}}')
                    return
                if outer.delay_s:
                    time.sleep(outer.delay_s)
                if self.path.endswith("/score"):
                    inputs = body.get("input_data", []) if isinstance(body, dict) else []
                    self._send(200, json.dumps([f"scored {len(i)} turns" for i in inputs]).encode())
                    return
                if not outer.chat_route:
                    self._send(404, b'{"detail": "Not Found"}')
                    return
                turns = body.get("messages", []) if isinstance(body, dict) else []
                reply = f"heard {len(turns)} turns; last: {turns[-1]['content'] if turns else ''}"
                payload = {
                    "id": "chatcmpl-test",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", "default") if isinstance(body, dict) else "default",
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
                self._send(200, json.dumps(payload).encode())

        return Handler
