"""The local online endpoint: named deployments behind one loopback address, Azure ML's contract on the outside.

Routes (scoring routes need ``Authorization: Bearer <primary or secondary key>``, or an ``api-key`` header):

- ``POST /score``: the sample's body ``{"input_data": [question | [chat turns]], "params": {...}}`` answers a
  JSON list with one reply per input. ``params``: ``temperature``, ``top_p``, ``max_new_tokens``, ``do_sample``
  (greedy by default, as Hugging Face pipelines) and ``return_full_text``: with ``true`` a plain-string input
  comes back as ``question + "\\n" + reply`` (the pipeline's "prompt followed by the generated text"; the sample
  sends ``true``), while a chat-turn input always answers the reply alone (a rendered template is no text for a
  person). Whether each reply ended properly (an end token) or ran into its token budget is in the response
  header ``x-finish-reason`` (``stop`` or ``length``, comma-separated in input order) and, with the optional
  param ``"return_finish_reason": true``, in the body as ``[{"text", "finish_reason"}, ...]``.
- ``POST /v1/chat/completions`` (OpenAI-compatible, ``stream: true`` as server-sent events) and
  ``GET /v1/models``. ``model`` naming a deployment pins it; any other value goes by traffic.
- ``GET /health`` (alive), ``GET /ready`` (a deployment is loaded), ``GET /metrics`` (Prometheus text), the
  OpenAPI schema at ``/openapi.json``.
- Admin (``Authorization: Bearer <admin key>``): ``GET /admin/state``, ``PUT /admin/deployments/{name}``
  (``{"model_path", "model_version"}``; loads in the background, answers 202 at once),
  ``DELETE /admin/deployments/{name}``, ``PUT /admin/traffic`` (``{"traffic": {name: percent}}``, summing to
  100, or 0 to stop routing).

Routing and limits follow Azure ML online endpoints: ``azureml-model-deployment: <name>`` pins a deployment (also
one at 0 % traffic); 404 when no deployment gets traffic or a pinned one does not exist; 503 while a deployment
loads or the server stops; per deployment, ``max_concurrent_requests`` are generated at once and the rest wait
up to ``max_queue_wait_ms``, with 429 and ``Retry-After`` past that wait or once more than
``max_pending_requests`` (default 2 x ``max_concurrent_requests``, Azure's rule) are in flight; 408 past
``request_timeout_ms`` (with ``stream: true`` the 200 is already sent: the timeout comes as an error event in the
stream, then ``[DONE]``); 413 over ``max_body_bytes``; 400 for input over the model's context; ``max_new_tokens``
is capped at ``max_new_tokens_cap``. Errors are ``{"error": {"code", "message", "type", "param"}}`` (the OpenAI
error shape, which holds Azure's ``code`` and ``message``). The serving deployment is named in the response
header ``azureml-model-deployment``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import random
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask

from deployments.engine import InputTooLongError, ModelRunner, SamplingParams, Sequence
from deployments.keys import KeyStore
from deployments.live_metrics import LiveMetrics
from deployments.rescue import Rescue
from tasks.config import EndpointConfig
from tasks.state import atomic_write_json, read_json

log = logging.getLogger("deployments.server")

PIN_HEADER = "azureml-model-deployment"
FINISH_HEADER = "x-finish-reason"
STATE_FILE = "state.json"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0)
SCORING_ROUTES = ("/score", "/v1/chat/completions", "/v1/models")
PROBE_ROUTES = ("/health", "/ready", "/metrics")  # still answered while the server stops, so it can be watched
SHUTDOWN_TAIL_S = 2  # after the drain: time for uvicorn to flush the last answers and close connections


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with its HTTP status."""

    def __init__(
        self, status: int, code: str, message: str, *, param: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param, self.headers = status, code, message, param, headers or {}


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


def error_body(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"code": code, "message": message, "type": kind, "param": param}}


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(
        error_body(error.status, error.code, error.message, error.param),
        status_code=error.status,
        headers=error.headers,
    )


# ---------------------------------------------------------------------------------------------------------- bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ChatTurn(_Body):
    role: Literal["system", "user", "assistant"]
    content: str


class ScoreParams(_Body):
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_new_tokens: int | None = Field(None, ge=1)
    do_sample: bool | None = None
    return_full_text: bool = False
    return_finish_reason: bool = False  # ours: answer [{"text", "finish_reason"}] instead of plain strings


class ScoreRequest(_Body):
    input_data: list[str | Annotated[list[ChatTurn], Field(min_length=1)]] = Field(..., min_length=1)
    params: ScoreParams = Field(default_factory=ScoreParams)


class TextPart(_Body):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(_Body):
    include_usage: bool = False


class ChatCompletionRequest(_Body):
    model: str | None = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None


class DeploymentSpec(_Body):
    model_path: str = Field(..., min_length=1)
    model_version: str | None = None


class TrafficSpec(_Body):
    traffic: dict[str, int]


class RescueSpec(_Body):
    candidate: str
    champion: str
    ttl_s: float = Field(..., gt=0, le=86_400)


# ---------------------------------------------------------------------------------------------------------- metrics
class Metrics:
    """Counters and latency histograms per deployment, written in Prometheus' text format."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self.latency_count: dict[tuple[str, str], int] = defaultdict(int)
        self.latency_sum: dict[tuple[str, str], float] = defaultdict(float)
        self.latency_buckets: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0] * len(LATENCY_BUCKETS))
        self.tokens: dict[str, int] = defaultdict(int)
        self.batches: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()

    def observe(self, deployment: str, route: str, code: int, seconds: float) -> None:
        with self.lock:
            self.requests[(deployment, route, str(code))] += 1
            key = (deployment, route)
            self.latency_count[key] += 1
            self.latency_sum[key] += seconds
            buckets = self.latency_buckets[key]
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    buckets[i] += 1

    def add_tokens(self, deployment: str, count: int) -> None:
        with self.lock:
            self.tokens[deployment] += count

    def render(self, in_flight: dict[str, int]) -> str:
        bucket = "finetune_phi_request_latency_seconds_bucket"

        def labels(**pairs: str) -> str:
            return "{" + ",".join(f'{k}="{v}"' for k, v in pairs.items()) + "}"

        lines = [
            "# HELP finetune_phi_requests_total Requests answered, by deployment, route and HTTP status.",
            "# TYPE finetune_phi_requests_total counter",
        ]
        with self.lock:
            for (dep, route, code), n in sorted(self.requests.items()):
                lines.append(f"finetune_phi_requests_total{labels(deployment=dep, route=route, code=code)} {n}")
            lines += [
                "# HELP finetune_phi_request_errors_total Requests answered with an HTTP status of 400 or more.",
                "# TYPE finetune_phi_request_errors_total counter",
            ]
            for (dep, route, code), n in sorted(self.requests.items()):
                if int(code) >= 400:
                    lines.append(
                        f"finetune_phi_request_errors_total{labels(deployment=dep, route=route, code=code)} {n}"
                    )
            lines += [
                "# HELP finetune_phi_request_latency_seconds Time from request to the last byte of the answer.",
                "# TYPE finetune_phi_request_latency_seconds histogram",
            ]
            for (dep, route), buckets in sorted(self.latency_buckets.items()):
                for bound, n in zip(LATENCY_BUCKETS, buckets, strict=True):
                    lines.append(f"{bucket}{labels(deployment=dep, route=route, le=str(bound))} {n}")
                count = self.latency_count[(dep, route)]
                lines.append(f"{bucket}{labels(deployment=dep, route=route, le='+Inf')} {count}")
                lines.append(
                    f"finetune_phi_request_latency_seconds_sum{labels(deployment=dep, route=route)} "
                    f"{self.latency_sum[(dep, route)]:.6f}"
                )
                lines.append(
                    f"finetune_phi_request_latency_seconds_count{labels(deployment=dep, route=route)} {count}"
                )
            lines += [
                "# HELP finetune_phi_generated_tokens_total Tokens generated (end tokens not counted).",
                "# TYPE finetune_phi_generated_tokens_total counter",
            ]
            for dep, n in sorted(self.tokens.items()):
                lines.append(f"finetune_phi_generated_tokens_total{labels(deployment=dep)} {n}")
        lines += [
            "# HELP finetune_phi_in_flight_requests Scoring requests admitted or waiting, per deployment.",
            "# TYPE finetune_phi_in_flight_requests gauge",
        ]
        for dep, n in sorted(in_flight.items()):
            lines.append(f"finetune_phi_in_flight_requests{labels(deployment=dep)} {n}")
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------- state
@dataclass
class Deployment:
    name: str
    model_path: str
    model_version: str | None
    state: str = "creating"  # creating, ready, failed
    error: str | None = None
    runner: ModelRunner | None = None
    semaphore: asyncio.Semaphore | None = None
    in_flight: int = 0
    created_at: float = field(default_factory=time.time)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model_path": self.model_path,
            "model_version": self.model_version,
            "state": self.state,
            "error": self.error,
            "in_flight": self.in_flight,
        }


class Endpoint:
    """Deployments, traffic and their persistence. Mutated only on the event loop (loads run in threads)."""

    def __init__(self, config: EndpointConfig, endpoint_dir: Path) -> None:
        self.config = config
        self.dir = endpoint_dir
        self.deployments: dict[str, Deployment] = {}
        self.traffic: dict[str, int] = {}
        self.stopping = False
        self.active = 0  # HTTP requests being answered, probes aside: a stop waits for these
        self.random = random.Random()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.max_pending = config.max_pending_requests or 2 * config.max_concurrent_requests

    # persistence
    def save(self) -> None:
        payload = {
            "name": self.config.name,
            "deployments": {
                n: {"model_path": d.model_path, "model_version": d.model_version} for n, d in self.deployments.items()
            },
            "traffic": self.traffic,
        }
        atomic_write_json(self.dir / STATE_FILE, payload)

    def restore(self) -> None:
        saved = read_json(self.dir / STATE_FILE, default={}) or {}
        for name, spec in (saved.get("deployments") or {}).items():
            self.create(name, spec["model_path"], spec.get("model_version"), persist=False)
        self.traffic = {k: int(v) for k, v in (saved.get("traffic") or {}).items() if k in self.deployments}

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.config.name,
            "stopping": self.stopping,
            "deployments": {n: d.describe() for n, d in self.deployments.items()},
            "traffic": dict(self.traffic),
        }

    # admin
    def create(self, name: str, model_path: str, model_version: str | None, *, persist: bool = True) -> Deployment:
        old = self.deployments.get(name)
        deployment = Deployment(name, model_path, model_version)
        deployment.semaphore = asyncio.Semaphore(self.config.max_concurrent_requests)
        self.deployments[name] = deployment
        if old is not None and old.runner is not None:
            old.runner.close()  # requests already queued on it still finish
        if persist:
            self.save()
        threading.Thread(target=self._load, args=(deployment,), name=f"load-{name}", daemon=True).start()
        return deployment

    def _load(self, deployment: Deployment) -> None:
        started = time.monotonic()
        try:
            runner = ModelRunner(
                deployment.model_path,
                max_batch_size=self.config.max_batch_size,
                batch_wait_ms=self.config.batch_wait_ms,
                torch_threads=self.config.torch_threads,
            )
        except Exception as exc:
            log.warning("deployment %s failed to load %s: %s", deployment.name, deployment.model_path, exc)
            self._on_loop(self._loaded, deployment, None, f"{type(exc).__name__}: {exc}")
            return
        log.info("deployment %s loaded in %.1f s", deployment.name, time.monotonic() - started)
        self._on_loop(self._loaded, deployment, runner, None)

    def _on_loop(self, fn: Any, *args: Any) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(fn, *args)

    def _loaded(self, deployment: Deployment, runner: ModelRunner | None, error: str | None) -> None:
        if self.deployments.get(deployment.name) is not deployment:  # deleted or replaced while loading
            if runner is not None:
                runner.close()
            return
        deployment.runner = runner
        deployment.state, deployment.error = ("ready", None) if runner is not None else ("failed", error)

    def delete(self, name: str) -> None:
        deployment = self.deployments.get(name)
        if deployment is None:
            raise ApiError(404, "DeploymentNotFound", f"no deployment named {name!r}", param="name")
        if self.traffic.get(name, 0) > 0:
            raise ApiError(
                409,
                "DeploymentHasTraffic",
                f"deployment {name!r} still receives {self.traffic[name]}% of the traffic; "
                "move its traffic to another deployment first",
            )
        del self.deployments[name]
        self.traffic.pop(name, None)
        if deployment.runner is not None:
            deployment.runner.close()
        self.save()

    def set_traffic(self, traffic: dict[str, int]) -> None:
        unknown = sorted(set(traffic) - set(self.deployments))
        if unknown:
            raise ApiError(400, "DeploymentNotFound", f"no deployment named {', '.join(unknown)}", param="traffic")
        if any(not 0 <= v <= 100 for v in traffic.values()):
            raise ApiError(400, "InvalidTraffic", "traffic percentages must be between 0 and 100", param="traffic")
        total = sum(traffic.values())
        if total not in (0, 100):
            raise ApiError(
                400, "InvalidTraffic", f"traffic percentages must sum to 100 (or 0), not {total}", param="traffic"
            )
        self.traffic = {k: int(v) for k, v in traffic.items() if v > 0}
        self.save()

    # routing
    def route(self, pinned: str | None) -> Deployment:
        if pinned:
            deployment = self.deployments.get(pinned)
            if deployment is None:
                raise ApiError(
                    404,
                    "DeploymentNotFound",
                    f"no deployment named {pinned!r} (from the {PIN_HEADER} header or the model field)",
                    param=PIN_HEADER,
                )
        else:
            weighted = [(n, w) for n, w in self.traffic.items() if w > 0 and n in self.deployments]
            if not weighted:
                raise ApiError(
                    404,
                    "NoTraffic",
                    "no deployment receives traffic; set traffic with the admin API or pin one with the "
                    f"{PIN_HEADER} header",
                )
            names, weights = zip(*weighted, strict=True)
            deployment = self.deployments[self.random.choices(names, weights=weights)[0]]
        if deployment.state != "ready" or deployment.runner is None:
            detail = f" ({deployment.error})" if deployment.error else ""
            raise ApiError(
                503,
                "DeploymentNotReady",
                f"deployment {deployment.name!r} is {deployment.state}{detail}; retry once it is ready",
                headers={"Retry-After": "5"},
            )
        return deployment


class Slot:
    """A deployment's admission for one request: counted while it waits and while it runs; released once."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self.acquired = False
        self.released = False
        deployment.in_flight += 1

    async def acquire(self, wait_s: float) -> None:
        assert self.deployment.semaphore is not None
        try:
            await asyncio.wait_for(self.deployment.semaphore.acquire(), timeout=max(wait_s, 0.0))
        except TimeoutError:
            self.release()
            raise ApiError(
                429,
                "TooManyRequests",
                f"deployment {self.deployment.name!r} is busy: no slot became free within the queue wait "
                f"of {int(wait_s * 1000)} ms; retry later",
                headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
            ) from None
        self.acquired = True

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.deployment.in_flight -= 1
        if self.acquired and self.deployment.semaphore is not None:
            self.deployment.semaphore.release()


# ---------------------------------------------------------------------------------------------------------- app
async def _send_error(
    send: Any, status: int, code: str, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    """Answer ``{"error": {...}}`` from pure ASGI middleware, before FastAPI's handlers see the request."""
    payload = json.dumps(error_body(status, code, message)).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": payload})


class _Drain:
    """Pure ASGI middleware: counts the requests being answered and, once the endpoint stops, answers new ones 503
    (probes aside) so that a stop waits only for the requests it had already taken."""

    def __init__(self, app: Any, endpoint: Endpoint) -> None:
        self.app, self.endpoint = app, endpoint

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in PROBE_ROUTES:
            await self.app(scope, receive, send)
            return
        if self.endpoint.stopping:
            # connection: close, so that a client does not reuse a keep-alive connection to a server going away
            await _send_error(
                send,
                503,
                "ServiceUnavailable",
                "the endpoint is stopping; retry against the restarted server",
                ((b"connection", b"close"),),
            )
            return
        self.endpoint.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.endpoint.active -= 1


class _BodyLimit:
    """Pure ASGI middleware: 413 for bodies over the limit, read before the app parses them."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(send)
            return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.limit:
                await self._reject(send)
                return
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send: Any) -> None:
        await _send_error(send, 413, "PayloadTooLarge", f"the request body is over the limit of {self.limit} bytes")


class _Observe:
    """Pure ASGI middleware: per-deployment request counts and latency for /metrics (the handler names the
    deployment in ``scope["state"]``)."""

    def __init__(self, app: Any, metrics: Metrics, live: LiveMetrics) -> None:
        self.app, self.metrics, self.live = app, metrics, live

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def watch(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            path = scope.get("path", "")
            route = path if path in SCORING_ROUTES or path.startswith("/admin") else None
            if route is not None:
                state = scope.get("state") or {}
                route = "/admin" if route.startswith("/admin") else route
                ended = time.perf_counter()
                deployment = state.get("deployment", "none")
                self.metrics.observe(deployment, route, status, ended - started)
                if route in ("/score", "/v1/chat/completions"):
                    # Per token from admission: time queued for a slot is load on the endpoint, not the model.
                    generating = ended - state.get("admitted_at", started)
                    tokens, finishes = state.get("generated_tokens", 0), state.get("finish_reasons", ())
                    self.live.record(deployment, state.get("stream_status", status), generating, tokens, finishes)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("api-key") or None


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


def create_app(config: EndpointConfig, state_dir: str | Path) -> FastAPI:
    """The endpoint's ASGI app. Deployments saved in ``<state_dir>/endpoint/state.json`` load at start-up."""
    endpoint_dir = Path(state_dir) / "endpoint"
    endpoint_dir.mkdir(parents=True, exist_ok=True)
    keys = KeyStore(endpoint_dir)
    endpoint = Endpoint(config, endpoint_dir)
    metrics = Metrics()
    live = LiveMetrics()
    rescue = Rescue()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        endpoint.loop = asyncio.get_running_loop()
        endpoint.restore()
        yield
        endpoint.stopping = True
        for deployment in endpoint.deployments.values():
            if deployment.runner is not None:
                deployment.runner.close()

    app = FastAPI(
        title=f"finetune-phi endpoint {config.name}",
        version="1",
        description=(__doc__ or "").split("\n\n")[0],
        lifespan=lifespan,
    )
    app.state.endpoint = endpoint
    app.state.metrics = metrics
    app.state.live_metrics = live

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "value_error"}
        field_name = _field_name(tuple(first.get("loc", ())))
        if first.get("type") == "json_invalid":
            return error_response(
                ApiError(400, "InvalidJson", f"the body is not valid JSON: {first['msg']}", param="body")
            )
        message = f"field '{field_name}': {first.get('msg', 'invalid value')}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem(s))"
        return error_response(ApiError(422, "InvalidField", message, param=field_name))

    bearer = HTTPBearer(auto_error=False, description="The endpoint's primary or secondary key (or the admin key)")

    def require_key(request: Request, _: Any = Security(bearer)) -> None:
        if not keys.is_scoring_key(_bearer(request)):
            raise ApiError(
                401,
                "Unauthorized",
                "missing or wrong key: send 'Authorization: Bearer <endpoint key>' "
                "(`finetune-phi endpoint keys` shows the keys)",
            )

    def require_admin(request: Request, _: Any = Security(bearer)) -> None:
        if not keys.is_admin_key(_bearer(request)):
            raise ApiError(401, "Unauthorized", "missing or wrong admin key: send 'Authorization: Bearer <admin key>'")

    scoring_auth = Depends(require_key)
    admin_auth = Depends(require_admin)

    # ----------------------------------------------------------------------------------------------- generation
    def budget(requested: int | None, room: int) -> int:
        wanted = requested if requested is not None else config.default_max_new_tokens
        return max(1, min(wanted, config.max_new_tokens_cap, room))

    def sequences_for(runner: ModelRunner, prompts: list[list[int]], params: list[SamplingParams]) -> list[Sequence]:
        return [Sequence(ids, p) for ids, p in zip(prompts, params, strict=True)]

    def encode(runner: ModelRunner, messages: list[dict[str, str]], param: str) -> list[int]:
        try:
            ids = runner.encode_chat(messages)
        except Exception as exc:  # the model's chat template refuses the conversation (empty, roles out of order)
            raise ApiError(
                400, "InvalidConversation", f"the model's chat template cannot render this input: {exc}", param=param
            ) from None
        try:
            runner.check_fits(ids)
        except InputTooLongError as exc:
            raise ApiError(400, "InputTooLong", str(exc), param=param) from None
        return ids

    async def admitted(deployment: Deployment, request_started: float) -> Slot:
        if deployment.in_flight >= endpoint.max_pending:
            raise ApiError(
                429,
                "TooManyPendingRequests",
                f"too many pending requests for deployment {deployment.name!r} "
                f"(more than {endpoint.max_pending} in flight); retry later",
                headers={"Retry-After": "1"},
            )
        slot = Slot(deployment)
        timeout_left = config.request_timeout_ms / 1000.0 - (time.monotonic() - request_started)
        await slot.acquire(min(config.max_queue_wait_ms / 1000.0, max(timeout_left, 0.0)))
        return slot

    async def run_all(deployment: Deployment, seqs: list[Sequence], request_started: float) -> None:
        loop = asyncio.get_running_loop()
        futures = []
        for seq in seqs:
            future: asyncio.Future[Sequence] = loop.create_future()

            def done(s: Sequence, f: asyncio.Future[Sequence] = future) -> None:
                loop.call_soon_threadsafe(lambda: f.done() or f.set_result(s))

            seq.on_done = done
            futures.append(future)
        assert deployment.runner is not None
        for seq in seqs:
            deployment.runner.submit(seq)
        remaining = config.request_timeout_ms / 1000.0 - (time.monotonic() - request_started)
        try:
            await asyncio.wait_for(asyncio.gather(*futures), timeout=max(remaining, 0.001))
        except TimeoutError:
            raise ApiError(
                408,
                "RequestTimeout",
                f"the request took longer than request_timeout_ms ({config.request_timeout_ms} ms); "
                "ask for fewer max_new_tokens or raise the timeout",
            ) from None
        finally:
            for seq in seqs:
                if seq.finish_reason is None:
                    seq.cancel()
        metrics.add_tokens(deployment.name, sum(len(s.generated) for s in seqs))
        failed = next((s for s in seqs if s.finish_reason == "error"), None)
        if failed is not None:
            raise ApiError(500, "GenerationFailed", f"generation failed: {failed.error}")

    def pinned_from(request: Request, model: str | None = None) -> str | None:
        header = request.headers.get(PIN_HEADER)
        if header:
            return header
        if model and model in endpoint.deployments:
            return model
        return None

    # ----------------------------------------------------------------------------------------------- routes
    @app.get("/health", tags=["probes"])
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "stopping" if endpoint.stopping else "alive"}

    @app.get("/ready", tags=["probes"])
    async def ready() -> JSONResponse:
        """Readiness: 200 once a deployment is loaded (and the server is not stopping), else 503."""
        ready_names = [n for n, d in endpoint.deployments.items() if d.state == "ready"]
        ok = bool(ready_names) and not endpoint.stopping
        return JSONResponse({"ready": ok, "deployments": ready_names}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["probes"], response_class=PlainTextResponse)
    async def metrics_text() -> PlainTextResponse:
        """Prometheus text: requests, errors, latency, generated tokens, in flight; per deployment."""
        in_flight = {n: d.in_flight for n, d in endpoint.deployments.items()}
        return PlainTextResponse(metrics.render(in_flight), media_type="text/plain; version=0.0.4")

    @app.post(
        "/score",
        tags=["scoring"],
        responses={200: {"description": "One reply per input"}},
        dependencies=[scoring_auth],
    )
    async def score(request: Request, body: ScoreRequest) -> Any:
        """The sample's scoring route: one generated text per item of ``input_data``."""
        started = time.monotonic()
        return await with_rescue(request, pinned_from(request), lambda d: score_on(request, body, d, started))

    async def with_rescue(request: Request, pinned: str | None, attempt: Any) -> Any:
        """``attempt`` on the routed deployment; during a rollout, once more on the champion when the new
        deployment failed server-side or could not admit the request (:mod:`deployments.rescue`)."""
        deployment = endpoint.route(pinned)
        try:
            return await attempt(deployment)
        except ApiError as exc:
            champion = rescue.target(deployment.name, pinned is not None, exc.status)
            if champion is None or champion not in endpoint.deployments:
                raise
            status, reason = exc.status, exc.message
        # The candidate's failure counts in its numbers (the alarms must see it); the client sees the champion's.
        metrics.observe(deployment.name, request.url.path, status, 0.0)
        live.record(deployment.name, status, 0.0)
        live.rescued(deployment.name)
        log.warning("rescued: %s answered %d (%s); retrying on %s", deployment.name, status, reason, champion)
        for name in ("admitted_at", "generated_tokens", "finish_reasons"):
            if hasattr(request.state, name):
                delattr(request.state, name)
        return await attempt(endpoint.route(champion))

    async def score_on(request: Request, body: ScoreRequest, deployment: Deployment, started: float) -> JSONResponse:
        request.state.deployment = deployment.name
        runner = deployment.runner
        assert runner is not None
        p = body.params
        do_sample = bool(p.do_sample) and (p.temperature is None or p.temperature > 0)
        prompts, params = [], []
        for index, item in enumerate(body.input_data):
            messages = [{"role": "user", "content": item}] if isinstance(item, str) else [t.model_dump() for t in item]
            ids = encode(runner, messages, f"input_data.{index}")
            prompts.append(ids)
            params.append(
                SamplingParams(
                    max_new_tokens=budget(p.max_new_tokens, runner.check_fits(ids)),
                    do_sample=do_sample,
                    temperature=p.temperature if p.temperature is not None else 1.0,
                    top_p=p.top_p if p.top_p is not None else 1.0,
                )
            )
        slot = await admitted(deployment, started)
        request.state.admitted_at = time.perf_counter()
        try:
            seqs = sequences_for(runner, prompts, params)
            await run_all(deployment, seqs, started)
        finally:
            slot.release()
        request.state.generated_tokens = sum(len(s.generated) for s in seqs)
        request.state.finish_reasons = [s.finish_reason or "" for s in seqs]
        replies = []
        for item, seq in zip(body.input_data, seqs, strict=True):
            text = seq.text
            if p.return_full_text and isinstance(item, str):
                text = f"{item}\n{text}"
            replies.append({"text": text, "finish_reason": seq.finish_reason} if p.return_finish_reason else text)
        headers = {PIN_HEADER: deployment.name, FINISH_HEADER: ",".join(s.finish_reason or "" for s in seqs)}
        return JSONResponse(replies, headers=headers)

    @app.get("/v1/models", tags=["openai"], dependencies=[scoring_auth])
    async def list_models(request: Request) -> dict[str, Any]:
        """The endpoint and its ready deployments, as OpenAI model ids (a deployment's name pins it)."""
        created = int(time.time())
        ids = [config.name] + [n for n, d in endpoint.deployments.items() if d.state == "ready"]
        return {
            "object": "list",
            "data": [{"id": i, "object": "model", "created": created, "owned_by": "finetune-phi"} for i in ids],
        }

    @app.post("/v1/chat/completions", tags=["openai"], dependencies=[scoring_auth])
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Any:
        """OpenAI-compatible chat completions; ``stream: true`` answers server-sent events."""
        started = time.monotonic()
        pinned = pinned_from(request, body.model)
        return await with_rescue(request, pinned, lambda d: chat_on(request, body, d, started))

    async def chat_on(request: Request, body: ChatCompletionRequest, deployment: Deployment, started: float) -> Any:
        request.state.deployment = deployment.name
        runner = deployment.runner
        assert runner is not None
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages
        ]
        ids = encode(runner, messages, "messages")
        temperature = 1.0 if body.temperature is None else body.temperature  # OpenAI's default: sampling at 1
        params = SamplingParams(
            max_new_tokens=budget(body.max_completion_tokens or body.max_tokens, runner.check_fits(ids)),
            do_sample=temperature > 0,
            temperature=temperature,
            top_p=body.top_p if body.top_p is not None else 1.0,
        )
        stops = [body.stop] if isinstance(body.stop, str) else [s for s in (body.stop or []) if s]
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        model_name = body.model or deployment.name
        headers = {PIN_HEADER: deployment.name}
        slot = await admitted(deployment, started)
        request.state.admitted_at = time.perf_counter()
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = _stream_chat(
                deployment, Sequence(ids, params), slot, started, completion_id, model_name, stops, include_usage,
                request.state,
            )  # fmt: skip
            return StreamingResponse(
                stream, media_type="text/event-stream", headers=headers, background=BackgroundTask(slot.release)
            )
        try:
            seq = Sequence(ids, params)
            await run_all(deployment, [seq], started)
        finally:
            slot.release()
        text, finish = _apply_stops(seq.text, stops, seq.finish_reason or "stop")
        request.state.generated_tokens, request.state.finish_reasons = len(seq.generated), [finish or ""]
        payload = {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {
                "prompt_tokens": len(ids),
                "completion_tokens": len(seq.generated),
                "total_tokens": len(ids) + len(seq.generated),
            },
        }
        return JSONResponse(payload, headers=headers)

    async def _stream_chat(
        deployment: Deployment,
        seq: Sequence,
        slot: Slot,
        started: float,
        completion_id: str,
        model_name: str,
        stops: list[str],
        include_usage: bool,
        observed: Any,
    ) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[bool] = asyncio.Queue()
        seq.on_token = lambda s: loop.call_soon_threadsafe(updates.put_nowait, False)
        seq.on_done = lambda s: loop.call_soon_threadsafe(updates.put_nowait, True)
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None, usage: dict[str, int] | None = None) -> bytes:
            data: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            if usage is not None:
                data["choices"], data["usage"] = [], usage
            return f"data: {json.dumps(data)}\n\n".encode()

        sent, finish = 0, None
        try:
            assert deployment.runner is not None
            deployment.runner.submit(seq)
            yield chunk({"role": "assistant", "content": ""}, None)
            while finish is None:
                remaining = config.request_timeout_ms / 1000.0 - (time.monotonic() - started)
                try:
                    is_done = await asyncio.wait_for(updates.get(), timeout=max(remaining, 0.001))
                except TimeoutError:
                    seq.cancel()
                    error = error_body(408, "RequestTimeout", "the request took longer than request_timeout_ms")
                    observed.stream_status = 408  # the 200 is already sent: the alarms count the error event
                    yield f"data: {json.dumps(error)}\n\n".encode()
                    break
                text, stop_finish = _apply_stops(seq.text, stops, None)
                if len(text) > sent and not text.endswith("\ufffd"):  # hold back a half-decoded character
                    yield chunk({"content": text[sent:]}, None)
                    sent = len(text)
                if stop_finish is not None:
                    seq.cancel()
                    finish = "stop"
                elif is_done:
                    if seq.finish_reason == "error":
                        error = error_body(500, "GenerationFailed", f"generation failed: {seq.error}")
                        observed.stream_status = 500
                        yield f"data: {json.dumps(error)}\n\n".encode()
                        break
                    text, _ = _apply_stops(seq.text, stops, None)
                    if len(text) > sent:
                        yield chunk({"content": text[sent:]}, None)
                    finish = seq.finish_reason or "stop"
            if finish is not None:
                yield chunk({}, finish)
                if include_usage:
                    usage = {
                        "prompt_tokens": len(seq.prompt_ids),
                        "completion_tokens": len(seq.generated),
                        "total_tokens": len(seq.prompt_ids) + len(seq.generated),
                    }
                    yield chunk({}, None, usage)
            yield b"data: [DONE]\n\n"
        finally:
            if seq.finish_reason is None:
                seq.cancel()
            metrics.add_tokens(deployment.name, len(seq.generated))
            observed.generated_tokens, observed.finish_reasons = len(seq.generated), [finish or ""]
            slot.release()

    # ----------------------------------------------------------------------------------------------- admin
    @app.get("/admin/state", tags=["admin"], dependencies=[admin_auth])
    async def admin_state(request: Request) -> dict[str, Any]:
        """Deployments (creating, ready or failed, with the load error), traffic, and whether the server stops."""
        return endpoint.describe()

    @app.get("/admin/metrics", tags=["admin"], dependencies=[admin_auth])
    async def admin_metrics(request: Request) -> dict[str, Any]:
        """Per-deployment answers by status, finish reasons, seconds-per-token histogram, rescued requests
        (cumulative since the server started; :mod:`deployments.live_metrics`): what the rollout's alarms read."""
        return live.to_json()

    @app.put("/admin/rescue", tags=["admin"], dependencies=[admin_auth])
    async def admin_rescue(request: Request, body: RescueSpec) -> dict[str, Any]:
        """During a rollout: retry the candidate's server-side failures once on the champion, for ``ttl_s``."""
        for name in (body.candidate, body.champion):
            if name not in endpoint.deployments:
                raise ApiError(404, "DeploymentNotFound", f"no deployment named {name!r}", param="rescue")
        try:
            rescue.arm(body.candidate, body.champion, body.ttl_s)
        except ValueError as exc:
            raise ApiError(422, "InvalidField", str(exc), param="champion") from None
        return {"rescue": rescue.describe()}

    @app.delete("/admin/rescue", tags=["admin"], dependencies=[admin_auth])
    async def admin_no_rescue(request: Request) -> dict[str, Any]:
        """The rollout is over: failures reach the client again."""
        rescue.disarm()
        return {"rescue": None}

    @app.put("/admin/deployments/{name}", tags=["admin"], status_code=202, dependencies=[admin_auth])
    async def admin_create(request: Request, name: str, body: DeploymentSpec) -> dict[str, Any]:
        """Create or replace a deployment; the model loads in the background (poll ``GET /admin/state``)."""
        if not name.replace("-", "").replace("_", "").isalnum() or len(name) > 64:
            raise ApiError(
                422, "InvalidField", "field 'name': letters, digits, '-' and '_' only, at most 64", param="name"
            )
        return endpoint.create(name, body.model_path, body.model_version).describe()

    @app.delete("/admin/deployments/{name}", tags=["admin"], dependencies=[admin_auth])
    async def admin_delete(request: Request, name: str) -> dict[str, Any]:
        """Delete a deployment that receives no traffic."""
        endpoint.delete(name)
        return endpoint.describe()

    @app.put("/admin/traffic", tags=["admin"], dependencies=[admin_auth])
    async def admin_traffic(request: Request, body: TrafficSpec) -> dict[str, Any]:
        """Set the traffic split: percentages per deployment summing to 100 (or 0: route nothing)."""
        endpoint.set_traffic(body.traffic)
        return endpoint.describe()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return error_response(ApiError(500, "InternalError", f"internal error ({type(exc).__name__}); see the log"))

    app.add_middleware(_BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(_Drain, endpoint=endpoint)  # outside the body limit: a stopping server reads no body
    app.add_middleware(_Observe, metrics=metrics, live=live)  # outermost: counts the 503s of a stop and the 413s too
    return app


def _apply_stops(text: str, stops: list[str], finish: str | None) -> tuple[str, str | None]:
    """Cut ``text`` at the first stop string (OpenAI's ``stop``); the finish reason becomes ``stop`` then."""
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    if cut >= 0:
        return text[:cut], "stop"
    return text, finish


# ---------------------------------------------------------------------------------------------------------- main
class _DrainingServer(uvicorn.Server):
    """uvicorn closes its listening socket within 0.1 s of SIGTERM, so a request sent during a stop would find the
    port closed. Here the first SIGTERM/SIGINT only marks the endpoint as stopping: the port stays open and answers
    503 until the requests already taken are done, or ``grace_s`` runs out; then uvicorn's own shutdown runs. A
    second signal skips the rest of the drain (a third, SIGINT, forces the exit as in uvicorn)."""

    def __init__(self, config: uvicorn.Config, endpoint: Endpoint, grace_s: float) -> None:
        super().__init__(config)
        self.endpoint, self.grace_s = endpoint, grace_s
        self.drain_until: float | None = None
        self.drain_logged = False

    def handle_exit(self, sig: int, frame: Any) -> None:
        # Runs as a signal handler: set flags only (logging here could deadlock on the handler's lock).
        if self.drain_until is None:
            # uvicorn re-raises the captured signals once it has shut down, so the process still ends by SIGTERM
            self._captured_signals.append(sig)
            self.endpoint.stopping = True
            self.drain_until = time.monotonic() + self.grace_s
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_until is not None and not self.should_exit:
            self.should_exit = self._drained(self.drain_until - time.monotonic())
        return await super().on_tick(counter)

    def _drained(self, left_s: float) -> bool:
        active = self.endpoint.active
        if active == 0:
            log.info("stopping: no request in flight")
            return True
        if left_s <= 0:
            log.warning("stopping: %d request(s) still in flight after %.0f s; cancelling them", active, self.grace_s)
            return True
        if not self.drain_logged:
            self.drain_logged = True
            log.info("stopping: %d request(s) in flight finish (up to %.0f s); new ones get 503", active, left_s)
        return False


def run(config: EndpointConfig, state_dir: Path) -> None:
    """Serve until SIGTERM/SIGINT: then new requests get 503 and in-flight ones finish (up to ``stop_grace_s``)."""
    app = create_app(config, state_dir)
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level="info",
        access_log=True,  # method, path and status only: uvicorn never logs headers, so keys stay out
        timeout_graceful_shutdown=SHUTDOWN_TAIL_S,  # the drain above already waited for the requests in flight
        timeout_keep_alive=5,
    )
    _DrainingServer(uv_config, app.state.endpoint, config.stop_grace_s).run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the endpoint server in the foreground (service.py runs this).")
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--endpoint-config", required=True, type=Path, help="JSON of tasks.config.EndpointConfig")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = EndpointConfig.model_validate(json.loads(args.endpoint_config.read_text(encoding="utf-8")))
    run(config, args.state_dir)


if __name__ == "__main__":
    main()
