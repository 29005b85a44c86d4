"""The local online endpoint's router: one loopback address, Azure ML's contract on the outside, each deployment in
processes of its own behind it (as on Azure ML, where every deployment runs on its own instances).

This process holds the keys, the traffic split, the limits, the admin API, the state and ``/metrics``; it loads no
model and imports no torch. Each deployment instance is a ``python -m deployments.model_server`` process it starts,
probes, restarts and stops (:mod:`deployments.instances`); a crash or a memory blow-up there cannot take the router
or another deployment down.

Routes (scoring routes need ``Authorization: Bearer <primary or secondary key>``, or an ``api-key`` header):

- ``POST /score``: the sample's body ``{"input_data": [question | [chat turns]], "params": {...}}`` answers a
  JSON list with one reply per input. ``params``: ``temperature``, ``top_p``, ``max_new_tokens``, ``do_sample``
  (greedy by default, as Hugging Face pipelines) and ``return_full_text``: with ``true`` a plain-string input
  comes back as ``question + "\\n" + reply`` (the pipeline's "prompt followed by the generated text"; the sample
  sends ``true``), while a chat-turn input always answers the reply alone (a rendered template is no text for a
  person). Whether each reply ended properly (an end token) or ran into its token budget is in the response
  header ``x-finish-reason`` (``stop`` or ``length``, comma-separated in input order) and, with the optional
  param ``"return_finish_reason": true``, in the body as ``[{"text", "finish_reason"}, ...]``.
- ``POST /v1/chat/completions`` (OpenAI-compatible, ``stream: true`` as server-sent events, relayed chunk by chunk)
  and ``GET /v1/models``. ``model`` naming a deployment pins it; any other value goes by traffic.
- ``GET /health`` (alive), ``GET /ready`` (a deployment has a ready instance), ``GET /metrics`` (Prometheus text),
  the OpenAPI schema at ``/openapi.json``.
- Admin (``Authorization: Bearer <admin key>``): ``GET /admin/state`` (deployments with their instances: PID,
  state, restarts, RSS, oom_score_adj), ``GET /admin/metrics`` (JSON per deployment: requests by status, latency
  and latency-per-token histograms, finish reasons, tokens, restarts), ``PUT /admin/deployments/{name}``
  (``{"model_path", "model_version", "memory_limit_mb", "instance_count"}``; starts in the background, answers 202
  at once), ``DELETE /admin/deployments/{name}`` (stops its processes), ``PUT /admin/traffic``
  (``{"traffic": {name: percent}}``, summing to 100, or 0 to stop routing).

Routing and limits follow Azure ML online endpoints: ``azureml-model-deployment: <name>`` pins a deployment (also
one at 0 % traffic); 404 when no deployment gets traffic or a pinned one does not exist; 503 while a deployment
starts, restarts or the server stops; per instance, ``max_concurrent_requests`` are generated at once and the rest
wait up to ``max_queue_wait_ms``, with 429 and ``Retry-After`` past that wait or once more than
``max_pending_requests`` (default 2 x ``max_concurrent_requests``, Azure's rule) x ready instances are in flight; a
request goes to the least loaded ready instance; 408 past ``request_timeout_ms`` (with ``stream: true`` the 200 is
already sent: the timeout comes as an error event in the stream, then ``[DONE]``); 502 ``ModelContainerCrashed``
for requests in flight on an instance whose process crashed (Azure ML's code for an exception or crash in the model
container; "troubleshoot online endpoints", HTTP status codes); 413 over ``max_body_bytes``; 400 for input over
the model's context; ``max_new_tokens`` is capped at ``max_new_tokens_cap``. Errors are ``{"error": {"code",
"message", "type", "param"}}`` (the OpenAI error shape, which holds Azure's ``code`` and ``message``). The serving
deployment is named in the response header ``azureml-model-deployment``.

Deployment and endpoint names follow Azure's rule (:mod:`deployments.names`); a model path must be under the state
folder, under one of ``endpoint.model_roots`` or a model registered in the state folder's MLflow store; the model's
size is checked against ``memory_limit_mb`` and the machine before any process starts (:mod:`deployments.memory`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import random
import sqlite3
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import httpx
import psutil
import uvicorn
from fastapi import Depends, FastAPI, Request, Security
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from pydantic import Field, ValidationError

from deployments import chat_page, external
from deployments import instances as procs
from deployments.device import DEVICE_PATTERN, PlacementError, cuda_facts_without_torch
from deployments.engines import EngineUnavailableError, check_engine
from deployments.keys import KeyStore
from deployments.memory import (
    IDLE_OOM_SCORE_ADJ,
    LIVE_OOM_SCORE_ADJ,
    MAX_OOM_SCORE_ADJ,
    MemoryCheckError,
    check_fits,
    oom_score_adj,
    set_oom_score_adj,
    tree_rss,
)
from deployments.names import name_problem
from deployments.protocol import (
    FINISH_HEADER,
    INSTANCE_TOKEN_HEADER,
    PIN_HEADER,
    SERVER_TIMING_HEADER,
    TIME_LEFT_HEADER,
    TOKENS_HEADER,
    ApiError,
    ChatCompletionRequest,
    RequestBody,
    ScoreRequest,
    error_body,
    error_response,
    install_error_handlers,
    invalid_body,
)
from deployments.rescue import Rescue
from tasks.config import EndpointConfig
from tasks.guardrails.metrics import SECONDS_PER_TOKEN_BOUNDS, bucket_of
from tasks.state import atomic_write_json, read_json

log = logging.getLogger("deployments.server")

STATE_FILE = "state.json"
INSTANCE_CONFIG_FILE = "instance-config.json"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0)
SCORING_ROUTES = ("/score", "/v1/chat/completions", "/v1/models")
PROBE_ROUTES = ("/health", "/ready", "/metrics")  # still answered while the server stops, so it can be watched
SHUTDOWN_TAIL_S = 2  # after the drain: time for uvicorn to flush the last answers and close connections
# The deployment process times a request out itself (it gets the time left); the router waits this much longer
# before answering 408 on its behalf (a process whose event loop is stuck).
BACKSTOP_S = 1.0
REGISTRY_TAG_MODEL_DIR = "model_dir"  # tasks.registry.TAG_MODEL_DIR: where a registered version's folder is
PASSED_HEADERS = ("content-type", "retry-after", FINISH_HEADER, SERVER_TIMING_HEADER)


class DeploymentSpec(RequestBody):
    model_path: str = Field(..., min_length=1)
    model_version: str | None = None
    memory_limit_mb: int | None = Field(None, gt=0)  # None: endpoint.memory_limit_mb
    instance_count: int | None = Field(None, ge=1, le=50)  # None: endpoint.instance_count (Azure: 50 at most)
    # None: the endpoint's defaults (EndpointConfig.device, .dtype, .engine)
    device: str | None = Field(None, pattern=DEVICE_PATTERN)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    engine: Literal["builtin", "transformers-serve", "vllm"] | None = None


class TrafficSpec(RequestBody):
    traffic: dict[str, int]


class RescueSpec(RequestBody):
    candidate: str
    champion: str
    ttl_s: float = Field(..., gt=0, le=86_400)


# ---------------------------------------------------------------------------------------------------------- metrics
class Histogram:
    """Counts per bucket, handed out cumulative (Prometheus' ``le``): an observation is one bisection on the scoring
    path, however many bounds (the per-token histogram has 55)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds, self.per_bucket, self.sum, self.count = bounds, [0] * (len(bounds) + 1), 0.0, 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        self.per_bucket[bucket_of(value, self.bounds)] += 1

    def cumulative(self) -> list[int]:
        """Observations at or under each bound."""
        return list(itertools.accumulate(self.per_bucket[:-1]))

    def to_dict(self) -> dict[str, Any]:
        return {"le": list(self.bounds), "counts": self.cumulative(), "sum": round(self.sum, 6), "count": self.count}


class Metrics:
    """Counters and histograms per deployment: Prometheus text for ``/metrics``, JSON for ``/admin/metrics``."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self.latency: dict[tuple[str, str], Histogram] = defaultdict(lambda: Histogram(LATENCY_BUCKETS))
        self.per_token: dict[str, Histogram] = defaultdict(lambda: Histogram(SECONDS_PER_TOKEN_BOUNDS))
        self.tokens: dict[str, int] = defaultdict(int)
        self.finish: dict[str, Counter[str]] = defaultdict(Counter)
        self.rescued: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()

    def observe(self, deployment: str, route: str, code: int, seconds: float) -> None:
        with self.lock:
            self.requests[(deployment, route, str(code))] += 1
            self.latency[(deployment, route)].observe(seconds)

    def generated(self, deployment: str, tokens: int, seconds: float, finish_reasons: list[str]) -> None:
        with self.lock:
            self.tokens[deployment] += tokens
            if tokens > 0:
                self.per_token[deployment].observe(seconds / tokens)
            self.finish[deployment].update(r for r in finish_reasons if r)

    def rescue(self, deployment: str) -> None:
        """A request ``deployment`` failed and the champion answered instead (:mod:`deployments.rescue`)."""
        with self.lock:
            self.rescued[deployment] += 1

    def snapshot(self, restarts: dict[str, int]) -> dict[str, Any]:
        with self.lock:
            names = {d for d, _, _ in self.requests} | set(restarts) | set(self.tokens)
            result: dict[str, Any] = {}
            for name in sorted(names):
                by_code: Counter[str] = Counter()
                for (dep, _, code), n in self.requests.items():
                    if dep == name:
                        by_code[code] += n
                result[name] = {
                    "requests_by_status": dict(sorted(by_code.items())),
                    "latency_seconds": {
                        route: h.to_dict() for (dep, route), h in sorted(self.latency.items()) if dep == name
                    },
                    "latency_per_token_seconds": self.per_token[name].to_dict() if name in self.per_token else None,
                    "generated_tokens": self.tokens.get(name, 0),
                    "finish_reasons": dict(self.finish.get(name, {})),
                    "restarts": restarts.get(name, 0),
                    "rescued": self.rescued.get(name, 0),
                }
            return result

    def render(self, in_flight: dict[str, int], restarts: dict[str, int], ready: dict[str, int]) -> str:
        def labels(**pairs: str) -> str:
            return "{" + ",".join(f'{k}="{v}"' for k, v in pairs.items()) + "}"

        def histogram(name: str, series: list[tuple[dict[str, str], Histogram]]) -> list[str]:
            lines = []
            for pairs, h in series:
                for bound, n in zip(h.bounds, h.cumulative(), strict=True):
                    lines.append(f"{name}_bucket{labels(**pairs, le=str(bound))} {n}")
                lines.append(f"{name}_bucket{labels(**pairs, le='+Inf')} {h.count}")
                lines.append(f"{name}_sum{labels(**pairs)} {h.sum:.6f}")
                lines.append(f"{name}_count{labels(**pairs)} {h.count}")
            return lines

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
            lines += histogram(
                "finetune_phi_request_latency_seconds",
                [({"deployment": d, "route": r}, h) for (d, r), h in sorted(self.latency.items())],
            )
            lines += [
                "# HELP finetune_phi_latency_per_token_seconds A reply's whole time divided by its generated tokens.",
                "# TYPE finetune_phi_latency_per_token_seconds histogram",
            ]
            lines += histogram(
                "finetune_phi_latency_per_token_seconds",
                [({"deployment": d}, h) for d, h in sorted(self.per_token.items())],
            )
            lines += [
                "# HELP finetune_phi_rescued_requests_total Requests a deployment failed that the champion answered.",
                "# TYPE finetune_phi_rescued_requests_total counter",
            ]
            for dep, n in sorted(self.rescued.items()):
                lines.append(f"finetune_phi_rescued_requests_total{labels(deployment=dep)} {n}")
            lines += [
                "# HELP finetune_phi_generated_tokens_total Tokens generated (end tokens not counted).",
                "# TYPE finetune_phi_generated_tokens_total counter",
            ]
            for dep, n in sorted(self.tokens.items()):
                lines.append(f"finetune_phi_generated_tokens_total{labels(deployment=dep)} {n}")
            lines += [
                "# HELP finetune_phi_finish_reasons_total Replies by finish reason (stop, length...).",
                "# TYPE finetune_phi_finish_reasons_total counter",
            ]
            for dep, reasons in sorted(self.finish.items()):
                for reason, n in sorted(reasons.items()):
                    lines.append(f"finetune_phi_finish_reasons_total{labels(deployment=dep, reason=reason)} {n}")
        gauges = (
            ("finetune_phi_in_flight_requests", "gauge", "Scoring requests admitted or waiting, per deployment.",
             in_flight),
            ("finetune_phi_deployment_restarts_total", "counter",
             "Deployment processes restarted after a crash or a failed liveness probe.", restarts),
            ("finetune_phi_ready_instances", "gauge", "Instances of a deployment ready to take requests.", ready),
        )  # fmt: skip
        for name, kind, text, values in gauges:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            lines += [f"{name}{labels(deployment=dep)} {n}" for dep, n in sorted(values.items())]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------- state
@dataclass
class Deployment:
    name: str
    model_path: str
    model_version: str | None
    memory_limit_mb: int | None
    instance_count: int
    device: str = "auto"
    dtype: str = "auto"
    engine: str = "builtin"
    error: str | None = None  # refused before any process started (path, memory, device, engine)
    instances: list[procs.Instance] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)

    @property
    def state(self) -> str:
        """creating (no instance ready yet), ready (one at least), restarting (all down after a crash) or failed."""
        if self.error is not None or (self.instances and all(i.state == "failed" for i in self.instances)):
            return "failed"
        if any(i.state == "ready" for i in self.instances):
            return "ready"
        if any(i.state == "restarting" for i in self.instances):
            return "restarting"
        return "creating"

    @property
    def in_flight(self) -> int:
        return sum(i.in_flight for i in self.instances)

    @property
    def restarts(self) -> int:
        return sum(i.restarts for i in self.instances)

    def failure(self) -> str | None:
        return self.error or next((i.error for i in self.instances if i.state == "failed" and i.error), None)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model_path": self.model_path,
            "model_version": self.model_version,
            "state": self.state,
            "error": self.failure() if self.state == "failed" else None,
            "in_flight": self.in_flight,
            "memory_limit_mb": self.memory_limit_mb,
            "instance_count": self.instance_count,
            "device": self.device,
            "dtype": self.dtype,
            "engine": self.engine,
            "restarts": self.restarts,
            "instances": [i.describe() for i in self.instances],
        }


def registered_model_dirs(state_dir: Path) -> list[Path]:
    """Folders of the model versions registered in the state folder's MLflow store (read with sqlite3: the router
    does not import MLflow)."""
    store = state_dir / "mlflow" / "mlflow.db"
    if not store.is_file():
        return []
    try:
        with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=2)) as db:
            rows = db.execute("SELECT value FROM model_version_tags WHERE key = ?", (REGISTRY_TAG_MODEL_DIR,))
            return [Path(value).resolve() for (value,) in rows.fetchall() if value]
    except sqlite3.Error as exc:
        log.warning("could not read the registry at %s: %s", store, exc)
        return []


def model_path_problem(model_path: str, state_dir: Path, roots: list[Path]) -> str | None:
    """Why ``model_path`` may not be deployed, or None. Allowed: under the state folder or one of ``roots``, or a
    registered model's folder (the folder itself, its parent job folder, or inside it)."""
    path = Path(model_path).expanduser().resolve()
    allowed = [state_dir.resolve(), *(Path(r).expanduser().resolve() for r in roots)]
    if any(path.is_relative_to(root) for root in allowed):
        return None
    for registered in registered_model_dirs(state_dir):
        if path == registered or path == registered.parent or path.is_relative_to(registered):
            return None
    return (
        f"model path {model_path} is neither a registered model's folder nor under the state folder {state_dir}; "
        "register the model (the flow does) or add its folder to endpoint.model_roots"
    )


class Endpoint:
    """Deployments, their instances, traffic and their persistence. Mutated only on the event loop."""

    def __init__(self, config: EndpointConfig, endpoint_dir: Path, state_dir: Path) -> None:
        self.config = config
        self.dir = endpoint_dir
        self.state_dir = state_dir
        self.deployments: dict[str, Deployment] = {}
        self.traffic: dict[str, int] = {}
        self.stopping = False
        self.active = 0  # HTTP requests being answered, probes aside: a stop waits for these
        self.random = random.Random()
        self.max_pending = config.max_pending_requests or 2 * config.max_concurrent_requests
        self.instance_config = endpoint_dir / INSTANCE_CONFIG_FILE
        # To the builtin deployment processes, on every scoring request: aiohttp's client with its C parser costs
        # a fifth to a fifteenth of httpx's CPU per forwarded request (bench/router_client.py), CPU that on a small
        # machine comes out of the model's. External engines (whose OpenAI helpers take an httpx client) and the
        # probes keep httpx.
        self.session: aiohttp.ClientSession | None = None
        self.client: httpx.AsyncClient | None = None  # to external engines' OpenAI APIs
        self.probe_client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=60)
        self.client = httpx.AsyncClient(limits=limits, timeout=None, trust_env=False)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
            auto_decompress=False,  # the router passes the deployment's bytes through as they are
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        )
        self.probe_client = httpx.AsyncClient(trust_env=False)
        atomic_write_json(self.instance_config, self.config.model_dump(mode="json"))
        self.restore()

    # persistence
    def save(self) -> None:
        payload = {
            "name": self.config.name,
            "deployments": {
                n: {
                    "model_path": d.model_path,
                    "model_version": d.model_version,
                    "memory_limit_mb": d.memory_limit_mb,
                    "instance_count": d.instance_count,
                    "device": d.device,
                    "dtype": d.dtype,
                    "engine": d.engine,
                }
                for n, d in self.deployments.items()
            },
            "traffic": self.traffic,
        }
        atomic_write_json(self.dir / STATE_FILE, payload)

    def save_records(self) -> None:
        """PIDs, ports and tokens of the running instances (0600: the tokens let a process be called)."""
        records = {n: [i.record() for i in d.instances if i.pid is not None] for n, d in self.deployments.items()}
        atomic_write_json(self.dir / procs.INSTANCES_FILE, records, permissions=0o600)

    def restore(self) -> None:
        saved = read_json(self.dir / STATE_FILE, default={}) or {}
        records = procs.read_records(self.dir)
        specs = saved.get("deployments") or {}
        self.traffic = {k: int(v) for k, v in (saved.get("traffic") or {}).items() if k in specs}
        for name, spec in specs.items():
            try:
                self.create(
                    name,
                    spec["model_path"],
                    spec.get("model_version"),
                    spec.get("memory_limit_mb"),
                    spec.get("instance_count"),
                    persist=False,
                    records=records.pop(name, []),
                    device=spec.get("device"),
                    dtype=spec.get("dtype"),
                    engine=spec.get("engine"),
                )
            except ApiError as exc:  # saved by an older version under a name Azure refuses: keep it out
                log.warning("deployment %s in %s not restored: %s", name, STATE_FILE, exc.message)
                self.traffic.pop(name, None)
        for leftovers in records.values():  # processes of a deployment deleted while no router watched them
            for record in leftovers:
                pid = record.get("pid")
                if isinstance(pid, int) and procs.is_model_server(pid, record.get("create_time")):
                    procs.stop_group(pid, grace_s=2.0)
        self.save_records()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.config.name,
            "stopping": self.stopping,
            "deployments": {n: d.describe() for n, d in self.deployments.items()},
            "traffic": dict(self.traffic),
            # the router's own footprint: it loads no model, and torch never enters this process
            "router": {
                "pid": os.getpid(),
                "rss_mb": round(tree_rss(os.getpid()) / 1024 / 1024, 1),
                "own_rss_mb": round(_own_rss() / 1024 / 1024, 1),
                "torch_imported": "torch" in sys.modules,
            },
        }

    # admin
    def oom_adj_for(self, name: str) -> int:
        """Live deployments 0; the others IDLE_OOM_SCORE_ADJ above the highest live one. Lowering a score needs
        CAP_SYS_RESOURCE: where that is refused (a live one kept a newcomer's score), the idle ones go higher
        instead, which anyone may do, so the newcomer is still the kernel's first choice."""
        if self.traffic.get(name, 0) > 0:
            return LIVE_OOM_SCORE_ADJ
        live = [
            oom_score_adj(i.pid) or 0
            for n, d in self.deployments.items()
            if self.traffic.get(n, 0) > 0
            for i in d.instances
            if i.pid is not None
        ]
        return min(MAX_OOM_SCORE_ADJ, max(live, default=LIVE_OOM_SCORE_ADJ) + IDLE_OOM_SCORE_ADJ)

    def update_oom_scores(self) -> None:
        """Under memory pressure the kernel's OOM killer picks a deployment without traffic before a live one."""
        ordered = sorted(self.deployments.items(), key=lambda item: self.traffic.get(item[0], 0) == 0)
        for name, deployment in ordered:  # live ones first: the idle scores are set above theirs
            for instance in deployment.instances:
                if instance.pid is not None:
                    set_oom_score_adj(instance.pid, self.oom_adj_for(name))

    def create(
        self,
        name: str,
        model_path: str,
        model_version: str | None,
        memory_limit_mb: int | None = None,
        instance_count: int | None = None,
        *,
        persist: bool = True,
        records: list[dict[str, Any]] | None = None,
        device: str | None = None,
        dtype: str | None = None,
        engine: str | None = None,
    ) -> Deployment:
        problem = name_problem(name, "deployment")
        if problem is not None:
            raise ApiError(422, "InvalidField", f"field 'name': {problem}", param="name")
        old = self.deployments.get(name)
        deployment = Deployment(
            name,
            model_path,
            model_version,
            memory_limit_mb or self.config.memory_limit_mb,
            instance_count or self.config.instance_count,
            device=device or self.config.device,
            dtype=dtype or self.config.dtype,
            engine=engine or self.config.engine,
        )
        self.deployments[name] = deployment
        if old is not None:
            self._stop_later(old)
        if persist:
            self.save()
        deployment.error = self._refusal(deployment)
        if deployment.error is not None:
            log.warning("deployment %s refused: %s", name, deployment.error)
            return deployment
        spec = procs.InstanceSpec(
            name,
            model_path,
            deployment.memory_limit_mb,
            self.instance_config,
            self.dir / "deployments",
            self.config.liveness_probe,
            self.config.readiness_probe,
            device=deployment.device,
            dtype=deployment.dtype,
            engine=deployment.engine,
            max_batch_size=self.config.max_batch_size,
            torch_threads=self.config.torch_threads,
        )
        for index in range(deployment.instance_count):
            instance = procs.Instance(spec, index, self.config.max_concurrent_requests)
            if records and index < len(records):
                instance.adopt(records[index])
            deployment.instances.append(instance)
            instance.task = asyncio.get_running_loop().create_task(
                procs.supervise(instance, self.probe_client, lambda n=name: self.oom_adj_for(n), self.save_records)
            )
        for record in (records or [])[deployment.instance_count :]:  # instance_count went down meanwhile
            if isinstance(record.get("pid"), int) and procs.is_model_server(record["pid"], record.get("create_time")):
                procs.stop_group(record["pid"], grace_s=2.0)
        return deployment

    def _refusal(self, deployment: Deployment) -> str | None:
        """Why the deployment cannot start (path or memory), before any process is started for it."""
        problem = model_path_problem(deployment.model_path, self.state_dir, self.config.model_roots)
        if problem is not None:
            return problem
        folder = Path(deployment.model_path)
        if not folder.is_dir():
            return f"model folder {deployment.model_path} does not exist; register the model again or fix the path"
        try:
            # torch-free: the router holds no model (the deployment process resolves the placement for real)
            placement = check_engine(
                deployment.engine, deployment.device, deployment.dtype, cuda_facts=cuda_facts_without_torch()
            )
        except (PlacementError, EngineUnavailableError) as exc:
            return str(exc)
        try:
            check_fits(
                folder,
                placement.dtype,
                deployment.memory_limit_mb,
                deployment.instance_count,
                deployment.name,
                engine_process=deployment.engine == "builtin" and self.config.engine_process,
            )
        except (MemoryCheckError, OSError, ValueError) as exc:
            return str(exc)
        return None

    def _stop_later(self, deployment: Deployment) -> None:
        for instance in deployment.instances:
            instance.stopping = True
        asyncio.get_running_loop().create_task(self._stop_instances(deployment.instances, grace_s=procs.STOP_GRACE_S))

    async def _stop_instances(self, instances: list[procs.Instance], grace_s: float) -> None:
        for instance in instances:
            instance.stopping = True
        await asyncio.gather(*(i.kill(grace_s) for i in instances))
        for instance in instances:
            if instance.task is not None:
                instance.task.cancel()
            instance.state = "stopped"
        self.save_records()

    async def delete(self, name: str) -> None:
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
        self.save()
        # answered once its processes are gone, so that their memory is back when the caller sees the answer
        await self._stop_instances(deployment.instances, grace_s=procs.STOP_GRACE_S)

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
        self.update_oom_scores()

    async def shutdown(self) -> None:
        """Stop every instance (the drain already waited for the requests in flight) and close the clients."""
        everything = [i for d in self.deployments.values() for i in d.instances]
        await self._stop_instances(everything, grace_s=5.0)
        (self.dir / procs.INSTANCES_FILE).unlink(missing_ok=True)
        for client in (self.client, self.probe_client):
            if client is not None:
                await client.aclose()
        if self.session is not None:
            await self.session.close()

    # routing
    def route(self, pinned: str | None) -> tuple[Deployment, procs.Instance]:
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
        ready = [i for i in deployment.instances if i.state == "ready"]
        if not ready:
            failure = deployment.failure() if deployment.state == "failed" else None
            detail = f" ({failure})" if failure else ""
            raise ApiError(
                503,
                "DeploymentNotReady",
                f"deployment {deployment.name!r} is {deployment.state}{detail}; retry once it is ready",
                headers={"Retry-After": "5"},
            )
        if sum(i.in_flight for i in ready) >= self.max_pending * len(ready):
            raise ApiError(
                429,
                "TooManyPendingRequests",
                f"too many pending requests for deployment {deployment.name!r} "
                f"(more than {self.max_pending * len(ready)} in flight); retry later",
                headers={"Retry-After": "1"},
            )
        least = min(i.in_flight for i in ready)
        return deployment, self.random.choice([i for i in ready if i.in_flight == least])


def _own_rss() -> int:
    return int(psutil.Process().memory_info().rss)


class Slot:
    """An instance's admission for one request: counted while it waits and while it runs; released once."""

    def __init__(self, deployment: Deployment, instance: procs.Instance) -> None:
        self.deployment, self.instance = deployment, instance
        self.acquired = False
        self.released = False
        instance.in_flight += 1

    async def acquire(self, wait_s: float) -> None:
        try:
            await asyncio.wait_for(self.instance.semaphore.acquire(), timeout=max(wait_s, 0.0))
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
        self.instance.in_flight -= 1
        if self.acquired:
            self.instance.semaphore.release()


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

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

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
                status = state.get("stream_status", status)  # an error event after the 200 (set by the relay)
                self.metrics.observe(state.get("deployment", "none"), route, status, time.perf_counter() - started)


@dataclass(frozen=True)
class ScoringRoute:
    """A scoring POST route: the pydantic model of its body and the handler its FastAPI route calls too."""

    body: type[RequestBody]
    handler: Callable[[Request, Any], Awaitable[Response]]


class _ScoringDispatch:
    """Pure ASGI middleware, innermost: answers the scoring POST routes itself, with the handlers their declared
    FastAPI routes call, skipping FastAPI's per-request routing, dependency solving and body parsing (a fifth of
    the router's CPU per ``/score`` request: 3.1 -> 2.5 ms on a 2-vCPU VM, bench/serve_throughput.py, one client).
    The same key check first, then the same validation (the route's model, from the bytes), the same error
    bodies. The declared routes stay for the OpenAPI schema (clients and the fuzz test read it)."""

    def __init__(
        self, app: Any, routes: dict[str, ScoringRoute], check_key: Callable[[Request], Awaitable[None]]
    ) -> None:
        self.app, self.routes, self.check_key = app, routes, check_key

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            await self.check_key(request)
            try:
                body = route.body.model_validate_json(await request.body())
            except ValidationError as exc:
                raise invalid_body(exc.errors(include_url=False)) from None
            response = await route.handler(request, body)
        except ApiError as exc:
            response = error_response(exc)
        except Exception as exc:  # as FastAPI's handler of last resort below: one JSON 500, the trace in the log
            response = unexpected_error(request, exc)
        await response(scope, receive, send)


def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s", request.url.path, exc_info=exc)
    return error_response(ApiError(500, "InternalError", f"internal error ({type(exc).__name__}); see the log"))


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("api-key") or None


async def _crashed(deployment: Deployment, instance: procs.Instance) -> ApiError:
    """The answer for requests whose instance dropped the connection. When its process is gone (the kernel closes
    the sockets just before the process is reaped: wait a moment), it takes no more requests from now on, before
    its supervisor's next look."""
    deadline = time.monotonic() + 0.5
    while not instance.exited() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    if instance.exited() and instance.state == "ready":
        instance.state = "restarting"
    return ApiError(
        502,
        "ModelContainerCrashed",
        f"deployment {deployment.name!r} (instance {instance.index}) crashed or dropped the connection while "
        "answering; the endpoint restarts its process: retry shortly",
    )


def _timed_out(config: EndpointConfig) -> ApiError:
    return ApiError(
        408,
        "RequestTimeout",
        f"the request took longer than request_timeout_ms ({config.request_timeout_ms} ms); "
        "ask for fewer max_new_tokens or raise the timeout",
    )


def _sse_error(error: ApiError) -> bytes:
    return f"data: {json.dumps(error_body(error.status, error.code, error.message))}\n\n".encode()


async def _relay_until(
    source: AsyncIterator[bytes],
    deadline: float,
    config: EndpointConfig,
    failed: Callable[[Exception], Awaitable[ApiError]],
    mark: Callable[[int], None],
) -> AsyncIterator[bytes]:
    """``source``'s chunks until it ends; past ``deadline`` a timeout event, on a broken connection (or an engine's
    error) the event of ``await failed(exc)``, each followed by ``[DONE]``. ``mark(status)`` records the error's
    status, since the 200 has already gone out (the metrics count the stream as that error)."""
    while True:
        try:
            piece = await asyncio.wait_for(anext(source), timeout=max(deadline - time.monotonic(), 0.001))
        except StopAsyncIteration:
            return
        except TimeoutError:
            mark(408)
            yield _sse_error(_timed_out(config)) + b"data: [DONE]\n\n"
            return
        except (httpx.TransportError, aiohttp.ClientError, external.ExternalEngineError) as exc:
            error = await failed(exc)
            mark(error.status)
            yield _sse_error(error) + b"data: [DONE]\n\n"
            return
        yield piece


@dataclass(frozen=True)
class _Stream:
    """What differs between the two streams the router relays (a builtin deployment process's events, an external
    engine's OpenAI stream): where the events come from and how they are read, counted and timed."""

    source: AsyncIterator[bytes]
    close: Callable[[], Awaitable[None]]  # closes the upstream response, however the relay ends
    deadline: float  # time.monotonic() past which the client gets the timeout event
    since: float  # time.monotonic() the metrics' latency counts from
    failed: Callable[[Exception], Awaitable[ApiError]]  # the error event for a broken connection (or engine error)
    count: Callable[[bytes], int]  # the content chunks in a piece: the tokens, give or take
    mark: Callable[[int], None] = lambda status: None  # records the error status sent after the 200


def _builtin_chunks(piece: bytes) -> int:
    # one content chunk per decoding step that added text: the tokens, give or take a held-back byte
    return piece.count(b'"delta": {"content": ')


def _engine_chunks(event: bytes) -> int:
    # an engine's role and final chunks carry an empty content: they are no tokens
    return event.count(b'"content": "') - event.count(b'"content": ""')


def _stream_finish(chunk: bytes) -> str | None:
    marker = b'"finish_reason": "'
    at = chunk.rfind(marker)
    if at < 0:
        return None
    end = chunk.find(b'"', at + len(marker))
    return chunk[at + len(marker) : end].decode(errors="replace") if end > 0 else None


def create_app(config: EndpointConfig, state_dir: str | Path) -> FastAPI:
    """The router's ASGI app. Deployments saved in ``<state_dir>/endpoint/state.json`` start (or are found still
    running) at start-up. More routes: ``app.include_router(...)`` on the returned app."""
    endpoint_dir = Path(state_dir) / "endpoint"
    endpoint_dir.mkdir(parents=True, exist_ok=True)
    keys = KeyStore(endpoint_dir)
    endpoint = Endpoint(config, endpoint_dir, Path(state_dir))
    metrics = Metrics()
    rescue = Rescue()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await endpoint.start()
        yield
        endpoint.stopping = True
        await endpoint.shutdown()

    app = FastAPI(
        title=f"finetune-phi endpoint {config.name}",
        version="1",
        description=(__doc__ or "").split("\n\n")[0],
        lifespan=lifespan,
    )
    app.state.endpoint = endpoint
    app.include_router(chat_page.router)  # GET /chat: the static chat page (no key to load it)
    app.state.metrics = metrics
    install_error_handlers(app)

    bearer = HTTPBearer(auto_error=False, description="The endpoint's primary or secondary key (or the admin key)")

    # async: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hand-off on every request; the
    # key check is an in-memory compare after one stat() of the keys file, fine on the event loop.
    async def check_scoring_key(request: Request) -> None:
        if not keys.is_scoring_key(_bearer(request)):
            raise ApiError(
                401,
                "Unauthorized",
                "missing or wrong key: send 'Authorization: Bearer <endpoint key>' "
                "(`finetune-phi endpoint keys` shows the keys)",
            )

    async def require_key(request: Request, _: Any = Security(bearer)) -> None:
        await check_scoring_key(request)

    async def require_admin(request: Request, _: Any = Security(bearer)) -> None:
        if not keys.is_admin_key(_bearer(request)):
            raise ApiError(401, "Unauthorized", "missing or wrong admin key: send 'Authorization: Bearer <admin key>'")

    scoring_auth = Depends(require_key)
    admin_auth = Depends(require_admin)

    # ----------------------------------------------------------------------------------------------- forwarding
    def pinned_from(request: Request, model: str | None = None) -> str | None:
        header = request.headers.get(PIN_HEADER)
        if header:
            return header
        if model and model in endpoint.deployments:
            return model
        return None

    async def admitted(
        request: Request, model: str | None, started: float, to: str | None = None
    ) -> tuple[Deployment, Slot]:
        deployment, instance = endpoint.route(to or pinned_from(request, model))
        request.state.deployment = deployment.name
        slot = Slot(deployment, instance)
        timeout_left = config.request_timeout_ms / 1000.0 - (time.monotonic() - started)
        await slot.acquire(min(config.max_queue_wait_ms / 1000.0, max(timeout_left, 0.0)))
        request.state.admitted_at = time.monotonic()  # per-token latency from here: queueing is load, not the model
        return deployment, slot

    def instance_headers(instance: procs.Instance, started: float) -> dict[str, str]:
        left_ms = max(config.request_timeout_ms - (time.monotonic() - started) * 1000.0, 1.0)
        return {
            INSTANCE_TOKEN_HEADER: instance.token,
            TIME_LEFT_HEADER: f"{left_ms:.0f}",
            "content-type": "application/json",
        }

    def answer(deployment: Deployment, upstream: aiohttp.ClientResponse, content: bytes) -> Response:
        headers = {
            k: v for k, v in upstream.headers.items() if k.lower() in PASSED_HEADERS and k.lower() != "content-type"
        }
        headers[PIN_HEADER] = deployment.name
        return Response(
            content, status_code=upstream.status, headers=headers, media_type=upstream.headers.get("content-type")
        )

    def engine_model(deployment: Deployment) -> str | None:
        """The model name an external engine serves: vllm the deployment's; transformers serve its one folder."""
        return deployment.name if deployment.engine == "vllm" else None

    async def forward_external(deployment: Deployment, slot: Slot, path: str, body: bytes, started: float) -> Response:
        """``/score`` and chat completions answered by an external engine in the endpoint's own shapes."""
        instance = slot.instance
        url = f"{instance.url}/v1/chat/completions"
        data = json.loads(body)
        left = config.request_timeout_ms / 1000.0 - (time.monotonic() - started)
        budget = {
            "default_max_new_tokens": config.default_max_new_tokens,
            "max_new_tokens_cap": config.max_new_tokens_cap,
        }
        assert endpoint.client is not None
        try:
            async with asyncio.timeout(max(left, 0.001)):
                if path == "/score":
                    answers, replies = await external.score_response(
                        endpoint.client, url, engine_model(deployment), data, **budget
                    )
                    finishes = [r.finish_reason for r in replies]
                    tokens = sum(r.completion_tokens or 0 for r in replies)
                    headers = {PIN_HEADER: deployment.name, FINISH_HEADER: ",".join(finishes)}
                    content: Any = answers
                else:
                    chat = external.engine_chat_body(data, model=engine_model(deployment), **budget)
                    content = await external.chat_completion(
                        endpoint.client, url, chat, data.get("model") or deployment.name
                    )
                    finishes = [c.get("finish_reason") or "stop" for c in content.get("choices") or []]
                    tokens = int((content.get("usage") or {}).get("completion_tokens") or 0)
                    headers = {PIN_HEADER: deployment.name}
        except TimeoutError:
            raise _timed_out(config) from None
        except httpx.TransportError:
            raise await _crashed(deployment, instance) from None
        except external.ExternalEngineError as exc:
            status = 400 if exc.status in (400, 422) else 500
            raise ApiError(status, "GenerationFailed" if status == 500 else "InvalidInput", str(exc)) from None
        finally:
            slot.release()
        metrics.generated(deployment.name, tokens, time.monotonic() - started, finishes)
        return JSONResponse(content, headers=headers)

    def relayed(deployment: Deployment, slot: Slot, stream: _Stream) -> StreamingResponse:
        """``stream``'s events relayed as they come, within its deadline; the slot is freed and the tokens and
        finish reason counted when it ends, however (the client gone included)."""

        async def relay() -> AsyncIterator[bytes]:
            chunks, finish = 0, None
            try:
                async for piece in _relay_until(stream.source, stream.deadline, config, stream.failed, stream.mark):
                    chunks += stream.count(piece)
                    finish = _stream_finish(piece) or finish
                    yield piece
            finally:
                await stream.close()
                slot.release()
                finishes = [finish] if finish else []
                metrics.generated(deployment.name, chunks, time.monotonic() - stream.since, finishes)

        headers = {PIN_HEADER: deployment.name, "cache-control": "no-cache", "x-accel-buffering": "no"}
        return StreamingResponse(relay(), media_type="text/event-stream", headers=headers)

    async def stream_external(deployment: Deployment, slot: Slot, body: bytes, started: float) -> Response:
        data = json.loads(body)
        chat = external.engine_chat_body(
            data,
            model=engine_model(deployment),
            default_max_new_tokens=config.default_max_new_tokens,
            max_new_tokens_cap=config.max_new_tokens_cap,
        )
        assert endpoint.client is not None
        url = f"{slot.instance.url}/v1/chat/completions"
        events = external.stream_chat(endpoint.client, url, chat, data.get("model") or deployment.name)

        async def engine_failed(exc: Exception) -> ApiError:
            return ApiError(500, "GenerationFailed", f"generation failed: {exc}")

        stream = _Stream(
            source=events,
            close=events.aclose,
            deadline=started + config.request_timeout_ms / 1000.0,
            since=started,
            failed=engine_failed,
            count=_engine_chunks,
        )
        return relayed(deployment, slot, stream)

    async def forward(
        request: Request, path: str, model: str | None, started: float, to: str | None = None
    ) -> Response:
        """Admit, send the request's own bytes to the least loaded ready instance, and pass its answer back."""
        body = await request.body()
        deployment, slot = await admitted(request, model, started, to)
        if deployment.engine != "builtin":
            return await forward_external(deployment, slot, path, body, started)
        instance = slot.instance
        assert endpoint.session is not None
        left = config.request_timeout_ms / 1000.0 - (time.monotonic() - started)
        try:
            async with endpoint.session.post(
                f"{instance.url}{path}",
                data=body,
                headers=instance_headers(instance, started),
                timeout=aiohttp.ClientTimeout(total=max(left, 0.001) + BACKSTOP_S, connect=2.0),
            ) as upstream:
                content = await upstream.read()
        except TimeoutError:  # aiohttp's own timeouts are TimeoutErrors too
            raise _timed_out(config) from None
        except aiohttp.ClientError:
            raise await _crashed(deployment, instance) from None
        finally:
            slot.release()
        tokens = upstream.headers.get(TOKENS_HEADER, "")
        if upstream.status == 200 and tokens.isdigit():
            finishes = upstream.headers.get(FINISH_HEADER, "").split(",")
            metrics.generated(deployment.name, int(tokens), time.monotonic() - request.state.admitted_at, finishes)
        return answer(deployment, upstream, content)

    async def forward_stream(request: Request, model: str | None, started: float, to: str | None = None) -> Response:
        """The same for ``stream: true``: the instance's events are relayed as they come, never buffered whole."""
        body = await request.body()
        deployment, slot = await admitted(request, model, started, to)
        if deployment.engine != "builtin":
            return await stream_external(deployment, slot, body, started)
        instance = slot.instance
        assert endpoint.session is not None
        deadline = started + config.request_timeout_ms / 1000.0 + BACKSTOP_S
        try:
            upstream = await asyncio.wait_for(
                endpoint.session.post(
                    f"{instance.url}/v1/chat/completions",
                    data=body,
                    headers=instance_headers(instance, started),
                    timeout=aiohttp.ClientTimeout(total=None, connect=2.0),  # the relay below keeps the deadline
                ),
                timeout=max(deadline - time.monotonic(), 0.001),
            )
        except TimeoutError:
            slot.release()
            raise _timed_out(config) from None
        except aiohttp.ClientError:
            slot.release()
            raise await _crashed(deployment, instance) from None
        if upstream.status != 200:
            try:
                content = await upstream.read()
            finally:
                upstream.release()
                slot.release()
            return answer(deployment, upstream, content)

        async def close() -> None:
            # A relay that ended early (timeout, client gone) must not hand a half-read connection back to the pool.
            if upstream.content.at_eof():
                upstream.release()
            else:
                upstream.close()

        stream = _Stream(
            source=upstream.content.iter_any(),
            close=close,
            deadline=deadline,
            since=request.state.admitted_at,
            failed=lambda exc: _crashed(deployment, instance),
            count=_builtin_chunks,
            mark=lambda status: setattr(request.state, "stream_status", status),
        )
        return relayed(deployment, slot, stream)

    async def with_rescue(request: Request, model: str | None, attempt: Any) -> Response:
        """``attempt(None)`` as routed; during a rollout, once more on the champion (``attempt(champion)``) when the
        new deployment failed server-side or could not admit the request, before any byte went to the client
        (:mod:`deployments.rescue`). The failure still counts as the new deployment's, and as rescued."""
        failure: ApiError | None = None
        try:
            response = await attempt(None)
            status = response.status_code
        except ApiError as exc:
            failure, status = exc, exc.status
        name = getattr(request.state, "deployment", None)
        champion = rescue.target(name, pinned_from(request, model) is not None, status) if name else None
        if champion is None or champion not in endpoint.deployments:
            if failure is not None:
                raise failure
            return response
        metrics.observe(name, request.url.path, status, 0.0)
        metrics.rescue(name)
        log.warning("rescued: deployment %s answered %d; the request goes to %s", name, status, champion)
        return await attempt(champion)

    async def scored(request: Request, body: ScoreRequest) -> Response:
        started = time.monotonic()
        return await with_rescue(request, None, lambda to: forward(request, "/score", None, started, to))

    async def chatted(request: Request, body: ChatCompletionRequest) -> Response:
        started = time.monotonic()
        if body.stream:
            return await with_rescue(request, body.model, lambda to: forward_stream(request, body.model, started, to))
        path = "/v1/chat/completions"
        return await with_rescue(request, body.model, lambda to: forward(request, path, body.model, started, to))

    # ----------------------------------------------------------------------------------------------- routes
    @app.get("/health", tags=["probes"])
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "stopping" if endpoint.stopping else "alive"}

    @app.get("/ready", tags=["probes"])
    async def ready() -> JSONResponse:
        """Readiness: 200 once a deployment has a ready instance (and the server is not stopping), else 503."""
        ready_names = [n for n, d in endpoint.deployments.items() if d.state == "ready"]
        ok = bool(ready_names) and not endpoint.stopping
        return JSONResponse({"ready": ok, "deployments": ready_names}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["probes"], response_class=PlainTextResponse)
    async def metrics_text() -> PlainTextResponse:
        """Prometheus text: requests, errors, latency, tokens, finish reasons, in flight, restarts; per deployment."""
        deployments = endpoint.deployments.values()
        text = metrics.render(
            {d.name: d.in_flight for d in deployments},
            {d.name: d.restarts for d in deployments},
            {d.name: sum(i.state == "ready" for i in d.instances) for d in deployments},
        )
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post(
        "/score",
        tags=["scoring"],
        responses={200: {"description": "One reply per input"}},
        dependencies=[scoring_auth],
    )
    async def score(request: Request, body: ScoreRequest) -> Response:
        """The sample's scoring route: one generated text per item of ``input_data``."""
        return await scored(request, body)

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
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        """OpenAI-compatible chat completions; ``stream: true`` answers server-sent events."""
        return await chatted(request, body)

    # ----------------------------------------------------------------------------------------------- admin
    @app.get("/admin/state", tags=["admin"], dependencies=[admin_auth])
    async def admin_state(request: Request) -> dict[str, Any]:
        """Deployments (creating, ready, restarting or failed, with the error) and their instances, traffic, the
        router's own footprint, and whether the server stops."""
        return endpoint.describe()

    @app.get("/admin/metrics", tags=["admin"], dependencies=[admin_auth])
    async def admin_metrics(request: Request) -> dict[str, Any]:
        """Per deployment: requests by status, latency and latency-per-token histograms, finish reasons, generated
        tokens, restarts."""
        return {"deployments": metrics.snapshot({n: d.restarts for n, d in endpoint.deployments.items()})}

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
        """Create or replace a deployment; its processes start in the background (poll ``GET /admin/state``)."""
        created = endpoint.create(
            name,
            body.model_path,
            body.model_version,
            body.memory_limit_mb,
            body.instance_count,
            device=body.device,
            dtype=body.dtype,
            engine=body.engine,
        )
        return created.describe()

    @app.delete("/admin/deployments/{name}", tags=["admin"], dependencies=[admin_auth])
    async def admin_delete(request: Request, name: str) -> dict[str, Any]:
        """Delete a deployment that receives no traffic; answered once its processes have stopped."""
        await endpoint.delete(name)
        return endpoint.describe()

    @app.put("/admin/traffic", tags=["admin"], dependencies=[admin_auth])
    async def admin_traffic(request: Request, body: TrafficSpec) -> dict[str, Any]:
        """Set the traffic split: percentages per deployment summing to 100 (or 0: route nothing)."""
        endpoint.set_traffic(body.traffic)
        return endpoint.describe()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return unexpected_error(request, exc)

    scoring_routes = {
        "/score": ScoringRoute(ScoreRequest, scored),
        "/v1/chat/completions": ScoringRoute(ChatCompletionRequest, chatted),
    }
    app.add_middleware(_ScoringDispatch, routes=scoring_routes, check_key=check_scoring_key)  # behind the limit
    app.add_middleware(_BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(_Drain, endpoint=endpoint)  # outside the body limit: a stopping server reads no body
    app.add_middleware(_Observe, metrics=metrics)  # outermost: counts the 503s of a stop and the 413s too
    return app


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
        proxy_headers=False,  # nothing proxies to the router: a loopback client's X-Forwarded-For is no address
        timeout_graceful_shutdown=SHUTDOWN_TAIL_S,  # the drain above already waited for the requests in flight
        timeout_keep_alive=5,
    )
    _DrainingServer(uv_config, app.state.endpoint, config.stop_grace_s).run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the endpoint router in the foreground (service.py runs this).")
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--endpoint-config", required=True, type=Path, help="JSON of tasks.config.EndpointConfig")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per forwarded request otherwise
    config = EndpointConfig.model_validate(json.loads(args.endpoint_config.read_text(encoding="utf-8")))
    run(config, args.state_dir)


if __name__ == "__main__":
    main()
