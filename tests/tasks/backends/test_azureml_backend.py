"""The azureml backend's real code against a fake MLClient (Azure cannot be reached from here).

The fake raises the SDK's real exception types on a real azure.core response, keeps workspace state and refuses
what Azure ML refuses; time is a fake clock whose ``sleep`` records the backoff delays.
"""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from azure.core.exceptions import ServiceRequestError

from tasks.backends.azureml import AzureMLBackend, map_deployment_state, map_job_status
from tasks.backends.base import (
    Backend,
    BackendError,
    DeploymentFailedError,
    JobStatus,
    ModelVersion,
    RetriesExhaustedError,
)
from tasks.retry import is_transient, jitter_bounds
from tests.tasks.backends.conftest import REPO_ROOT
from tests.tasks.backends.fake_azure import FakeMLClient, http_error


def test_it_implements_the_backend_protocol(backend) -> None:
    assert isinstance(backend, Backend)
    assert backend.name == "azureml"


def test_construction_is_lazy_and_picks_the_configured_credential(settings) -> None:
    from azure.identity import AzureCliCredential, DefaultAzureCredential, ManagedIdentityCredential

    backend = AzureMLBackend(settings)  # no network: the MLClient is built on first use
    assert isinstance(backend._make_credential(), DefaultAzureCredential)
    for kind, cls in (("azure_cli", AzureCliCredential), ("managed_identity", ManagedIdentityCredential)):
        cfg = settings.azureml.model_copy(update={"credential": kind, "managed_identity_client_id": "0" * 8})
        assert isinstance(AzureMLBackend(settings.model_copy(update={"azureml": cfg}))._make_credential(), cls)
    client = backend.client
    assert client.workspace_name == settings.azureml.workspace
    assert client.subscription_id == settings.azureml.subscription_id


@pytest.mark.parametrize(
    ("azure", "ours"),
    [
        ("NotStarted", JobStatus.QUEUED), ("Queued", JobStatus.QUEUED), ("Preparing", JobStatus.QUEUED),
        ("Provisioning", JobStatus.QUEUED), ("Starting", JobStatus.QUEUED), ("Paused", JobStatus.QUEUED),
        ("Running", JobStatus.RUNNING), ("Finalizing", JobStatus.RUNNING), ("CancelRequested", JobStatus.RUNNING),
        ("NotResponding", JobStatus.RUNNING), ("Completed", JobStatus.COMPLETED), ("Failed", JobStatus.FAILED),
        ("Canceled", JobStatus.CANCELED), ("SomethingNew", JobStatus.RUNNING),
    ],
)  # fmt: skip
def test_every_azure_job_status_maps(azure, ours) -> None:
    assert map_job_status(azure) == ours


def test_deployment_states_map() -> None:
    states = ("Creating", "Updating", "Succeeded", "Failed", "Canceled", "Deleting")
    assert [map_deployment_state(s) for s in states] == [
        "creating", "creating", "ready", "failed", "failed", "deleting",
    ]  # fmt: skip


def test_a_job_goes_queued_running_completed(backend, fake, spec) -> None:
    info = backend.submit_training(spec)
    assert info.status == JobStatus.QUEUED and info.url.startswith("https://ml.azure.com/runs/")
    # Environment and compute did not exist: each fetched once, then created once.
    assert len(fake.called("environments.create_or_update")) == 1
    assert len(fake.called("compute.begin_create_or_update")) == 1
    submitted = fake.jobs.submitted[0]
    assert "--output_dir ${{outputs.model_output}}" in submitted.command
    assert submitted.environment.startswith("azureml:finetune-phi-train:")
    assert submitted.inputs["train_file"].path == str(Path(spec.train_file).resolve())
    seen = [backend.get_job(info.job_id).status for _ in range(3)]
    assert seen == [JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.COMPLETED]
    assert backend.get_job(info.job_id).error is None


def test_environment_and_compute_are_reused_when_they_exist(backend, fake, spec) -> None:
    backend.submit_training(spec)
    fake.calls.clear()
    # Same inputs again (a re-run after a crash): nothing is created and the existing job is returned.
    again = backend.submit_training(spec)
    assert again.job_id == fake.jobs.submitted[0].name
    assert not fake.called("environments.create_or_update")
    assert not fake.called("compute.begin_create_or_update")
    assert not fake.called("jobs.create_or_update")


def test_a_failed_job_with_the_same_inputs_gets_a_fresh_name(backend, fake, spec) -> None:
    first = backend.submit_training(spec).job_id
    fake.jobs.store[first].status, fake.jobs.scripts[first] = "Failed", []
    second = backend.submit_training(spec).job_id
    assert second == f"{first}-2"
    assert len(fake.jobs.submitted) == 2


def test_a_refresh_submits_a_new_job_next_to_a_running_one(backend, fake, spec) -> None:
    import dataclasses

    first = backend.submit_training(spec).job_id
    assert backend.submit_training(spec).job_id == first  # same inputs: the same job
    forced = backend.submit_training(dataclasses.replace(spec, fresh=True)).job_id
    assert forced == f"{first}-2" and len(fake.jobs.submitted) == 2


def test_a_submit_whose_answer_was_lost_uses_the_job_azure_created(backend, fake, spec) -> None:
    real_create = fake.jobs.create_or_update

    def create_then_time_out(job, **kwargs):
        real_create(job)
        raise http_error(504, "Gateway Timeout")

    fake.jobs.create_or_update = create_then_time_out  # every retry now meets 409 "already exists"
    info = backend.submit_training(spec)
    assert info.job_id == fake.jobs.submitted[0].name and len(fake.jobs.submitted) == 1


def test_transient_429_and_503_are_retried_with_jittered_exponential_backoff(backend, fake, clock, spec, settings):
    job = backend.submit_training(spec).job_id
    fake.fail("jobs.get", http_error(429, "Rate limit", "TooManyRequests"), http_error(503, "busy"))
    fake.fail("jobs.get", ServiceRequestError("connection reset"))
    clock.sleeps.clear()
    assert backend.get_job(job).status == JobStatus.QUEUED
    assert len(clock.sleeps) == 3
    for attempt, delay in enumerate(clock.sleeps):
        low, high = jitter_bounds(attempt, settings.retry)
        assert low <= delay <= high, (attempt, delay)
    # Exponential: the jitter bounds double each time (2 s base in configs/azureml.yaml), and jitter is real.
    assert jitter_bounds(2, settings.retry)[0] == 4 * jitter_bounds(0, settings.retry)[0] == 4.0
    assert len({round(d / 2**n, 6) for n, d in enumerate(clock.sleeps)}) == 3


def test_transient_faults_give_up_with_a_clear_error(backend, fake, clock, settings) -> None:
    fake.jobs.add("j1", "Running")
    fake.fail("jobs.get", *[http_error(503, "Service Unavailable")] * settings.retry.attempts)
    with pytest.raises(BackendError, match=r"HTTP 503 to get job j1.*gave up after 5 attempts") as caught:
        backend.get_job("j1")
    # Not transient, so a caller's own immediate retry does not multiply the attempts; but marked as exhausted, so a
    # status poll counts it as a missed poll and a task may retry later (test_azureml_flow, test_retry).
    assert type(caught.value) is RetriesExhaustedError and not is_transient(caught.value)
    assert len(clock.sleeps) == settings.retry.attempts - 1


def test_client_errors_are_not_retried(backend, fake, clock) -> None:
    fake.jobs.add("j1", "Running")
    fake.fail("jobs.get", http_error(400, "bad job name", "UserError"))
    with pytest.raises(BackendError, match=r"refused to get job j1 \(HTTP 400\)"):
        backend.get_job("j1")
    fake.fail("jobs.get", http_error(403, "AuthorizationFailed"))
    with pytest.raises(BackendError, match="Contributor"):
        backend.get_job("j1")
    assert clock.sleeps == []


def test_a_failed_job_gives_status_message_studio_url_and_log_tail(backend, fake, spec, logs) -> None:
    fake.job_statuses = ["Queued", "Running", "Failed"]
    job = backend.submit_training(spec).job_id
    url = "https://store.blob.core.windows.net/logs/std_log.txt?sas"
    fake.log_files[job] = {"user_logs/std_log.txt": url, "system_logs/lifecycler/execution-wrapper.log": "x"}
    logs[url] = "step 1 loss 2.0\nstep 2 loss 1.5\ntorch.OutOfMemoryError: CUDA out of memory\n"
    assert [backend.get_job(job).status for _ in range(2)] == [JobStatus.QUEUED, JobStatus.RUNNING]
    info = backend.get_job(job)
    assert info.status == JobStatus.FAILED
    assert f"Azure ML job {job} ended Failed" in info.error
    assert "UserError: Execution failed: CUDA out of memory" in info.error
    assert f"https://ml.azure.com/runs/{job}" in info.error
    assert info.error.rstrip().endswith("torch.OutOfMemoryError: CUDA out of memory")


class _BlobLog(BaseHTTPRequestHandler):
    """A log file as blob storage serves it: ``Range: bytes=-N`` answers 206 with the last N bytes, ``bytes=N-``
    206 with the bytes from N on, or 416 when the file has no byte N yet."""

    body = b""

    def do_GET(self) -> None:
        if self.path != "/std_log.txt":
            self.send_error(404)
            return
        suffix = re.fullmatch(r"bytes=-(\d+)", self.headers.get("Range", ""))
        start = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if start and int(start.group(1)) >= len(self.body):
            self.send_error(416)
            return
        data = (
            self.body[-int(suffix.group(1)) :] if suffix else self.body[int(start.group(1)) :] if start else self.body
        )
        self.send_response(206 if suffix or start else 200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def blob_log(fake):
    """Job ``j1`` whose user log is served by a real HTTP server on loopback (its URL in the run details)."""
    _BlobLog.body = b""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _BlobLog)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.jobs.add("j1", "Running")
    fake.log_files["j1"] = {
        "system_logs/lifecycler/execution-wrapper.log": "http://127.0.0.1:1/never-read",
        "user_logs/std_log.txt": f"http://127.0.0.1:{server.server_port}/std_log.txt",
    }
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_log_tail_is_read_over_http_from_its_end(settings, fake, training_dir, monkeypatch, blob_log) -> None:
    """The default fetcher against a real HTTP server on loopback (the log files' URLs in the run details)."""
    monkeypatch.setattr("tasks.backends.azureml.LOG_TAIL_BYTES", 40)
    _BlobLog.body = "".join(f"line {i}\n" for i in range(100)).encode()
    backend = AzureMLBackend(settings, ml_client=fake, sleep=lambda s: None, training_dir=training_dir)
    tail = backend.job_log_tail("j1", 3)
    assert tail == ["line 97", "line 98", "line 99"]
    # Only the last 40 bytes came over the wire, and the partial first line was dropped.
    assert backend.job_log_tail("j1", 100)[0] in ("line 95", "line 96")
    fake.log_files["j1"] = {"user_logs/std_log.txt": f"http://127.0.0.1:{blob_log.server_port}/missing.txt"}
    assert backend.job_log_tail("j1", 3) == []  # a log not there yet is not an error


def test_log_since_reads_only_the_new_bytes_and_every_line_once(settings, fake, training_dir, blob_log) -> None:
    backend = AzureMLBackend(settings, ml_client=fake, sleep=lambda s: None, training_dir=training_dir)
    assert backend.job_log_since("j1", 0) == ([], 0)  # 416: nothing written yet
    _BlobLog.body = b"".join(b"step 1/9 | loss 2.0\n" for _ in range(30)) + b"step 2/9 | lo"
    lines, offset = backend.job_log_since("j1", 0)
    assert lines == ["step 1/9 | loss 2.0"] * 30  # repeated lines are new lines too; the partial one waits
    assert offset == len(_BlobLog.body) - len(b"step 2/9 | lo")
    assert backend.job_log_since("j1", offset) == ([], offset)
    _BlobLog.body += b"ss 1.5\n" + "café 3/9\n".encode()
    assert backend.job_log_since("j1", offset) == (["step 2/9 | loss 1.5", "café 3/9"], len(_BlobLog.body))
    assert backend.job_log_since("j1", len(_BlobLog.body)) == ([], len(_BlobLog.body))  # 416 again


def test_log_since_follows_the_user_log_only(backend, fake, logs) -> None:
    """System logs come first and an offset means nothing in another file: only the training's own log is read."""
    fake.jobs.add("j1", "Preparing")
    fake.log_files["j1"] = {"system_logs/lifecycler/lifecycler.log": "sys"}
    logs["sys"] = "pulling image\n"
    assert backend.job_log_since("j1", 0) == ([], 0)
    fake.log_files["j1"]["user_logs/std_log.txt"] = "user"
    logs["user"] = "training from scratch\n"
    assert backend.job_log_since("j1", 0) == (["training from scratch"], len(logs["user"]))


def test_cancel_job_cancels_a_running_job_only(backend, fake) -> None:
    fake.jobs.add("running", "Running")
    fake.jobs.add("done", "Completed")
    backend.cancel_job("running")
    backend.cancel_job("done")
    backend.cancel_job("never-existed")
    assert fake.called("jobs.begin_cancel") == [("jobs.begin_cancel", "running")]
    assert backend.get_job("running").status == JobStatus.RUNNING  # CancelRequested
    assert backend.get_job("running").status == JobStatus.CANCELED


def test_job_metrics_come_from_the_jobs_mlflow_run(backend, fake, tmp_path) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    fake.tracking_uri = uri  # on Azure: the workspace's azureml:// tracking URI
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("finetune-phi"))
    client.log_metric(run.info.run_id, "eval_loss", 1.25)
    client.log_metric(run.info.run_id, "train_loss", 0.5)
    # Azure ML names the job's MLflow run after the job.
    assert backend.job_metrics(run.info.run_id) == {"eval_loss": 1.25, "train_loss": 0.5}
    with pytest.raises(BackendError, match="could not read the metrics of job nope"):
        backend.job_metrics("nope")


def test_registration_is_idempotent_on_the_job_and_aliases_are_tags(backend, fake) -> None:
    v1 = backend.register_model("job-a", {"manifest_sha256": "ab", "recipe": "r.yaml"})
    assert (v1.version, v1.source_job_id, v1.uri) == ("1", "job-a", "azureml:finetune-phi:1")
    stored = fake.models.store["finetune-phi"]["1"]
    assert stored.path == "azureml://jobs/job-a/outputs/model_output/paths/mlflow_model"
    assert stored.type == "mlflow_model"
    again = backend.register_model("job-a", {"eval_loss": "1.2"})
    assert again.version == "1" and again.tags["eval_loss"] == "1.2" and again.tags["recipe"] == "r.yaml"
    assert len(fake.models.store["finetune-phi"]) == 1
    v2 = backend.register_model("job-b", {})
    assert v2.version == "2"

    assert backend.get_model_by_alias("champion") is None
    backend.set_alias("champion", v1)
    assert backend.get_model_by_alias("champion").version == "1"
    backend.set_alias("champion", v2)
    backend.set_alias("candidate", v2)
    assert backend.get_model_by_alias("champion").version == "2"
    assert backend.get_model_by_alias("candidate").version == "2"
    holders = [v for v, m in fake.models.store["finetune-phi"].items() if m.tags.get("alias.champion") == "true"]
    assert holders == ["2"]


def test_model_folder_downloads_once_and_finds_the_hugging_face_files(backend, fake) -> None:
    version = backend.register_model("job-a", {})
    folder = backend.model_folder(version)
    assert (folder / "config.json").is_file()
    assert (folder / "tokenizer_config.json").is_file()  # from components/tokenizer: the folder loads on its own
    assert backend.model_folder(version) == folder
    assert len(fake.called("models.download")) == 1


def _version(n: str) -> ModelVersion:
    return ModelVersion("finetune-phi", n, f"job-{n}", f"azureml:finetune-phi:{n}")


def test_deployment_created_polled_with_backoff_until_ready(backend, fake, clock, settings) -> None:
    backend.ensure_endpoint()
    fake.deployment_states["model-v1"] = ["Creating", "Creating", "Creating", "Succeeded"]
    assert backend.create_deployment("model-v1", _version("1")).state == "creating"
    deployment = fake.online_deployments.created[0]
    assert deployment.model == "azureml:finetune-phi:1" and deployment.instance_type == "Standard_E4s_v3"
    assert deployment.readiness_probe.initial_delay == 500
    clock.sleeps.clear()
    info = backend.wait_deployment_ready("model-v1", timeout_s=600)
    assert (info.state, info.model_version) == ("ready", "1")
    assert len(clock.sleeps) == 3
    assert all(
        jitter_bounds(n, settings.retry)[0] <= d <= jitter_bounds(n, settings.retry)[1]
        for n, d in enumerate(clock.sleeps)
    )


def test_a_deployment_not_ready_in_time_says_so(backend, fake, clock) -> None:
    backend.ensure_endpoint()
    fake.deployment_states["model-v1"] = ["Creating"] * 100
    backend.create_deployment("model-v1", _version("1"))
    with pytest.raises(DeploymentFailedError) as failed:
        backend.wait_deployment_ready("model-v1", timeout_s=30)
    assert "(Creating)" in str(failed.value) and "not ready after 30 s" in str(failed.value)
    assert sum(clock.sleeps) == pytest.approx(30)


def test_get_endpoint_is_none_when_missing(backend) -> None:
    assert backend.get_endpoint() is None


def test_not_found_on_a_required_resource_is_a_clear_error(backend) -> None:
    with pytest.raises(BackendError, match="does not exist in workspace 'my-aml-workspace'"):
        backend.get_job("no-such-job")


def test_fake_refuses_what_azure_refuses() -> None:
    """The fake is only useful if it says no where Azure ML does; check it on its own."""
    fake = FakeMLClient()
    with pytest.raises(Exception, match="does not exist"):
        fake.online_endpoints.begin_create_or_update(
            type("E", (), {"name": "ep", "traffic": {"x": 100}, "mirror_traffic": {}, "auth_mode": "key"})()
        )


# What sft.py writes to metrics.json (numbers and lineage), as the local registry reads it.
SFT_METRICS = {
    "train_loss": 1.87654321, "steps": 20, "tokens_per_second": 812.5, "initial_loss": 3.2, "final_loss": 1.5,
    "eval_loss": 1.2345678, "eval_perplexity": 3.43689, "wall_time_s": 95.3, "train_time_s": 80.12,
    "peak_memory_mb": 2048.0, "cpu_time_s": 150.2, "manifest_sha256": "ab" * 32, "recipe": "tiny_full_cpu",
    "base_model": "tiny", "method": "full", "mlflow_run_id": None,
}  # fmt: skip
WRITES_METRICS = """
import json, sys
from pathlib import Path
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
out = Path(args["--output_dir"])
(out / "mlflow_model").mkdir(parents=True)
metrics = {**json.loads(%r), "mlflow_model_uri": (out / "mlflow_model").as_uri()}
(out / "metrics.json").write_text(json.dumps(metrics))
"""


def test_registration_tags_have_the_same_keys_on_both_backends(backend, fake, tmp_path) -> None:
    """The local registry takes lineage from the job's metrics.json; Azure ML from the job's MLflow run, where
    sft.py logs the same numbers as metrics and recipe, data hash and base model as params."""
    import json

    import mlflow

    from tasks.backends.azureml_entities import OWNER_TAG
    from tasks.backends.local import LocalBackend
    from tasks.backends.local_jobs import LocalJobRunner
    from tasks.config import load_config
    from tests.tasks.test_jobs import _spec, _training_dir

    flow_tags = {"manifest_sha256": "ab" * 32, "recipe": "training/recipes/tiny_full_cpu.yaml"}
    local_settings = load_config(REPO_ROOT / "configs" / "local.yaml").model_copy(
        update={"state_dir": tmp_path / "local"}
    )
    local = LocalBackend(local_settings)
    local._runner = LocalJobRunner(
        local.paths.jobs, training_dir=_training_dir(tmp_path, WRITES_METRICS % json.dumps(SFT_METRICS))
    )
    job = local.submit_training(_spec(local.runner.training_dir))
    local.runner.wait(job.job_id, timeout_s=60, poll_interval_s=0.05)
    local_tags = local.register_model(job.job_id, flow_tags).tags

    fake.tracking_uri = f"sqlite:///{tmp_path / 'workspace-mlflow.db'}"
    client = mlflow.tracking.MlflowClient(tracking_uri=fake.tracking_uri)
    run = client.create_run(client.create_experiment("finetune-phi"))
    for key, value in SFT_METRICS.items():  # sft.py: run.log_metrics of every number in metrics.json
        if isinstance(value, int | float):
            client.log_metric(run.info.run_id, key, float(value))
    params = {  # sft.py's run_params (the lineage among them)
        "model_name_or_path": "tiny (built from the training split)",
        "use_peft": "False",
        "recipe": "tiny_full_cpu",
        "manifest_sha256": "ab" * 32,
        "learning_rate": "0.001",
    }
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    azure_tags = backend.register_model(run.info.run_id, flow_tags).tags

    local_keys = set(local_tags) - {"model_dir"}  # where the local Hugging Face folder is: no such thing on Azure
    azure_keys = set(azure_tags) - set(OWNER_TAG)
    assert local_keys == azure_keys
    assert {"base_model", "method", "eval_loss", "eval_perplexity", "train_loss", "train_time_s"} <= azure_keys
    assert {k: azure_tags[k] for k in azure_keys - {"job_id"}} == {k: local_tags[k] for k in local_keys - {"job_id"}}
