"""The flow's own code (tasks/rollout.py, flows/finetune_deploy.py) driving the azureml backend over the fake client.

A real Prefect (test harness) runs the rollout's tasks and transaction hooks; the endpoint's OpenAI-compatible routes
that the smoke test calls are a real HTTP server on loopback standing in for the managed endpoint's host.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from prefect import flow
from prefect.testing.utilities import prefect_test_harness

from tasks.backends.base import JobFailedError, ModelVersion
from tasks.rollout import CHAMPION, RolloutFailed, reconcile, run_rollout


@pytest.fixture(scope="module", autouse=True)
def prefect_harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


class _Endpoint(BaseHTTPRequestHandler):
    """``/v1/chat/completions`` as the deployments would answer; ``broken`` deployments never stop generating."""

    key: ClassVar[str] = ""
    broken: ClassVar[set[str]] = set()
    served: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        self.rfile.read(length)
        if self.headers.get("Authorization") != f"Bearer {self.key}":
            return self._send(401, {"error": {"message": "bad key"}}, None)
        deployment = self.headers.get("azureml-model-deployment") or "live"
        type(self).served.append(deployment)
        finish = "length" if deployment in self.broken else "stop"
        self._send(200, {"choices": [{"message": {"content": "Hello."}, "finish_reason": finish}]}, deployment)

    def _send(self, status: int, body: dict[str, Any], deployment: str | None) -> None:
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
    _Endpoint.key, _Endpoint.broken, _Endpoint.served = fake.endpoint_key, set(), []
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
    assert "model-v2" in scoring_host.served  # the pinned smoke test reached the new deployment
    assert {d.name for d in backend.get_endpoint().deployments} == {"model-v1", "model-v2"}  # keep_previous: 1


def test_a_deployment_that_fails_leaves_traffic_unchanged_and_is_deleted(backend, fake, settings, scoring_host):
    _live_v1(backend, fake, settings)
    v2 = backend.register_model("job-2", {})
    fake.deployment_states["model-v2"] = ["Creating", "Failed"]
    with pytest.raises(RolloutFailed, match="rolled back") as caught:
        _rollout(backend, v2, settings)
    assert "model load: out of memory" in str(caught.value)  # the container log says why
    endpoint = backend.get_endpoint()
    assert endpoint.traffic == {"model-v1": 100}
    assert [d.name for d in endpoint.deployments] == ["model-v1"]
    assert backend.get_model_by_alias(CHAMPION).version == "1"
    assert fake.called("online_deployments.begin_delete") == [
        ("online_deployments.begin_delete", "model-v2", settings.endpoint.name)
    ]
    assert not fake.called("online_endpoints.begin_delete")  # the endpoint is never deleted


def test_a_new_deployment_failing_its_smoke_test_moves_no_traffic(backend, fake, settings, scoring_host) -> None:
    _live_v1(backend, fake, settings)
    v2 = backend.register_model("job-2", {})
    scoring_host.broken.add("model-v2")
    with pytest.raises(RolloutFailed, match="did not end"):
        _rollout(backend, v2, settings)
    assert backend.get_endpoint().traffic == {"model-v1": 100}
    assert [d.name for d in backend.get_endpoint().deployments] == ["model-v1"]


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


def test_a_wait_that_times_out_cancels_the_azure_job(backend, fake, settings, spec) -> None:
    from flows.finetune_deploy import wait_for_job

    fake.job_statuses = ["Queued"] + ["Running"] * 1000
    job = backend.submit_training(spec).job_id
    quick = settings.model_copy(
        update={"training": settings.training.model_copy(update={"timeout_s": 0.3, "poll_interval_s": 0.05})}
    )

    @flow
    def wait() -> None:
        wait_for_job(backend, job, quick)

    with pytest.raises(JobFailedError, match="was canceled"):
        wait()
    assert fake.called("jobs.begin_cancel") == [("jobs.begin_cancel", job)]
    assert fake.jobs.store[job].status in ("CancelRequested", "Canceled")


def test_scoring_key_is_kept_in_a_prefect_secret_block(settings, fake, training_dir) -> None:
    from prefect.blocks.system import Secret

    from tasks.backends.azureml import AzureMLBackend

    backend = AzureMLBackend(settings, ml_client=fake, sleep=lambda s: None, training_dir=training_dir)
    backend.ensure_endpoint()
    assert backend.scoring_key() == fake.endpoint_key
    assert Secret.load(backend.secret_block_name).get() == fake.endpoint_key


def test_an_interrupted_wait_cancels_the_azure_job(backend, fake, settings, spec, monkeypatch) -> None:
    """Ctrl-C on ``finetune-phi run`` (KeyboardInterrupt); Prefect's cancellation arrives the same way, as a
    BaseException (TerminationSignal), which is not raised here because Prefect re-sends it to the process."""
    from flows.finetune_deploy import wait_for_job

    fake.job_statuses = ["Queued"] + ["Running"] * 1000
    job = backend.submit_training(spec).job_id
    polls: list[str] = []
    real_get_job = backend.get_job

    def get_job_then_interrupt(job_id: str):
        polls.append(job_id)
        if len(polls) == 3:
            raise KeyboardInterrupt
        return real_get_job(job_id)

    monkeypatch.setattr(backend, "get_job", get_job_then_interrupt)
    quick = settings.model_copy(update={"training": settings.training.model_copy(update={"poll_interval_s": 0.01})})

    @flow
    def wait() -> None:
        wait_for_job(backend, job, quick)

    with pytest.raises(KeyboardInterrupt):
        wait()
    assert len(polls) == 3
    assert fake.called("jobs.begin_cancel") == [("jobs.begin_cancel", job)]
    assert fake.jobs.store[job].status in ("CancelRequested", "Canceled")
