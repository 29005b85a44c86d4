"""A scripted OpenAI-compatible server behind the real chat page, for the replies a real model cannot be made to give.

It is a real uvicorn server on a free loopback port serving the project's own ``deployments.chat_page`` router
(the page is static, so it is the same page the endpoint serves) and a ``POST /v1/chat/completions`` that speaks
the OpenAI streaming protocol (server-sent events, ``[DONE]``) with answers chosen by the last user message:

- ``markup``: a reply made of HTML markup and script;
- ``long``: a reply that streams for a minute unless the client goes away (it records that it did);
- ``busy``, ``stopping``, ``too slow``: HTTP 429, 503 and 408 as the endpoint answers them (past its queue, while it
  stops, past ``request_timeout_ms`` before streaming); ``timeout``: a few words, then the endpoint's SSE error
  event for a request past ``request_timeout_ms``;
- anything else: ``heard N turns``.

It checks ``Authorization: Bearer <key>`` (401 otherwise) and names the deployment in ``azureml-model-deployment``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from deployments import chat_page
from tests.flow_chat.helpers import free_port

DEPLOYMENT = "scripted-green"
MARKUP_REPLY = '<script>document.title = "pwned"</script><img src=x onerror="window.pwned = 1"><b>bold?</b> & done'
LONG_WORD = "word "
# Questions answered with an error status before any streaming, as the endpoint answers them.
REFUSALS = {
    "busy": (429, "TooManyRequests", "rate_limit_error", "deployment 'scripted-green' is busy; retry later"),
    "stopping": (503, "ServiceUnavailable", "service_unavailable_error", "the endpoint is stopping"),
    "too slow": (408, "RequestTimeout", "timeout_error", "the request took longer than request_timeout_ms"),
}


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    data = {
        "id": "chatcmpl-scripted",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": DEPLOYMENT,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(data)}\n\n".encode()


def _error(status: int, code: str, kind: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "type": kind, "param": None}}


class ScriptedEndpoint:
    def __init__(self, key: str) -> None:
        self.key = key
        self.bodies: list[dict[str, Any]] = []
        self.long_replies_abandoned = 0  # long replies whose client went away before the end
        self._lock = threading.Lock()
        self.port = free_port()
        config = uvicorn.Config(self._app(), host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ScriptedEndpoint:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            assert time.monotonic() < deadline, "the scripted endpoint did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._server.force_exit = True  # a long reply still streaming must not hold the shutdown
        self._thread.join(timeout=10)

    def _app(self) -> FastAPI:
        app = FastAPI()
        app.include_router(chat_page.router)
        app.post("/v1/chat/completions")(self._chat)
        return app

    async def _chat(self, request: Request) -> Any:
        if request.headers.get("authorization") != f"Bearer {self.key}":
            return JSONResponse(_error(401, "Unauthorized", "authentication_error", "invalid or missing key"), 401)
        body = await request.json()
        with self._lock:
            self.bodies.append(body)
        turns = body.get("messages") or []
        question = turns[-1]["content"] if turns else ""
        headers = {"azureml-model-deployment": DEPLOYMENT}
        if question in REFUSALS:
            status, code, kind, message = REFUSALS[question]
            return JSONResponse(_error(status, code, kind, message), status, headers)
        return StreamingResponse(self._stream(question, len(turns)), media_type="text/event-stream", headers=headers)

    async def _stream(self, question: str, turns: int) -> AsyncIterator[bytes]:
        yield _chunk({"role": "assistant", "content": ""})
        if question == "markup":
            for start in range(0, len(MARKUP_REPLY), 12):  # split mid-tag, as tokens would
                yield _chunk({"content": MARKUP_REPLY[start : start + 12]})
                await asyncio.sleep(0.02)
        elif question == "long":
            finished = False
            try:
                for _ in range(3000):
                    yield _chunk({"content": LONG_WORD})
                    await asyncio.sleep(0.02)
                finished = True
            finally:
                if not finished:
                    with self._lock:
                        self.long_replies_abandoned += 1
        elif question == "timeout":
            yield _chunk({"content": "Thinking about it"})
            await asyncio.sleep(0.1)
            error = _error(408, "RequestTimeout", "timeout_error", "the request took longer than request_timeout_ms")
            yield f"data: {json.dumps(error)}\n\n".encode()
            yield b"data: [DONE]\n\n"
            return
        else:
            yield _chunk({"content": f"heard {turns} turns"})
        yield _chunk({}, "stop")
        yield b"data: [DONE]\n\n"
