"""Smoke test of a live endpoint: configured prompts, HTTP 200, non-empty replies that end, a latency budget.

Used by the rollout (pinned to the new deployment with the ``azureml-model-deployment`` header, before any
traffic moves, and at every traffic step), and by the scheduled ``smoke-test`` flow (unpinned: what users get).
It talks to the OpenAI-compatible ``/v1/chat/completions`` because ``finish_reason`` says whether the reply ended
("stop") or was cut at ``max_tokens`` ("length"): the never-stopping model of weak point 3 fails here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.config import Settings, SmokeConfig

PIN_HEADER = "azureml-model-deployment"


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


@dataclass(frozen=True)
class SmokeReport:
    target: str  # "deployment model-v3" or "endpoint"
    cases: list[SmokeCase] = field(default_factory=list)

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
        text = f"smoke test of {self.target}: {good}/{len(self.cases)} passed"
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
                "result": "ok" if c.ok else c.problem,
            }
            for c in self.cases
        ]

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "passed": self.passed, "cases": [asdict(c) for c in self.cases]}


def _judge(status: int, body: Any, latency: float, budget_s: float) -> tuple[str, str | None, str | None]:
    """Reply text, finish reason and the problem (None when fine) of one chat-completion answer."""
    if status != 200:
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
        return "", None, f"HTTP {status}" + (f" ({message})" if message else "")
    try:
        choice = body["choices"][0]
        reply = choice["message"]["content"] or ""
        finish = choice.get("finish_reason")
    except (KeyError, IndexError, TypeError):
        return "", None, "the answer is not an OpenAI chat completion"
    if not reply.strip():
        return reply, finish, "empty reply"
    if finish != "stop":
        return reply, finish, f"reply did not end (finish_reason {finish!r}): the model does not stop generating"
    if latency > budget_s:
        return reply, finish, f"took {latency:.2f} s, over the latency budget of {budget_s:.2f} s"
    return reply, finish, None


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
    headers = {"Authorization": f"Bearer {key}"}
    if deployment:
        headers[PIN_HEADER] = deployment
    body = {
        "model": deployment or "default",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_new_tokens,
        "temperature": 0.0,
    }
    started = time.perf_counter()
    try:
        response = client.post(f"{openai_base_url.rstrip('/')}/chat/completions", json=body, headers=headers)
    except httpx.HTTPError as exc:
        elapsed = time.perf_counter() - started
        return SmokeCase(prompt, None, "", None, elapsed, None, f"no answer ({type(exc).__name__}: {exc})")
    latency = time.perf_counter() - started
    try:
        payload = response.json()
    except ValueError:
        payload = None
    reply, finish, problem = _judge(response.status_code, payload, latency, latency_budget_s)
    served_by = response.headers.get(PIN_HEADER)
    return SmokeCase(prompt, response.status_code, reply, finish, latency, served_by, problem)


def smoke_test(
    openai_base_url: str,
    key: str,
    config: SmokeConfig,
    *,
    deployment: str | None = None,
    prompts: Sequence[str] | None = None,
    repeat: int = 1,
) -> SmokeReport:
    """Send each configured prompt (``repeat`` times) and judge every answer."""
    target = f"deployment {deployment}" if deployment else "endpoint"
    cases = []
    with httpx.Client(timeout=config.timeout_s) as client:
        for _ in range(repeat):
            for prompt in prompts or config.prompts:
                cases.append(
                    ask(
                        client,
                        openai_base_url,
                        key,
                        prompt,
                        max_new_tokens=config.max_new_tokens,
                        latency_budget_s=config.latency_budget_s,
                        deployment=deployment,
                    )
                )
    return SmokeReport(target, cases)


def publish_smoke_table(report: SmokeReport, key: str = "smoke-test") -> None:
    """The prompts and answers as a table artifact (a ``key`` keeps a history in the Prefect UI)."""
    create_table_artifact(report.table(), key=key, description=report.summary())


@task(name="smoke-test", cache_policy=NO_CACHE, persist_result=False)
def smoke_test_task(
    settings: Settings, deployment: str | None = None, artifact_key: str | None = "smoke-test"
) -> dict[str, Any]:
    """Run the smoke test against the configured endpoint, publish its table, fail the task run on any failure."""
    from tasks.backends import get_backend

    backend = get_backend(settings)
    endpoint = backend.get_endpoint()
    if endpoint is None:
        raise SmokeTestFailed(
            f"endpoint {settings.endpoint.name!r} is not up; start it (`finetune-phi endpoint start`) "
            "or create it with `finetune-phi run`"
        )
    report = smoke_test(endpoint.openai_base_url, backend.scoring_key(), settings.smoke, deployment=deployment)
    if artifact_key:
        publish_smoke_table(report, artifact_key)
    get_run_logger().info(report.summary())
    if not report.passed:
        raise SmokeTestFailed(report.summary())
    return report.to_dict()


class SmokeTestFailed(RuntimeError):
    """The endpoint answered wrongly (not a transient fault: never retried)."""


__all__ = ["PIN_HEADER", "SmokeCase", "SmokeReport", "SmokeTestFailed", "ask", "smoke_test", "smoke_test_task"]
