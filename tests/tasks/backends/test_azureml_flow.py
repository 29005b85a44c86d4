"""The flow's own code (tasks/rollout/, tasks/train.py) driving the azureml backend over the fake client.

A real Prefect (test harness) runs the rollout's tasks and transaction hooks; the endpoint's routes that the smoke test
calls are a real HTTP server on loopback standing in for the managed endpoint's host: ``/score`` as a no-code MLflow
deployment answers it (a JSON list, nothing about why a reply ended), and ``/v1/chat/completions`` for a deployment
that serves it.
"""

from __future__ import annotations

import dataclasses
import json
import random
import signal
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from azure.core.exceptions import HttpResponseError
from prefect import flow
from prefect._internal.concurrency.cancellation import CancelledError
from prefect.exceptions import TerminationSignal

from tasks.backends.base import BackendError, JobFailedError, JobStatus, ModelVersion
from tasks.config import ConfigError, Settings, load_config
from tasks.jobs import PollTiming, wait_for_job
from tasks.retry import POLL_BACKOFF_CAP, jitter_bounds, poll_policy
from tasks.rollout import CHAMPION, RolloutFailed, live_traffic, reconcile, run_rollout
from tasks.train import train
from tests.tasks.backends.fake_azure import http_error

pytestmark = pytest.mark.usefixtures("prefect_harness")


class _Endpoint(BaseHTTPRequestHandler):
    """The managed endpoint's routes. ``broken`` deployments never stop generating on the chat route and fail with
    HTTP 424 (Azure's answer when the scoring container errors) on ``/score``."""

    key: ClassVar[str] = ""
    broken: ClassVar[set[str]] = set()
    served: ClassVar[list[tuple[str, str]]] = []  # (path, deployment)
    bodies: ClassVar[list[dict[str, Any]]] = []
    probe: ClassVar[Callable[[], None] | None] = None  # called on each request (to see the endpoint's state then)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        if self.probe is not None:
            type(self).probe()
        if self.headers.get("Authorization") != f"Bearer {self.key}":
            return self._send(401, {"message": "Invalid key"}, None)
        deployment = self.headers.get("azureml-model-deployment") or "live"
        type(self).served.append((self.path, deployment))
        type(self).bodies.append(body)
        if self.path == "/score":
            if deployment in self.broken:
                return self._send(424, {"message": "An unexpected error occurred in scoring script."}, deployment)
            return self._send(200, ["Hello."] * len(body["input_data"]), deployment)
        if self.path != "/v1/chat/completions":
            return self._send(404, {"message": "no such route"}, None)
        finish = "length" if deployment in self.broken else "stop"
        self._send(200, {"choices": [{"message": {"content": "Hello."}, "finish_reason": finish}]}, deployment)

    def _send(self, status: int, body: Any, deployment: str | None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if deployment:
            self.send_header("azureml-model-deployment", deployment)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def scoring_host(fake):
    _Endpoint.key, _Endpoint.broken, _Endpoint.served, _Endpoint.bodies = fake.endpoint_key, set(), [], []
    _Endpoint.probe = None
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.scoring_host = f"http://127.0.0.1:{server.server_port}"
    try:
        yield _Endpoint
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _live_v1(backend, fake, settings) -> ModelVersion:
    """An endpoint serving model v1 (the champion) with all traffic, as after an earlier run."""
    v1 = backend.register_model("job-1", {"manifest_sha256": "ab"})
    backend.set_alias(CHAMPION, v1)
    backend.ensure_endpoint()
    backend.create_deployment("model-v1", v1)
    assert backend.wait_deployment_ready("model-v1", 60).state == "ready"
    backend.set_traffic({"model-v1": 100})
    fake.calls.clear()
    return v1


@flow
def _rollout(backend, version, settings):
    return run_rollout(backend, version, settings)


def _table(report: dict[str, Any]) -> list[dict[str, Any]]:
    from tasks.smoke import SmokeCase, SmokeReport

    return SmokeReport(report["target"], [SmokeCase(**c) for c in report["cases"]], report["route"]).table()


def test_rollout_shifts_traffic_in_steps_and_promotes(backend, fake, settings, scoring_host) -> None:
    _live_v1(backend, fake, settings)
    v2 = backend.register_model("job-2", {"manifest_sha256": "cd"})
    result = _rollout(backend, v2, settings)
    traffic_updates = [
        c for c in fake.called("online_endpoints.begin_create_or_update")
    ]  # each step is one endpoint update
    assert len(traffic_updates) == len(settings.rollout.traffic_steps)
    assert result.traffic_after == {"model-v2": 100}
    assert [step["percent"] for step in result.steps] == [10, 50, 100]
    assert backend.get_model_by_alias(CHAMPION).version == "2"
    # On azureml the smoke test goes to /score (auto route), with the sample's body, pinned to the new deployment.
    assert ("/score", "model-v2") in scoring_host.served
    assert {path for path, _ in scoring_host.served} == {"/score"}
    assert scoring_host.bodies[0]["input_data"] == [settings.smoke.prompts[0]]
    assert scoring_host.bodies[0]["params"]["return_full_text"] is False
    assert {case["result"] for case in _table(result.pinned_smoke)} == {"ok (end not reported)"}
    assert {d.name for d in backend.get_endpoint().deployments} == {"model-v1", "model-v2"}  # keep_previous: 1


def test_a_deployment_that_fails_leaves_traffic_unchanged_and_is_deleted(backend, fake, settings, scoring_host):
    _live_v1(backend, fake, settings)
    v2 = backend.register_model("job-2", {})
    fake.deployment_states["model-v2"] = ["Creating", "Failed"]
    with pytest.raises(RolloutFailed, match="rolled back") as caught:
        _rollout(backend, v2, settings)
    assert "model load: out of memory" in str(caught.value)  # the container log says why
    # The message says what the rollback left, as read back from the endpoint and the registry.
    assert "traffic now {'model-v1': 100}, deployment model-v2 deleted, champion v1" in str(caught.value)
    endpoint = backend.get_endpoint()
    assert endpoint.traffic == {"model-v1": 100}
    assert [d.name for d in endpoint.deployments] == ["model-v1"]
    assert backend.get_model_by_alias(CHAMPION).version == "1"
    assert fake.called("online_deployments.begin_delete") == [
        ("online_deployments.begin_delete", "model-v2", settings.endpoint.name)
    ]
    assert not fake.called("online_endpoints.begin_delete")  # the endpoint is never deleted


@pytest.mark.parametrize(("route", "finding"), [("auto", "HTTP 424"), ("chat", "did not end")])
def test_a_new_deployment_failing_its_smoke_test_moves_no_traffic(
    backend, fake, settings, scoring_host, route, finding
) -> None:
    """On /score (the azureml default) a failing scoring container is caught; a model that never stops is caught
    only where the endpoint reports why replies end (the chat route of a deployment that serves it)."""
    _live_v1(backend, fake, settings)
    settings.smoke.route = route
    v2 = backend.register_model("job-2", {})
    scoring_host.broken.add("model-v2")
    with pytest.raises(RolloutFailed, match=finding):
        _rollout(backend, v2, settings)
    assert backend.get_endpoint().traffic == {"model-v1": 100}
    assert [d.name for d in backend.get_endpoint().deployments] == ["model-v1"]
    assert {path for path, _ in scoring_host.served} == {"/score" if route == "auto" else "/v1/chat/completions"}


def _record_endpoint_updates(fake, monkeypatch) -> list[tuple[dict[str, int], dict[str, int]]]:
    """(traffic, mirror traffic) after each endpoint update the backend makes."""
    history: list[tuple[dict[str, int], dict[str, int]]] = []
    real = fake.online_endpoints.begin_create_or_update

    def recording(endpoint, **kwargs):
        poller = real(endpoint, **kwargs)
        stored = fake.online_endpoints.store[endpoint.name]
        history.append(({k: v for k, v in stored.traffic.items() if v}, dict(stored.mirror_traffic)))
        return poller

    monkeypatch.setattr(fake.online_endpoints, "begin_create_or_update", recording)
    return history


def test_mirror_traffic_during_the_pinned_smoke_test_then_dropped_before_live_traffic_moves(
    backend, fake, settings, scoring_host, monkeypatch
) -> None:
    _live_v1(backend, fake, settings)
    settings.rollout.mirror_percent, settings.rollout.mirror_duration_s = 10, 0.05
    history = _record_endpoint_updates(fake, monkeypatch)
    mirrors_seen: list[dict[str, int]] = []
    scoring_host.probe = lambda: mirrors_seen.append(
        dict(fake.online_endpoints.store[settings.endpoint.name].mirror_traffic)
    )
    v2 = backend.register_model("job-2", {})
    result = _rollout(backend, v2, settings)
    assert history == [
        ({"model-v1": 100}, {"model-v2": 10}),  # mirror on, no live traffic to the new deployment
        ({"model-v1": 100}, {}),  # mirror off before traffic moves
        ({"model-v1": 90, "model-v2": 10}, {}),
        ({"model-v1": 50, "model-v2": 50}, {}),
        ({"model-v2": 100}, {}),
    ]
    # The pinned smoke test ran while the mirror was on (its requests are the first ones the endpoint saw).
    pinned = len(settings.smoke.prompts)
    assert mirrors_seen[:pinned] == [{"model-v2": 10}] * pinned and mirrors_seen[pinned:] == [{}] * (
        len(mirrors_seen) - pinned
    )
    assert result.mirror == {"percent": 10, "duration_s": 0.05, "deployment": "model-v2"}
    assert result.traffic_after == {"model-v2": 100}


def test_a_mirrored_deployment_failing_its_smoke_test_is_rolled_back_with_its_mirror(
    backend, fake, settings, scoring_host, monkeypatch
) -> None:
    _live_v1(backend, fake, settings)
    settings.rollout.mirror_percent, settings.rollout.mirror_duration_s = 20, 0.0
    history = _record_endpoint_updates(fake, monkeypatch)
    scoring_host.broken.add("model-v2")
    with pytest.raises(RolloutFailed, match="HTTP 424"):
        _rollout(backend, backend.register_model("job-2", {}), settings)
    assert history[0] == ({"model-v1": 100}, {"model-v2": 20})
    stored = fake.online_endpoints.store[settings.endpoint.name]
    assert stored.traffic == {"model-v1": 100} and stored.mirror_traffic == {}
    assert [d.name for d in backend.get_endpoint().deployments] == ["model-v1"]
    assert backend.get_model_by_alias(CHAMPION).version == "1"


def test_mirroring_is_skipped_on_a_first_rollout_and_refused_where_it_cannot_happen(
    backend, fake, settings, scoring_host, repo_root
) -> None:
    settings.rollout.mirror_percent, settings.rollout.mirror_duration_s = 10, 0.0
    # No live traffic to copy: the first rollout goes straight to 100% without touching mirror traffic.
    v1 = backend.register_model("job-1", {})
    result = _rollout(backend, v1, settings)
    assert result.mirror is None and result.traffic_after == {"model-v1": 100}
    assert all(not e.mirror_traffic for e in fake.online_endpoints.store.values())

    # The local backend cannot mirror: the config is refused when it is loaded, before any work.
    with pytest.raises(ConfigError, match="cannot mirror traffic"):
        load_config(repo_root / "configs" / "local.yaml", {"rollout.mirror_percent": 10}, environ={})

    # A backend without set_mirror_traffic is refused before the rollout touches anything.
    class NoMirror:
        name = "other"

        def __init__(self, inner) -> None:
            self.inner = inner

        def __getattr__(self, attr: str) -> Any:
            if attr in ("set_mirror_traffic", "inner") or attr.startswith("__"):
                raise AttributeError(attr)
            return getattr(self.inner, attr)

    v2 = backend.register_model("job-2", {})
    fake.calls.clear()
    with pytest.raises(RolloutFailed, match="cannot mirror traffic"):
        _rollout(NoMirror(backend), v2, settings)
    assert fake.calls == []


def test_a_rerun_after_a_crash_converges(backend, fake, settings) -> None:
    """A crash mid-rollout left traffic split onto a half-created deployment nobody owns."""
    v1 = _live_v1(backend, fake, settings)
    fake.online_deployments.add(settings.endpoint.name, "model-v2", "azureml:finetune-phi:2", state="Failed")
    fake.online_endpoints.store[settings.endpoint.name].traffic = {"model-v1": 50, "model-v2": 50}
    report = reconcile(backend, backend.get_model_by_alias(CHAMPION), settings)
    assert report.changed
    endpoint = backend.get_endpoint()
    assert endpoint.traffic == {"model-v1": 100}
    assert [d.name for d in endpoint.deployments] == ["model-v1"]
    assert backend.get_model_by_alias(CHAMPION).version == v1.version == "1"
    # A second run finds nothing to repair.
    assert not reconcile(backend, backend.get_model_by_alias(CHAMPION), settings).changed


def test_scoring_key_is_kept_in_a_prefect_secret_block(settings, fake, training_dir) -> None:
    from prefect.blocks.system import Secret

    from tasks.backends.azureml import AzureMLBackend

    backend = AzureMLBackend(settings, ml_client=fake, sleep=lambda s: None, training_dir=training_dir)
    backend.ensure_endpoint()
    assert backend.scoring_key() == fake.endpoint_key
    assert Secret.load(backend.secret_block_name).get() == fake.endpoint_key


def _quick(settings: Settings, **training: Any) -> Settings:
    return settings.model_copy(update={"training": settings.training.model_copy(update=training)})


@pytest.mark.parametrize(
    ("interrupt", "raised"),
    [
        (KeyboardInterrupt(), KeyboardInterrupt),  # Ctrl-C on `finetune-phi run`
        (TerminationSignal(signal.SIGTERM), TerminationSignal),  # a Prefect cancel of the flow run
        (CancelledError(), CancelledError),  # a Prefect task timeout, as it arrives inside the task
        (TimeoutError("Scope timed out after 60 second(s)."), TimeoutError),  # ... and as it leaves the task
        (http_error(403, "AuthorizationFailed"), BackendError),  # the status cannot be read any more
        (None, JobFailedError),  # training.timeout_s passed
    ],
    ids=["ctrl-c", "prefect-cancel", "task-timeout-inside", "task-timeout", "status-refused", "deadline"],
)
def test_an_interrupted_wait_cancels_the_azure_job(backend, fake, settings, spec, clock, interrupt, raised) -> None:
    fake.job_statuses = ["Queued"] + ["Running"] * 1000
    job = backend.submit_training(spec).job_id

    def sleep(seconds: float) -> None:
        """The fake clock's sleep; the interruption lands in the third wait, where signals and timeouts land."""
        if len(clock.sleeps) == 2 and isinstance(interrupt, HttpResponseError):
            fake.fail("jobs.get", interrupt)  # the next status read is refused (HTTP 403: final, not retried)
        elif len(clock.sleeps) == 2 and interrupt is not None:
            raise interrupt
        clock.sleep(seconds)

    with pytest.raises(raised) as caught:
        wait_for_job(backend, job, _quick(settings, timeout_s=600.0, poll_interval_s=30.0), PollTiming(sleep, clock))
    if interrupt is None:
        assert "did not finish within training.timeout_s=600 s and was canceled" in str(caught.value)
        assert sum(clock.sleeps) == pytest.approx(600.0)  # the last wait is cut to the deadline
    else:  # it stopped where the interruption landed: in the third wait, or the poll right after it
        assert len(clock.sleeps) == (3 if isinstance(interrupt, HttpResponseError) else 2)
    assert fake.called("jobs.begin_cancel") == [("jobs.begin_cancel", job)]
    assert fake.jobs.store[job].status in ("CancelRequested", "Canceled")


def test_an_outage_longer_than_the_retries_is_a_missed_poll_not_a_canceled_job(
    backend, fake, settings, spec, clock
) -> None:
    """HTTP 503 on more status reads in a row than retry.attempts allows one call: the backend gives up on that read
    (RetriesExhaustedError), the wait counts a missed poll and goes on, and the paid job is never canceled."""
    fake.job_statuses = ["Running", "Completed"]
    job = backend.submit_training(spec).job_id
    fake.calls.clear()
    outage = settings.retry.attempts + 2  # one whole read's retries, and then some
    fake.fail("jobs.get", *[http_error(503, "Service unavailable") for _ in range(outage)])
    quick = _quick(settings, poll_interval_s=30.0, timeout_s=3600.0)
    done = wait_for_job(backend, job, quick, PollTiming(clock.sleep, clock, random.Random(5)))
    assert done.status == JobStatus.COMPLETED
    assert fake.called("jobs.begin_cancel") == []
    assert len(fake.called("jobs.get")) > outage  # every failed read, then reads that found the job running on


def test_polling_backs_off_with_jitter_through_every_status(backend, fake, settings, spec, clock) -> None:
    """Queued and Running each start at poll_interval_s and double to the cap, every wait jittered."""
    fake.job_statuses = ["Queued"] * 4 + ["Running"] * 5 + ["Completed"]
    job = backend.submit_training(spec).job_id
    fake.calls.clear()
    quick = _quick(settings, poll_interval_s=30.0, timeout_s=3600.0)
    done = wait_for_job(backend, job, quick, PollTiming(sleep=clock.sleep, clock=clock, rng=random.Random(7)))
    assert done.status == JobStatus.COMPLETED
    schedule = poll_policy(30.0, settings.retry)
    assert schedule.max_delay_s == 30.0 * POLL_BACKOFF_CAP
    attempts = [0, 1, 2, 3, 0, 1, 2, 3, 4]  # back to the bottom when Queued turns Running
    assert len(clock.sleeps) == len(attempts) and len(fake.called("jobs.get")) == len(attempts) + 1
    for attempt, delay in zip(attempts, clock.sleeps, strict=True):
        low, high = jitter_bounds(attempt, schedule)
        assert low <= delay <= high, (attempt, delay)
    assert len(set(clock.sleeps)) == len(clock.sleeps)  # jitter: no two waits alike


def test_the_flows_train_step_submits_and_waits_through_throttling(backend, fake, settings, spec, clock, monkeypatch):
    """The flow's own ``train`` (what ``train_task`` runs) against the fake workspace: Queued, Running, Completed,
    with HTTP 429 and 503 on the way retried after growing, jittered delays."""
    fake.job_statuses = ["Queued", "Queued", "Running", "Running", "Completed"]
    create = fake.jobs.create_or_update

    def create_then_throttle(job: Any, **kwargs: Any) -> Any:
        created = create(job, **kwargs)
        fake.fail("jobs.get", http_error(429, "Too many requests"), http_error(503, "Service unavailable"))
        return created

    monkeypatch.setattr(fake.jobs, "create_or_update", create_then_throttle)
    # The workspace's MLflow is not part of the fake; reading it has its own test (test_job_metrics_come_from...).
    monkeypatch.setattr(backend, "job_metrics", lambda job_id: {"eval_loss": 1.5})
    dataset = {"train_path": str(spec.train_file), "test_path": str(spec.eval_file), "sha256": spec.manifest_sha256}
    quick = _quick(settings, poll_interval_s=30.0)

    @flow
    def train_step() -> dict[str, Any]:
        return train(quick, dataset, backend=backend, timing=PollTiming(clock.sleep, clock, random.Random(3)))

    result = train_step()
    (submitted,) = fake.jobs.submitted
    assert result["job_id"] == submitted.name and result["metrics"] == {"eval_loss": 1.5}
    assert fake.jobs.store[submitted.name].status == "Completed"
    after_submit = fake.calls[fake.calls.index(("jobs.create_or_update", submitted.name)) + 1 :]
    polls = [c for c in after_submit if c == ("jobs.get", submitted.name)]
    assert len(polls) == 2 + 5  # two throttled reads, then Queued, Queued, Running, Running, Completed
    # The two retries first (the backend's backoff on settings.retry), then the poll schedule (reset on Running).
    retry_waits, poll_waits = clock.sleeps[:2], clock.sleeps[2:]
    for attempt, delay in enumerate(retry_waits):
        low, high = jitter_bounds(attempt, settings.retry)
        assert low <= delay <= high, (attempt, delay)
    assert retry_waits[1] > retry_waits[0]
    schedule = poll_policy(30.0, settings.retry)
    for attempt, delay in zip([0, 1, 0, 1], poll_waits, strict=True):
        low, high = jitter_bounds(attempt, schedule)
        assert low <= delay <= high, (attempt, delay)


def _consistent(backend) -> dict[str, int]:
    """As the local kill test means it: traffic sums to 100 over ready deployments and every deployment is ready."""
    endpoint = backend.get_endpoint()
    states = {d.name: d.state for d in endpoint.deployments}
    traffic = live_traffic(endpoint)
    assert sum(traffic.values()) == 100, traffic
    assert all(state == "ready" for state in states.values()), states
    assert set(traffic) <= set(states), (traffic, states)
    return traffic


@pytest.mark.parametrize("healthy", [True, False], ids=["completes", "rolls-back"])
def test_a_rerun_after_a_kill_at_10_percent_converges(backend, fake, settings, scoring_host, healthy) -> None:
    """The process was killed after the new deployment was ready and took 10%: the alias still says v1. The next
    run's rollout of the same candidate repairs the endpoint first, then completes (or rolls back) consistently."""
    _live_v1(backend, fake, settings)
    v2 = backend.register_model("job-2", {})
    fake.online_deployments.add(settings.endpoint.name, "model-v2", "azureml:finetune-phi:2", state="Succeeded")
    fake.online_endpoints.store[settings.endpoint.name].traffic = {"model-v1": 90, "model-v2": 10}
    if not healthy:
        scoring_host.broken.add("model-v2")

    if healthy:
        result = _rollout(backend, v2, settings)
        assert "deleted model-v2 (unfinished rollout)" in result.reconcile
        assert result.traffic_before == {"model-v1": 100}  # the rollout started from the repaired endpoint
        assert _consistent(backend) == {"model-v2": 100}
        assert backend.get_model_by_alias(CHAMPION).version == "2"
        assert {d.name for d in backend.get_endpoint().deployments} == {"model-v1", "model-v2"}
    else:
        with pytest.raises(RolloutFailed, match="rolled back"):
            _rollout(backend, v2, settings)
        assert _consistent(backend) == {"model-v1": 100}
        assert backend.get_model_by_alias(CHAMPION).version == "1"
        assert [d.name for d in backend.get_endpoint().deployments] == ["model-v1"]
    # Whichever way it ended, the next run finds nothing to repair.
    assert not reconcile(backend, backend.get_model_by_alias(CHAMPION), settings).changed


# ---------------------------------------------------------------------------------------------- through the real SDK
# The same scenarios with the real azure-ai-ml client against the REST fake on loopback HTTPS (tests/azure_fake):
# assertions on the requests it sent. The fake serves the endpoint's scoring routes at its scoring_uri.


def _rest_live_v1(rest_backend, azure) -> ModelVersion:
    v1 = rest_backend.register_model("job-1", {"manifest_sha256": "ab"})
    rest_backend.set_alias(CHAMPION, v1)
    rest_backend.ensure_endpoint()
    rest_backend.create_deployment("model-v1", v1)
    assert rest_backend.wait_deployment_ready("model-v1", 60).state == "ready"
    rest_backend.set_traffic({"model-v1": 100})
    azure.requests.clear()
    return v1


def _maps_sent(azure, name: str) -> list[tuple[dict[str, int], dict[str, int]]]:
    """(traffic, mirror traffic) of each endpoint PUT the SDK sent."""
    return [
        (r.body["properties"].get("traffic") or {}, r.body["properties"].get("mirrorTraffic") or {})
        for r in azure.sent("PUT", rf"/onlineEndpoints/{name}$")
    ]


def test_rest_rollout_shifts_traffic_in_steps_pinned_smoke_first(rest_backend, azure, settings, capfd) -> None:
    _rest_live_v1(rest_backend, azure)
    v2 = rest_backend.register_model("job-2", {"manifest_sha256": "cd"})
    result = _rollout(rest_backend, v2, settings)
    assert _maps_sent(azure, settings.endpoint.name) == [
        ({"model-v1": 90, "model-v2": 10}, {}),
        ({"model-v1": 50, "model-v2": 50}, {}),
        ({"model-v2": 100}, {}),
    ]
    assert result.traffic_after == {"model-v2": 100} and [s["percent"] for s in result.steps] == [10, 50, 100]
    assert rest_backend.get_model_by_alias(CHAMPION).version == "2"
    # The pinned smoke test reached the new deployment through the endpoint's scoring URI, before any traffic moved.
    first = azure.scored[0]
    assert first[:2] == ("score", "model-v2") and first[2]["input_data"] == [settings.smoke.prompts[0]]
    assert {d.name for d in rest_backend.get_endpoint().deployments} == {"model-v1", "model-v2"}
    assert "." not in capfd.readouterr().out  # the SDK's poll dots never reach stdout


def test_rest_a_failed_deployment_is_rolled_back(rest_backend, azure, settings) -> None:
    _rest_live_v1(rest_backend, azure)
    azure.deployment_states["model-v2"] = ["Creating", "Failed"]
    with pytest.raises(RolloutFailed, match="rolled back") as caught:
        _rollout(rest_backend, rest_backend.register_model("job-2", {}), settings)
    assert "model load: out of memory" in str(caught.value)
    assert "traffic now {'model-v1': 100}, deployment model-v2 deleted, champion v1" in str(caught.value)
    assert len(azure.sent("DELETE", r"/deployments/model-v2$")) == 1
    assert not azure.sent("DELETE", rf"/onlineEndpoints/{settings.endpoint.name}$")
    assert _maps_sent(azure, settings.endpoint.name) == []  # no traffic ever moved


def test_rest_a_failing_smoke_test_moves_no_traffic(rest_backend, azure, settings) -> None:
    _rest_live_v1(rest_backend, azure)
    azure.broken.add("model-v2")
    with pytest.raises(RolloutFailed, match="HTTP 424"):
        _rollout(rest_backend, rest_backend.register_model("job-2", {}), settings)
    assert rest_backend.get_endpoint().traffic == {"model-v1": 100}
    assert [d.name for d in rest_backend.get_endpoint().deployments] == ["model-v1"]


def test_rest_mirror_then_traffic_steps(rest_backend, azure, settings) -> None:
    _rest_live_v1(rest_backend, azure)
    settings.rollout.mirror_percent, settings.rollout.mirror_duration_s = 10, 0.0
    result = _rollout(rest_backend, rest_backend.register_model("job-2", {}), settings)
    assert _maps_sent(azure, settings.endpoint.name) == [
        ({"model-v1": 100}, {"model-v2": 10}),  # mirror on, no live traffic to the new deployment
        ({"model-v1": 100}, {}),  # mirror off before traffic moves
        ({"model-v1": 90, "model-v2": 10}, {}),
        ({"model-v1": 50, "model-v2": 50}, {}),
        ({"model-v2": 100}, {}),
    ]
    assert result.mirror["deployment"] == "model-v2"


@pytest.mark.parametrize("healthy", [True, False], ids=["completes", "rolls-back"])
def test_rest_a_rerun_after_a_kill_at_10_percent_converges(rest_backend, azure, settings, healthy) -> None:
    _rest_live_v1(rest_backend, azure)
    v2 = rest_backend.register_model("job-2", {})
    # What the killed run had done: v2 deployed and ready, 10% of the traffic on it, the alias still on v1.
    rest_backend.create_deployment("model-v2", v2)
    rest_backend.wait_deployment_ready("model-v2", 60)
    rest_backend.set_traffic({"model-v1": 90, "model-v2": 10})
    if not healthy:
        azure.broken.add("model-v2")
        with pytest.raises(RolloutFailed, match="rolled back"):
            _rollout(rest_backend, v2, settings)
        assert _consistent(rest_backend) == {"model-v1": 100}
        assert rest_backend.get_model_by_alias(CHAMPION).version == "1"
    else:
        result = _rollout(rest_backend, v2, settings)
        assert "deleted model-v2 (unfinished rollout)" in result.reconcile
        assert _consistent(rest_backend) == {"model-v2": 100}
        assert rest_backend.get_model_by_alias(CHAMPION).version == "2"
    assert not reconcile(rest_backend, rest_backend.get_model_by_alias(CHAMPION), settings).changed


METRICS_ROUTE = r"/providers/Microsoft\.Insights/metrics$"


def _endpoint_id(settings: Settings) -> str:
    cfg = settings.azureml
    return (
        f"/subscriptions/{cfg.subscription_id}/resourceGroups/{cfg.resource_group}/providers/"
        f"Microsoft.MachineLearningServices/workspaces/{cfg.workspace}/onlineEndpoints/{settings.endpoint.name}"
    )


def _assert_metrics_queries(azure, settings: Settings) -> int:
    """Every Azure Monitor query of the bakes asked for the endpoint's metrics, split by deployment (and status
    code for requests), one requests and one latency query per reading; returns the number of readings."""
    queries = azure.sent("GET", METRICS_ROUTE)
    assert queries and {q.path for q in queries} == {_endpoint_id(settings) + "/providers/Microsoft.Insights/metrics"}
    asked = [(q.query["metricnames"], q.query["aggregation"], q.query["$filter"]) for q in queries]
    reading = [
        ("RequestsPerMinute", "Total", "deployment eq '*' and statusCode eq '*'"),
        ("RequestLatency_P95", "Maximum", "deployment eq '*'"),
    ]
    assert asked == reading * (len(queries) // 2)
    return len(queries) // 2


@pytest.mark.parametrize(
    ("canary", "alarm", "reason"),
    [
        ({200: 40, 424: 10}, 300.0, "error_rate"),  # 10 of the canary's 50 requests failed
        ({200: 50}, 900.0, "latency"),  # its p95 is 3x the champion's
    ],
    ids=["error_rate", "latency"],
)
def test_rest_a_live_alarm_on_azure_monitor_numbers_rolls_the_canary_back_at_once(
    rest_backend, azure, settings, canary, alarm, reason
) -> None:
    """The backend's own MetricsQueryClient reads the endpoint's metrics from the REST fake: the first reading of
    the 10% bake fires, and traffic goes back to the champion before the bake is over."""
    _rest_live_v1(rest_backend, azure)
    settings.rollout.bake_s = 120
    metrics = azure.metrics_of(settings.endpoint.name)
    metrics.requests = {"model-v2": canary, "model-v1": {200: 450}}
    metrics.latency_p95_ms = {"model-v2": alarm, "model-v1": 300.0}
    with pytest.raises(RolloutFailed, match="alarm at 10%") as failed:
        _rollout(rest_backend, rest_backend.register_model("job-2", {}), settings)
    assert _maps_sent(azure, settings.endpoint.name) == [
        ({"model-v1": 90, "model-v2": 10}, {}),
        ({"model-v1": 100}, {}),
    ]
    assert len(azure.sent("DELETE", r"/deployments/model-v2$")) == 1
    assert set(azure.deployments[settings.endpoint.name]) == {"model-v1"}
    assert rest_backend.get_model_by_alias(CHAMPION).version == "1"
    (step,) = failed.value.rollout.steps
    # At the first reading (the rollout bakes on real time: a reading's round trip is all it waited).
    assert step["decided_by"] == "live" and step["verdict"]["alarm"] == reason and step["waited_s"] < 10
    assert (step["candidate"]["requests"], step["candidate"]["errors"]) == (50, canary.get(424, 0))
    assert step["candidate"]["request_p95_s"] == pytest.approx(alarm / 1000)
    assert (step["champion"]["requests"], step["champion"]["errors"]) == (450, 0)
    assert step["champion"]["request_p95_s"] == pytest.approx(0.3)
    # One reading closes the champion's full-load baseline before the first shift; the bake's first reading decided.
    assert _assert_metrics_queries(azure, settings) == 2


def test_rest_too_few_requests_in_azure_monitor_leave_the_step_to_the_synthetic_probes(
    rest_backend, azure, settings
) -> None:
    """5 requests a step (fewer than rollout.alarms.min_requests): each bake extends to its limit, then the probes
    (answered by the fake's scoring route) pass it, and the rollout completes. The rollout bakes on real time:
    short bakes."""
    _rest_live_v1(rest_backend, azure)
    settings.rollout.bake_s = 0.3
    alarms = settings.rollout.alarms
    alarms.max_extension_s, alarms.check_interval_s = 0.3, 0.1
    metrics = azure.metrics_of(settings.endpoint.name)
    metrics.requests = {"model-v2": {200: 5}, "model-v1": {200: 450}}
    metrics.latency_p95_ms = {"model-v2": 300.0, "model-v1": 300.0}
    result = _rollout(rest_backend, rest_backend.register_model("job-2", {}), settings)
    assert result.traffic_after == {"model-v2": 100} and rest_backend.get_model_by_alias(CHAMPION).version == "2"
    baked = [s for s in result.steps if s["bake_s"] > 0]
    assert [s["percent"] for s in baked] == [10, 50]  # final_bake_s is 0: the 100% step is the probes' alone
    for step in baked:
        assert step["decided_by"] == "probes" and step["passed"]
        assert step["waited_s"] >= 0.6  # the bake and its whole extension
        assert "only 5 live requests to model-v2" in step["note"]
        assert step["candidate"]["requests"] == 5 and step["champion"]["requests"] == 450
    assert _assert_metrics_queries(azure, settings) >= 2 * 3  # each bake read at least at 0, 0.3 and 0.6 s


def test_rest_scoring_key_is_kept_in_a_prefect_secret_block(settings, azure, training_dir) -> None:
    from prefect.blocks.system import Secret

    from tasks.backends.azureml import AzureMLBackend
    from tests.azure_fake.client import StaticToken, fake_cloud

    with fake_cloud(azure) as cloud:
        backend = AzureMLBackend(settings, credential=StaticToken(), cloud=cloud, training_dir=training_dir)
        backend.ensure_endpoint()
        assert backend.scoring_key() == azure.endpoint_key
        backend.close()
    assert Secret.load(backend.secret_block_name).get() == azure.endpoint_key


@pytest.mark.parametrize(
    "interrupt",
    [KeyboardInterrupt(), TerminationSignal(signal.SIGTERM), CancelledError(), "status-refused", None],
    ids=["ctrl-c", "prefect-cancel", "task-timeout", "status-refused", "deadline"],
)
def test_rest_an_interrupted_wait_cancels_the_azure_job(rest_backend, azure, settings, spec, clock, interrupt):
    azure.job_statuses = ["Queued"] + ["Running"] * 1000
    remote = "azureml://datastores/workspaceblobstore/paths/d/{}.jsonl"
    spec = dataclasses.replace(spec, train_file=Path(remote.format("train")), eval_file=Path(remote.format("test")))
    job = rest_backend.submit_training(spec).job_id

    def sleep(seconds: float) -> None:
        if len(clock.sleeps) == 2 and interrupt == "status-refused":
            azure.fault("GET", rf"/jobs/{job}$", 403, body={"error": {"code": "AuthorizationFailed", "message": "no"}})
        elif len(clock.sleeps) == 2 and isinstance(interrupt, BaseException):
            raise interrupt
        clock.sleep(seconds)

    with pytest.raises((BaseException,)):
        wait_for_job(
            rest_backend, job, _quick(settings, timeout_s=600.0, poll_interval_s=30.0), PollTiming(sleep, clock)
        )
    assert len(azure.sent("POST", rf"/jobs/{job}/cancel$")) == 1
    assert azure.jobs[job]["properties"]["status"] in ("CancelRequested", "Canceled")


def test_contract_the_dict_fake_and_the_rest_fake_agree_on_a_rollout(
    backend, fake, scoring_host, rest_backend, azure, settings, monkeypatch
) -> None:
    """One scenario (v1 live, v2 rolled out with a mirror first) through both fakes: the same result, the same
    traffic maps in the same order, the same endpoint and registry afterwards."""
    settings.rollout.mirror_percent, settings.rollout.mirror_duration_s = 10, 0.0

    def outcome(b, result, maps) -> tuple[Any, ...]:
        endpoint = b.get_endpoint()
        deployments = sorted((d.name, d.model_version, d.state) for d in endpoint.deployments)
        steps = [s["percent"] for s in result.steps]
        return result.traffic_after, steps, maps, endpoint.traffic, deployments, b.get_model_by_alias(CHAMPION).version

    _live_v1(backend, fake, settings)
    history = _record_endpoint_updates(fake, monkeypatch)
    by_dict_fake = outcome(backend, _rollout(backend, backend.register_model("job-2", {}), settings), history)
    _rest_live_v1(rest_backend, azure)
    result = _rollout(rest_backend, rest_backend.register_model("job-2", {}), settings)
    by_rest_fake = outcome(rest_backend, result, _maps_sent(azure, settings.endpoint.name))
    assert by_dict_fake == by_rest_fake
    assert by_rest_fake[0] == {"model-v2": 100} and len(by_rest_fake[2]) == 5
