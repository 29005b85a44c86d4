"""Smoke test of a live endpoint: configured prompts, HTTP 200, non-empty replies that end, a latency budget.

Used by the rollout (pinned to the new deployment with the ``azureml-model-deployment`` header, before any
traffic moves, and at every traffic step), and by the scheduled ``smoke-test`` flow (unpinned: what users get).

Two routes (``smoke.route``; ``auto`` picks by backend):

- ``chat``, the local endpoint's default: the OpenAI-compatible ``/v1/chat/completions``, whose ``finish_reason``
  says whether the reply ended ("stop") or was cut at ``max_tokens`` ("length"): the never-stopping model of weak
  point 3 fails here.
- ``score``, the azureml default: the sample's ``/score`` (``{"input_data": [prompt], "params": {...}}``, a JSON
  list back), the only route an Azure ML no-code MLflow deployment serves. Whether a reply ended is known only when
  the server says so in the ``x-finish-reason`` header (our local server does) or in the reply item; Azure's MLflow
  server does not, so there a case passes on HTTP 200, a non-empty reply and the latency budget, and the report
  says the end was not checked. (On azureml the end token is still checked before the rollout: the evaluation step
  generates with the registered model's own tokenizer on the downloaded weights.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import httpx
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.backends.base import Backend, EndpointInfo
from tasks.config import Settings, SmokeConfig

PIN_HEADER = "azureml-model-deployment"
FINISH_HEADER = "x-finish-reason"  # the local server's /score: stop or length, comma-separated in input order
Route = Literal["chat", "score"]


@dataclass(frozen=True)
class SmokeCase:
    prompt: str
    status: int | None  # None: no HTTP answer at all
    reply: str
    finish_reason: str | None
    latency_s: float
    served_by: str | None  # the deployment that answered, when the server says
    problem: str | None  # None when the case passed

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def end_checked(self) -> bool:
        """False for a /score answer that did not say why it ended (Azure ML's MLflow server never does)."""
        return self.finish_reason is not None


@dataclass(frozen=True)
class SmokeReport:
    target: str  # "deployment model-v3" or "endpoint"
    cases: list[SmokeCase] = field(default_factory=list)
    route: Route = "chat"

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(c.ok for c in self.cases)

    @property
    def error_rate(self) -> float:
        return sum(not c.ok for c in self.cases) / len(self.cases) if self.cases else 1.0

    def failures(self) -> list[str]:
        return [f"{c.prompt!r}: {c.problem}" for c in self.cases if not c.ok]

    def summary(self) -> str:
        good = sum(c.ok for c in self.cases)
        text = f"smoke test of {self.target} via {ROUTE_PATHS[self.route]}: {good}/{len(self.cases)} passed"
        unchecked = sum(c.ok and not c.end_checked for c in self.cases)
        if unchecked:
            text += f" ({unchecked} without an end check: the endpoint does not report why a reply ended)"
        return text if self.passed else f"{text}; " + "; ".join(self.failures()[:3])

    def table(self) -> list[dict[str, Any]]:
        return [
            {
                "prompt": c.prompt,
                "reply": c.reply[:200],
                "status": c.status,
                "finish_reason": c.finish_reason,
                "latency_s": round(c.latency_s, 3),
                "served_by": c.served_by,
                "result": ("ok" if c.end_checked else "ok (end not reported)") if c.ok else c.problem,
            }
            for c in self.cases
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "route": self.route,
            "passed": self.passed,
            "cases": [asdict(c) for c in self.cases],
        }


ROUTE_PATHS: dict[str, str] = {"chat": "/v1/chat/completions", "score": "/score"}


def resolve_route(config: SmokeConfig, backend_name: str) -> Route:
    """``smoke.route``, with ``auto`` decided by backend: an azureml deployment is a no-code MLflow one (/score
    only); the local server serves both, and the chat route is the one that reports whether replies ended."""
    if config.route != "auto":
        return config.route
    return "score" if backend_name == "azureml" else "chat"


def _http_problem(status: int, body: Any, gateway: bool = False) -> str:
    """``HTTP 503 (message)`` with the OpenAI-style ``error.message``; ``gateway``: else Azure's own gateway errors'
    ``{"message": "..."}``."""
    message = body.get("error", {}).get("message") if isinstance(body, dict) else None
    if message is None and gateway and isinstance(body, dict):
        message = body.get("message")
    return f"HTTP {status}" + (f" ({message})" if message else "")


def _verdict(
    reply: str, finish: str | None, latency: float, budget_s: float, *, finish_name: str, finish_required: bool
) -> tuple[str, str | None, str | None]:
    """The problem with a reply (None when fine): empty, not ended with ``stop``, or over the latency budget.
    ``finish_required`` False lets a route that does not report the finish reason pass on the rest."""
    if not reply.strip():
        return reply, finish, "empty reply"
    if (finish is not None or finish_required) and finish != "stop":
        return reply, finish, f"reply did not end ({finish_name} {finish!r}): the model does not stop generating"
    if latency > budget_s:
        return reply, finish, f"took {latency:.2f} s, over the latency budget of {budget_s:.2f} s"
    return reply, finish, None


def _judge(status: int, body: Any, latency: float, budget_s: float) -> tuple[str, str | None, str | None]:
    """Reply text, finish reason and the problem (None when fine) of one chat-completion answer."""
    if status != 200:
        return "", None, _http_problem(status, body)
    try:
        choice = body["choices"][0]
        reply = choice["message"]["content"] or ""
        finish = choice.get("finish_reason")
    except (KeyError, IndexError, TypeError):
        return "", None, "the answer is not an OpenAI chat completion"
    return _verdict(reply, finish, latency, budget_s, finish_name="finish_reason", finish_required=True)


def ask(
    client: httpx.Client,
    openai_base_url: str,
    key: str,
    prompt: str,
    *,
    max_new_tokens: int,
    latency_budget_s: float,
    deployment: str | None = None,
) -> SmokeCase:
    """One chat completion, judged. Transport errors are a failed case, not an exception: they are the finding."""
    headers = _pinned_headers(key, deployment)
    body = {
        "model": deployment or "default",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_new_tokens,
        "temperature": 0.0,
    }
    url = f"{openai_base_url.rstrip('/')}/chat/completions"
    return _post_and_judge(
        client,
        url,
        body,
        headers,
        prompt,
        lambda response, payload, latency: _judge(response.status_code, payload, latency, latency_budget_s),
    )


# (response, parsed JSON body or None, latency in s) -> (reply, finish reason or None, problem or None)
Judge = Callable[[httpx.Response, Any, float], tuple[str, str | None, str | None]]


def _pinned_headers(key: str, deployment: str | None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {key}"}
    if deployment:
        headers[PIN_HEADER] = deployment
    return headers


def _post_and_judge(
    client: httpx.Client, url: str, body: dict[str, Any], headers: dict[str, str], prompt: str, judge: Judge
) -> SmokeCase:
    """POST, time it and judge the answer. Transport errors are a failed case, not an exception: they are the
    finding."""
    started = time.perf_counter()
    try:
        response = client.post(url, json=body, headers=headers)
    except httpx.HTTPError as exc:
        elapsed = time.perf_counter() - started
        return SmokeCase(prompt, None, "", None, elapsed, None, f"no answer ({type(exc).__name__}: {exc})")
    latency = time.perf_counter() - started
    try:
        payload = response.json()
    except ValueError:
        payload = None
    reply, finish, problem = judge(response, payload, latency)
    served_by = response.headers.get(PIN_HEADER)
    return SmokeCase(prompt, response.status_code, reply, finish, latency, served_by, problem)


def _score_reply(body: Any) -> tuple[str, str | None] | None:
    """The reply and its finish reason (when given) from a /score answer; None when it is not a list of replies.

    Accepted shapes: ``["text"]`` (the sample's and Azure's), ``[{"generated_text": ...}]`` (a raw pipeline),
    ``[{"text", "finish_reason"}]`` (ours with ``return_finish_reason``), ``{"predictions": [...]}`` (MLflow)."""
    if isinstance(body, dict) and "predictions" in body:
        body = body["predictions"]
    if not isinstance(body, list) or not body:
        return None
    first = body[0]
    if isinstance(first, list) and first:  # a pipeline's list of candidates per input
        first = first[0]
    if isinstance(first, str):
        return first, None
    if isinstance(first, dict):
        text = first.get("generated_text", first.get("text"))
        if isinstance(text, str):
            return text, first.get("finish_reason")
    return None


def _judge_score(
    status: int, body: Any, finish_header: str | None, latency: float, budget_s: float
) -> tuple[str, str | None, str | None]:
    """Reply text, finish reason (None: not reported) and the problem (None when fine) of one /score answer."""
    if status != 200:
        return "", None, _http_problem(status, body, gateway=True)
    parsed = _score_reply(body)
    if parsed is None:
        return "", None, "the answer is not a JSON list of replies (the /score contract)"
    reply, finish = parsed
    if finish is None and finish_header:
        finish = finish_header.split(",")[0].strip() or None
    return _verdict(reply, finish, latency, budget_s, finish_name="finish reason", finish_required=False)


def ask_score(
    client: httpx.Client,
    scoring_uri: str,
    key: str,
    prompt: str,
    *,
    max_new_tokens: int,
    latency_budget_s: float,
    deployment: str | None = None,
) -> SmokeCase:
    """One /score request with the sample's body (greedy, reply only), judged like :func:`ask`."""
    headers = _pinned_headers(key, deployment)
    # No temperature: with do_sample false it is unused, and some pipelines refuse 0.
    body = {
        "input_data": [prompt],
        "params": {"max_new_tokens": max_new_tokens, "do_sample": False, "return_full_text": False},
    }
    return _post_and_judge(
        client,
        scoring_uri,
        body,
        headers,
        prompt,
        lambda response, payload, latency: _judge_score(
            response.status_code, payload, response.headers.get(FINISH_HEADER), latency, latency_budget_s
        ),
    )


def scoring_uri_of(openai_base_url: str) -> str:
    """``https://host/v1`` -> ``https://host/score`` (the two routes sit side by side on both backends)."""
    base = openai_base_url.rstrip("/")
    return (base[: -len("/v1")] if base.endswith("/v1") else base) + "/score"


def smoke_test(
    openai_base_url: str,
    key: str,
    config: SmokeConfig,
    *,
    deployment: str | None = None,
    prompts: Sequence[str] | None = None,
    repeat: int = 1,
    route: Route = "chat",
    scoring_uri: str | None = None,
) -> SmokeReport:
    """Send each configured prompt (``repeat`` times) over ``route`` and judge every answer.

    ``scoring_uri`` is the /score address (default: beside ``openai_base_url``); only the score route uses it."""
    target = f"deployment {deployment}" if deployment else "endpoint"
    cases = []
    with httpx.Client(timeout=config.timeout_s) as client:
        for _ in range(repeat):
            for prompt in prompts or config.prompts:
                options = {
                    "max_new_tokens": config.max_new_tokens,
                    "latency_budget_s": config.latency_budget_s,
                    "deployment": deployment,
                }
                if route == "score":
                    uri = scoring_uri or scoring_uri_of(openai_base_url)
                    cases.append(ask_score(client, uri, key, prompt, **options))
                else:
                    cases.append(ask(client, openai_base_url, key, prompt, **options))
    return SmokeReport(target, cases, route)


def smoke_endpoint(
    endpoint: EndpointInfo,
    key: str,
    config: SmokeConfig,
    backend_name: str,
    *,
    deployment: str | None = None,
    prompts: Sequence[str] | None = None,
) -> SmokeReport:
    """:func:`smoke_test` of a backend's endpoint on the route ``smoke.route`` resolves to for that backend."""
    return smoke_test(
        endpoint.openai_base_url,
        key,
        config,
        deployment=deployment,
        prompts=prompts,
        route=resolve_route(config, backend_name),
        scoring_uri=endpoint.scoring_uri or None,
    )


def publish_smoke_table(report: SmokeReport, key: str = "smoke-test") -> None:
    """The prompts and answers as a table artifact (a ``key`` keeps a history in the Prefect UI)."""
    create_table_artifact(report.table(), key=key, description=report.summary())


def smoke_deployment(
    backend: Backend,
    config: SmokeConfig,
    missing: Exception,
    *,
    deployment: str | None = None,
    prompts: Sequence[str] | None = None,
) -> SmokeReport:
    """Smoke-test what ``backend``'s endpoint serves: ``deployment`` pinned, or the live traffic split when None.
    Reads the endpoint and its key first; raises ``missing`` (the caller's sentence) when there is no endpoint."""
    endpoint = backend.get_endpoint()
    if endpoint is None:
        raise missing
    return smoke_endpoint(
        endpoint, backend.scoring_key(), config, backend.name, deployment=deployment, prompts=prompts
    )


@task(name="smoke-test", cache_policy=NO_CACHE, persist_result=False)
def smoke_test_task(
    settings: Settings, deployment: str | None = None, artifact_key: str | None = "smoke-test"
) -> dict[str, Any]:
    """Run the smoke test against the configured endpoint, publish its table, fail the task run on any failure."""
    from tasks.backends import get_backend

    missing = SmokeTestFailed(
        f"endpoint {settings.endpoint.name!r} is not up; start it (`finetune-phi endpoint start`) "
        "or create it with `finetune-phi run`"
    )
    report = smoke_deployment(get_backend(settings), settings.smoke, missing, deployment=deployment)
    if artifact_key:
        publish_smoke_table(report, artifact_key)
    get_run_logger().info(report.summary())
    if not report.passed:
        raise SmokeTestFailed(report.summary())
    return report.to_dict()


class SmokeTestFailed(RuntimeError):
    """The endpoint answered wrongly (not a transient fault: never retried)."""


__all__ = [
    "FINISH_HEADER",
    "PIN_HEADER",
    "ROUTE_PATHS",
    "SmokeCase",
    "SmokeReport",
    "SmokeTestFailed",
    "ask",
    "ask_score",
    "resolve_route",
    "smoke_deployment",
    "smoke_endpoint",
    "smoke_test",
    "smoke_test_task",
]
