"""The azureml backend through the real azure-ai-ml client, down to HTTPS on loopback (``tests/azure_fake``).

Every request is the SDK's own: its REST serialisation, pollers, error mapping, and the extra calls it makes (a
workspace GET before usages, an endpoint GET before a deployment PUT, a code lookup by content hash before a job
submit). Assertions are on the wire (the fake's request log) and on what the backend returns. Time is the
injected clock: the backend's backoff and the SDK pollers' sleeps both go through it, so nothing really sleeps.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path

import pytest

from tasks.backends.base import (
    BackendError,
    DeploymentFailedError,
    JobFailedError,
    JobStatus,
    ModelVersion,
    RetriesExhaustedError,
    TransientBackendError,
)

REMOTE = "azureml://datastores/workspaceblobstore/paths/finetune-phi/{}.jsonl"


def _remote(spec):
    return dataclasses.replace(spec, train_file=Path(REMOTE.format("train")), eval_file=Path(REMOTE.format("test")))


def _version(n: str) -> ModelVersion:
    return ModelVersion("finetune-phi", n, f"job-{n}", f"azureml:finetune-phi:{n}")


def _sdk_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("LROPoller")]


@pytest.fixture(autouse=True)
def _no_poller_left_and_nothing_printed(capfd):
    """After every test here: no SDK poller thread alive, and nothing on stdout (the SDK prints poll dots)."""
    yield
    assert _sdk_threads() == []
    assert capfd.readouterr().out == ""


# ---------------------------------------------------------------------------------------------- training


def test_a_job_goes_queued_running_completed_and_the_put_is_what_azure_needs(rest_backend, azure, spec, settings):
    info = rest_backend.submit_training(_remote(spec))
    assert info.status == JobStatus.QUEUED
    assert info.url.startswith("https://ml.azure.com/runs/") and info.job_id in info.url
    assert [rest_backend.get_job(info.job_id).status for _ in range(2)] == [JobStatus.RUNNING, JobStatus.COMPLETED]

    # The code snapshot is looked up by content hash first (found: no upload), then the job PUT names it.
    assert azure.sent("GET", r"/codes/[^/]+/versions$")[0].query["hash"]
    (put,) = azure.sent("PUT", rf"/jobs/{info.job_id}$")
    job = put.body["properties"]
    assert job["jobType"] == "Command"
    assert job["command"].startswith("python sft.py --config recipes/phi3.5-mini_full_gpu.yaml ")
    assert "--output_dir ${{outputs.model_output}}" in job["command"] and "--max_steps 20" in job["command"]
    assert job["inputs"]["train_file"] == {"jobInputType": "uri_file", "uri": REMOTE.format("train")}
    assert job["distribution"] == {"distributionType": "PyTorch", "processCountPerInstance": 1}
    assert job["environmentId"].endswith("/environments/finetune-phi-train/versions/" + job["environmentId"][-16:])
    assert "/codes/" in job["codeId"] and job["computeId"].endswith("/computes/gpu-a100-cluster")
    assert job["outputs"]["model_output"]["jobOutputType"] == "uri_folder"
    # Environment and compute were missing: created once each, with what the config says.
    (env,) = azure.sent("PUT", r"/environments/")
    assert env.body["properties"]["image"] == settings.azureml.environment.image
    (compute,) = azure.sent("PUT", r"/computes/")
    assert compute.body["properties"]["properties"]["vmSize"] == "Standard_NC24ads_A100_v4"
    assert compute.body["properties"]["properties"]["scaleSettings"]["minNodeCount"] == 0


def test_a_rerun_reuses_the_job_environment_and_compute(rest_backend, azure, spec) -> None:
    first = rest_backend.submit_training(_remote(spec))
    again = rest_backend.submit_training(_remote(spec))
    assert again.job_id == first.job_id
    assert len(azure.sent("PUT", r"/jobs/")) == 1
    assert len(azure.sent("PUT", r"/environments/")) == len(azure.sent("PUT", r"/computes/")) == 1


def test_a_failed_job_gives_azures_error_and_the_studio_url(rest_backend, azure, spec) -> None:
    azure.job_statuses = ["Queued", "Failed"]
    info = rest_backend.submit_training(_remote(spec))
    azure.log_files[info.job_id] = {"user_logs/std_log.txt": "step 1\nTraceback ...\nCUDA out of memory\n"}
    failed = rest_backend.get_job(info.job_id)
    assert failed.status == JobStatus.FAILED
    assert "UserError: Execution failed: CUDA out of memory." in failed.error
    assert f"Details: https://ml.azure.com/runs/{info.job_id}" in failed.error
    assert failed.error.endswith("CUDA out of memory")  # the log tail, read over HTTPS from its URL
    assert azure.sent("GET", rf"/history/v1\.0/.*/runs/{info.job_id}/details$")


def test_log_lines_stream_by_offset_from_the_run_details_urls(rest_backend, azure) -> None:
    azure.add_job("job-1", "Running")
    azure.log_files["job-1"] = {"user_logs/std_log.txt": "one\ntwo\n", "system_logs/x.txt": "sys\n"}
    lines, offset = rest_backend.job_log_since("job-1", 0)
    assert lines == ["one", "two"]
    azure.log_files["job-1"]["user_logs/std_log.txt"] += "three\n"
    assert rest_backend.job_log_since("job-1", offset) == (["three"], offset + 6)
    assert rest_backend.job_log_since("job-1", offset + 6) == ([], offset + 6)  # 416 from storage: nothing new


def test_cancel_sends_the_cancel_and_leaves_no_poller(rest_backend, azure) -> None:
    azure.add_job("job-1", "Running")
    azure.lro["job_cancel"] = ["InProgress"]
    rest_backend.cancel_job("job-1")
    assert len(azure.sent("POST", r"/jobs/job-1/cancel$")) == 1
    assert rest_backend.get_job("job-1").status == JobStatus.RUNNING  # CancelRequested
    assert rest_backend.get_job("job-1").status == JobStatus.CANCELED
    rest_backend.cancel_job("job-1")  # already ended: nothing sent
    assert len(azure.sent("POST", r"/cancel$")) == 1


# ---------------------------------------------------------------------------------------------- one retry layer


def test_n_503s_on_a_status_read_are_exactly_n_requests_on_the_injected_clock(rest_backend, azure, clock, settings):
    azure.add_job("job-1", "Running")
    attempts = settings.retry.attempts
    azure.fault("GET", r"/jobs/job-1$", 503, times=attempts - 1, retry_after=30)
    assert rest_backend.get_job("job-1").status == JobStatus.RUNNING
    assert len(azure.sent("GET", r"/jobs/job-1$")) == attempts  # no retries of the SDK's own on top of ours
    assert len(clock.sleeps) == attempts - 1  # and every wait on the injected clock

    azure.requests.clear()
    clock.sleeps.clear()
    azure.fault("GET", r"/jobs/job-1$", 503, times=attempts)
    with pytest.raises(RetriesExhaustedError, match=f"HTTP 503 to get job job-1.*after {attempts} attempts"):
        rest_backend.get_job("job-1")
    assert len(azure.sent("GET", r"/jobs/job-1$")) == attempts
    assert len(clock.sleeps) == attempts - 1


def test_a_client_error_is_one_request_and_one_sentence(rest_backend, azure, clock) -> None:
    azure.fault("GET", r"/jobs/job-1$", 403, body={"error": {"code": "AuthorizationFailed", "message": "no access"}})
    with pytest.raises(BackendError, match=r"permission denied to get job job-1 .*Contributor"):
        rest_backend.get_job("job-1")
    assert len(azure.sent("GET", r"/jobs/job-1$")) == 1 and clock.sleeps == []


# ---------------------------------------------------------------------------------------------- registry


def test_register_is_idempotent_with_lineage_and_aliases_are_tags(rest_backend, azure, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    def broken(self, run_id):  # what the azureml-mlflow plugin does on a bad token: a bare Exception
        raise Exception("AzureMLRequestsHook: token expired")

    monkeypatch.setattr(MlflowClient, "get_run", broken)
    v1 = rest_backend.register_model("job-1", {"manifest_sha256": "ab"})
    assert (v1.version, v1.source_job_id, v1.uri) == ("1", "job-1", "azureml:finetune-phi:1")
    (put,) = azure.sent("PUT", r"/models/finetune-phi/versions/1$")
    assert put.body["properties"]["modelType"] == "mlflow_model"
    assert put.body["properties"]["modelUri"] == "azureml://jobs/job-1/outputs/model_output/paths/mlflow_model"
    assert put.body["properties"]["tags"]["job_id"] == "job-1"

    again = rest_backend.register_model("job-1", {"gate": "passed"})
    assert again.version == "1" and again.tags["gate"] == "passed" and again.tags["manifest_sha256"] == "ab"
    v2 = rest_backend.register_model("job-2", {})
    assert v2.version == "2"
    rest_backend.set_alias("champion", v1)
    rest_backend.set_alias("champion", v2)
    assert rest_backend.get_model_by_alias("champion").version == "2"
    assert azure.models["finetune-phi"]["1"]["properties"]["tags"].get("alias.champion") is None


# ---------------------------------------------------------------------------------------------- endpoint


def test_the_endpoint_is_created_once_with_the_user_assigned_identity(rest_backend, azure, settings) -> None:
    info = rest_backend.ensure_endpoint()
    assert info.name == settings.endpoint.name and info.traffic == {}
    assert info.scoring_uri == azure.scoring_uri(settings.endpoint.name)
    assert info.openai_base_url == info.scoring_uri.removesuffix("/score") + "/v1"
    rest_backend.ensure_endpoint()
    assert not azure.sent("DELETE", r"/onlineEndpoints/")
    (put,) = azure.sent("PUT", rf"/onlineEndpoints/{settings.endpoint.name}$")
    assert put.body["identity"]["type"] == "UserAssigned"
    assert list(put.body["identity"]["userAssignedIdentities"]) == [settings.azureml.user_assigned_identity_id]
    assert put.body["properties"]["authMode"] == "Key"


def test_the_deployment_request_settings_and_probes_are_on_the_wire(rest_backend, azure, settings, clock) -> None:
    rest_backend.ensure_endpoint()
    assert rest_backend.create_deployment("model-v1", _version("1")).state == "creating"
    assert rest_backend.wait_deployment_ready("model-v1", 600).state == "ready"
    (put,) = azure.sent("PUT", r"/deployments/model-v1$")
    props, d = put.body["properties"], settings.azureml.deployment
    assert put.body["sku"]["name"] == "Default" and put.body["sku"]["capacity"] == d.instance_count
    assert props["instanceType"] == d.instance_type
    assert props["model"].endswith("/models/finetune-phi/versions/1")
    assert props["requestSettings"]["maxConcurrentRequestsPerInstance"] == 3
    assert props["requestSettings"]["requestTimeout"] == "PT3M"
    assert props["readinessProbe"]["initialDelay"] == "PT8M20S" and props["readinessProbe"]["failureThreshold"] == 30
    assert props["livenessProbe"]["period"] == "PT1M40S"


def test_a_deployment_poller_started_with_an_lro_is_stopped(rest_backend, azure) -> None:
    azure.lro["deployment"] = ["InProgress"]  # Azure answers 201 + Azure-AsyncOperation: the SDK starts polling
    rest_backend.ensure_endpoint()
    rest_backend.create_deployment("model-v1", _version("1"))
    assert _sdk_threads() == []
    assert rest_backend.wait_deployment_ready("model-v1", 600).state == "ready"


def test_the_quota_check_refuses_a_2_of_8_vcpu_shortfall(rest_backend, azure) -> None:
    azure.usage["standardESv3Family"] = (6, 8)  # 2 of 8 free; one E4s_v3 needs 4, with the 20% reserve 8
    rest_backend.ensure_endpoint()
    with pytest.raises(DeploymentFailedError, match=r"needs 8 vCPUs .* only 2 of 8 are available") as caught:
        rest_backend.create_deployment("model-v1", _version("1"))
    assert "Standard_E4s_v3" in str(caught.value) and "standardESv3Family" in str(caught.value)
    assert azure.sent("GET", r"/locations/eastus2/usages$") and not azure.sent("PUT", r"/deployments/")


def test_a_size_the_region_lacks_is_refused_before_any_deployment(rest_backend, azure) -> None:
    azure.sizes = [s for s in azure.sizes if s["name"] != "Standard_E4s_v3"]
    rest_backend.ensure_endpoint()
    with pytest.raises(DeploymentFailedError, match="Standard_E4s_v3 is not offered"):
        rest_backend.create_deployment("model-v1", _version("1"))


def test_a_failed_deployment_reports_its_container_log(rest_backend, azure) -> None:
    azure.deployment_states["model-v1"] = ["Failed"]
    rest_backend.ensure_endpoint()
    rest_backend.create_deployment("model-v1", _version("1"))
    with pytest.raises(DeploymentFailedError) as failed:
        rest_backend.wait_deployment_ready("model-v1", 600)
    assert "deployment model-v1 Failed" in str(failed.value) and "model load: out of memory" in str(failed.value)


def test_traffic_is_read_and_written_in_azures_shapes(rest_backend, azure, settings) -> None:
    name = settings.endpoint.name
    rest_backend.ensure_endpoint()
    for n in ("1", "2"):
        rest_backend.create_deployment(f"model-v{n}", _version(n))
        rest_backend.wait_deployment_ready(f"model-v{n}", 600)
    # The SDK strips zeros before the PUT and fills them in on a GET: neither shows in what the backend returns.
    assert rest_backend.set_traffic({"model-v1": 100, "model-v2": 0}) == {"model-v1": 100}
    assert azure.sent("PUT", rf"/onlineEndpoints/{name}$")[-1].body["properties"]["traffic"] == {"model-v1": 100}
    assert rest_backend.get_endpoint().traffic == {"model-v1": 100}
    assert rest_backend.set_mirror_traffic("model-v2", 10) == {"model-v2": 10}
    with pytest.raises(BackendError, match="takes live traffic"):
        rest_backend.set_mirror_traffic("model-v1", 10)
    assert rest_backend.set_traffic({"model-v1": 90, "model-v2": 10}) == {"model-v1": 90, "model-v2": 10}
    sent = azure.sent("PUT", rf"/onlineEndpoints/{name}$")[-1].body["properties"]
    assert sent["traffic"] == {"model-v1": 90, "model-v2": 10} and sent.get("mirrorTraffic", {}) == {}
    with pytest.raises(BackendError, match="still takes 10%"):
        rest_backend.delete_deployment("model-v2")
    rest_backend.set_traffic({"model-v1": 100})
    rest_backend.delete_deployment("model-v2")
    rest_backend.delete_deployment("model-v2")  # already gone: a no-op
    assert [d.name for d in rest_backend.get_endpoint().deployments] == ["model-v1"]


def test_a_failed_lro_is_one_sentence_with_azures_code_and_message(rest_backend, azure, settings) -> None:
    azure.lro["endpoint"] = ["InProgress", "Failed"]
    azure.lro_error = {"code": "InferencingClientCallFailed", "message": "The identity has no access to the ACR."}
    with pytest.raises(BackendError) as raised:
        rest_backend.ensure_endpoint()
    message = str(raised.value)
    assert message == (
        f"Azure ML could not create endpoint {settings.endpoint.name}: InferencingClientCallFailed: "
        "The identity has no access to the ACR."
    )
    assert not isinstance(raised.value, TransientBackendError) and "HTTP 200" not in message


def test_a_transient_lro_failure_restarts_the_operation(rest_backend, azure) -> None:
    azure.lro["endpoint"] = ["InProgress", "Failed"]
    azure.lro_error = {"code": "InternalServerError", "message": "try again"}
    with pytest.raises(RetriesExhaustedError, match="InternalServerError: try again"):
        rest_backend.ensure_endpoint()
    assert len(azure.sent("PUT", r"/onlineEndpoints/[^/]+$")) == rest_backend.settings.retry.attempts


def test_an_lro_that_never_ends_is_bounded_by_the_steps_timeout(rest_backend, azure, settings) -> None:
    settings.rollout.ready_timeout_s = 0.3  # shrunk: the SDK poller's wait is in real time
    azure.lro["endpoint"] = ["InProgress"]
    with pytest.raises(BackendError, match=r"within 0 s \(rollout.ready_timeout_s\)"):
        rest_backend.ensure_endpoint()


def test_keys_go_to_the_secret_store_never_to_the_log(rest_backend, azure, secrets, caplog) -> None:
    rest_backend.ensure_endpoint()
    with caplog.at_level(logging.DEBUG):
        assert rest_backend.scoring_key() == azure.endpoint_key
    assert secrets == {rest_backend.secret_block_name: azure.endpoint_key}
    assert azure.sent("POST", r"/listKeys$")
    assert azure.endpoint_key not in caplog.text


def test_an_invalid_endpoint_name_is_refused_before_any_request(settings, azure, clock, training_dir) -> None:
    from tasks.backends.azureml import AzureMLBackend
    from tests.azure_fake.client import StaticToken, fake_cloud

    bad = settings.model_copy(update={"endpoint": settings.endpoint.model_copy(update={"name": "ep"})})
    with fake_cloud(azure) as cloud:
        backend = AzureMLBackend(bad, credential=StaticToken(), cloud=cloud, sleep=clock.sleep, clock=clock)
        with pytest.raises(BackendError, match=r"endpoint\.name 'ep' is not a valid name for an endpoint: .* 3 to 32"):
            backend.ensure_endpoint()
        backend.close()
    assert azure.requests == []


def test_teardown_deletes_the_endpoint_with_its_deployments_and_the_compute(rest_backend, azure, settings, spec):
    rest_backend.submit_training(_remote(spec))
    rest_backend.ensure_endpoint()
    rest_backend.create_deployment("model-v1", _version("1"))
    plan = rest_backend.teardown_plan(include_compute=True)
    name = settings.endpoint.name
    assert plan == [("deployment", f"{name}/model-v1"), ("endpoint", name), ("compute", "gpu-a100-cluster")]
    rest_backend.teardown(plan)
    assert azure.sent("DELETE", rf"/onlineEndpoints/{name}$") and azure.sent("DELETE", r"/computes/gpu-a100-cluster$")
    assert not azure.sent("DELETE", r"/deployments/")  # they go with the endpoint
    assert azure.endpoints == {} and azure.computes == {}
    assert rest_backend.teardown_plan(include_compute=True) == []


def test_a_job_that_exited_2_is_not_resubmitted(rest_backend, azure, spec) -> None:
    azure.job_statuses = ["Queued", "Failed"]
    azure.job_error = {
        "code": "UserError",
        "message": "Execution failed. User process 'python' exited with status code 2. Please check log file.",
    }
    info = rest_backend.submit_training(_remote(spec))
    assert rest_backend.get_job(info.job_id).status == JobStatus.FAILED
    with pytest.raises(JobFailedError, match=r"usage error \(exit code 2\).*no new job is submitted"):
        rest_backend.submit_training(_remote(spec))
    assert len(azure.sent("PUT", r"/jobs/")) == 1


def test_a_job_that_failed_otherwise_gets_a_fresh_name(rest_backend, azure, spec) -> None:
    azure.job_statuses = ["Queued", "Failed"]
    first = rest_backend.submit_training(_remote(spec))
    rest_backend.get_job(first.job_id)
    azure.job_statuses = ["Queued", "Running"]
    second = rest_backend.submit_training(_remote(spec))
    assert second.job_id == f"{first.job_id}-2"


# ---------------------------------------------------------------------------------------------- data inputs


def test_local_data_inputs_are_uploaded_through_the_datastore_to_blob_storage(rest_backend, azure, spec) -> None:
    info = rest_backend.submit_training(spec)  # train/test.jsonl are local files
    assert azure.sent("GET", r"/datastores/workspaceblobstore$") and azure.sent("POST", r"/listSecrets$")
    uploads = {k: v for k, v in azure.blobs.items() if k.endswith(".jsonl")}
    assert sorted(Path(k).name for k in uploads) == ["test.jsonl", "train.jsonl"]
    assert all(k.startswith("azureml-blobstore-0000/LocalUpload/") for k in uploads)
    assert all(meta.get("upload_status") == "completed" for _, meta in uploads.values())  # confirmed, reusable
    (train,) = [data for k, (data, _) in uploads.items() if k.endswith("train.jsonl")]
    assert train == Path(spec.train_file).read_bytes()
    (put,) = azure.sent("PUT", rf"/jobs/{info.job_id}$")
    uri = put.body["properties"]["inputs"]["train_file"]["uri"]
    assert uri.startswith("azureml://datastores/workspaceblobstore/paths/LocalUpload/") and uri.endswith(
        "/train.jsonl"
    )


def test_a_fault_in_a_request_the_sdk_adds_is_named_in_the_message(rest_backend, azure, settings) -> None:
    """create_deployment's quota check lists VM sizes, for which the SDK first GETs the workspace."""
    rest_backend.ensure_endpoint()
    azure.fault("GET", rf"{azure.workspace_path}$", 503, times=settings.retry.attempts)
    with pytest.raises(RetriesExhaustedError, match=r"HTTP 503 to list VM sizes \(at GET my-aml-workspace\)"):
        rest_backend.create_deployment("model-v1", _version("1"))
