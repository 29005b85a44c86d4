"""A fake ``MLClient``: the operation groups the azureml backend uses, with scripted behaviour and a call log.

It keeps state the way the workspace would (jobs advance through scripted statuses on each ``get``, deployments
through provisioning states, the endpoint holds traffic) and refuses what Azure ML refuses (traffic not adding up to
100, deleting a deployment that takes traffic, mirroring to a deployment with live traffic). Errors are the SDK's real
exception types built on a real ``azure.core`` transport response, so the backend's error handling is exercised as
it would be against Azure. ``fail(op, *errors)`` makes the next calls of ``op`` (e.g. ``"jobs.get"``) raise.
"""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import requests
from azure.ai.ml.entities import Usage, VmSize
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.core.pipeline.transport import HttpRequest, RequestsTransportResponse

STUDIO = "https://ml.azure.com/runs/{name}?wsid=/subscriptions/0/resourcegroups/rg/workspaces/ws"


def azure_response(status: int, code: str = "Error", message: str = "scripted failure") -> RequestsTransportResponse:
    raw = requests.Response()
    raw.status_code = status
    raw.reason = {404: "Not Found", 429: "Too Many Requests", 503: "Service Unavailable"}.get(status, "Error")
    raw.headers["Content-Type"] = "application/json"
    raw._content = json.dumps({"error": {"code": code, "message": message}}).encode()
    return RequestsTransportResponse(HttpRequest("GET", "https://management.azure.com/fake"), raw)


def http_error(status: int, message: str = "scripted failure", code: str = "Error") -> HttpResponseError:
    return HttpResponseError(response=azure_response(status, code, message))


def not_found(what: str) -> ResourceNotFoundError:
    return ResourceNotFoundError(response=azure_response(404, "NotFound", f"{what} not found"))


class Poller:
    def __init__(self, result: Any = None) -> None:
        self._result = result

    def result(self, timeout: float | None = None) -> Any:
        return self._result

    def wait(self, timeout: float | None = None) -> None:
        return None

    def done(self) -> bool:  # the fake's operations finish at once
        return True


class _Ops:
    group = ""

    def __init__(self, client: FakeMLClient) -> None:
        self.c = client

    def _enter(self, method: str, *args: Any) -> None:
        op = f"{self.group}.{method}"
        self.c.calls.append((op, *args))
        queue = self.c.failures.get(op)
        if queue:
            raise queue.pop(0)


class Runs:
    def __init__(self, client: FakeMLClient) -> None:
        self.c = client

    def get_run_details(self, name: str) -> Any:
        self.c.calls.append(("runs.get_run_details", name))
        job = self.c.jobs.store.get(name)
        if job is None:
            raise not_found(f"run {name}")
        error = None
        if job.status == "Failed":
            error = SimpleNamespace(error=SimpleNamespace(code="UserError", message=self.c.job_error_message))
        return SimpleNamespace(status=job.status, error=error, log_files=dict(self.c.log_files.get(name, {})))


class Jobs(_Ops):
    group = "jobs"

    def __init__(self, client: FakeMLClient) -> None:
        super().__init__(client)
        self.store: dict[str, SimpleNamespace] = {}
        self.submitted: list[Any] = []  # the real Command entities the backend built
        self.scripts: dict[str, list[str]] = {}
        self._runs_operations = Runs(client)

    def create_or_update(self, job: Any, **kwargs: Any) -> Any:
        self._enter("create_or_update", job.name)
        if job.name in self.store:
            raise http_error(409, f"job {job.name} already exists", "UserError")
        self.submitted.append(job)
        script = list(self.c.job_statuses)
        self.scripts[job.name] = script
        self.store[job.name] = SimpleNamespace(
            name=job.name, status=script.pop(0), studio_url=STUDIO.format(name=job.name), tags=dict(job.tags or {})
        )
        return copy.copy(self.store[job.name])

    def get(self, name: str) -> Any:
        self._enter("get", name)
        job = self.store.get(name)
        if job is None:
            raise not_found(f"job {name}")
        result = copy.copy(job)
        script = self.scripts.get(name)
        if script:  # the next poll sees the next status
            job.status = script.pop(0)
        return result

    def begin_cancel(self, name: str, **kwargs: Any) -> Poller:
        self._enter("begin_cancel", name)
        job = self.store[name]
        job.status = "CancelRequested"
        self.scripts[name] = ["Canceled"]
        return Poller()

    def add(self, name: str, status: str, script: list[str] | None = None) -> None:
        self.store[name] = SimpleNamespace(name=name, status=status, studio_url=STUDIO.format(name=name), tags={})
        self.scripts[name] = list(script or [])


class Environments(_Ops):
    group = "environments"

    def __init__(self, client: FakeMLClient) -> None:
        super().__init__(client)
        self.store: dict[tuple[str, str], Any] = {}

    def get(self, name: str, version: str | None = None, label: str | None = None) -> Any:
        self._enter("get", name, version)
        if (name, version) not in self.store:
            raise not_found(f"environment {name}:{version}")
        return self.store[(name, version)]

    def create_or_update(self, environment: Any) -> Any:
        self._enter("create_or_update", environment.name, environment.version)
        self.store[(environment.name, environment.version)] = environment
        return environment


class Compute(_Ops):
    group = "compute"

    def __init__(self, client: FakeMLClient) -> None:
        super().__init__(client)
        self.store: dict[str, Any] = {}
        self.sizes = [
            VmSize(name="Standard_E4s_v3", family="standardESv3Family", v_cp_us=4),
            VmSize(name="Standard_NC24ads_A100_v4", family="StandardNCADSA100v4Family", v_cp_us=24, gpus=1),
        ]
        self.usage = {"standardESv3Family": (0, 100), "StandardNCADSA100v4Family": (0, 24)}

    def get(self, name: str) -> Any:
        self._enter("get", name)
        if name not in self.store:
            raise not_found(f"compute {name}")
        return self.store[name]

    def begin_create_or_update(self, compute: Any) -> Poller:
        self._enter("begin_create_or_update", compute.name)
        self.store[compute.name] = compute
        return Poller(compute)

    def begin_delete(self, name: str, **kwargs: Any) -> Poller:
        self._enter("begin_delete", name)
        self.store.pop(name, None)
        return Poller()

    def list_sizes(self, **kwargs: Any) -> list[Any]:
        self._enter("list_sizes")
        return list(self.sizes)

    def list_usage(self, **kwargs: Any) -> list[Any]:
        self._enter("list_usage")
        return [
            # What Usage._from_rest_object gives: ``name`` is the REST dict, not a UsageName.
            Usage(name={"value": family, "localizedValue": family}, current_value=used, limit=limit, unit="Count")
            for family, (used, limit) in self.usage.items()
        ]


class Models(_Ops):
    group = "models"

    def __init__(self, client: FakeMLClient) -> None:
        super().__init__(client)
        self.store: dict[str, dict[str, Any]] = defaultdict(dict)

    def create_or_update(self, model: Any) -> Any:
        self._enter("create_or_update", model.name, model.version)
        versions = self.store[model.name]
        model = copy.deepcopy(model)
        if model.version is None:
            model.version = str(max((int(v) for v in versions), default=0) + 1)
        elif str(model.version) in versions:  # an update may only change tags and description
            old = versions[str(model.version)]
            if old.path != model.path:
                raise http_error(400, "model versions are immutable except tags and description", "UserError")
        versions[str(model.version)] = model
        return copy.deepcopy(model)

    def list(self, name: str | None = None, **kwargs: Any) -> list[Any]:
        self._enter("list", name)
        return [copy.deepcopy(m) for m in self.store.get(name or "", {}).values()]

    def get(self, name: str, version: str | None = None, label: str | None = None) -> Any:
        self._enter("get", name, version)
        try:
            return copy.deepcopy(self.store[name][str(version)])
        except KeyError:
            raise not_found(f"model {name}:{version}") from None

    def download(self, name: str, version: str, download_path: str = ".") -> None:
        self._enter("download", name, version)
        # The layout of an MLflow transformers model saved from a folder: weights and tokenizer apart.
        folder = Path(download_path) / name / "mlflow_model"
        (folder / "model").mkdir(parents=True, exist_ok=True)
        (folder / "components" / "tokenizer").mkdir(parents=True, exist_ok=True)
        (folder / "MLmodel").write_text("flavors: {transformers: {}}\n")
        (folder / "model" / "config.json").write_text('{"model_type": "phi3"}')
        (folder / "components" / "tokenizer" / "tokenizer_config.json").write_text("{}")


class OnlineEndpoints(_Ops):
    group = "online_endpoints"

    def __init__(self, client: FakeMLClient) -> None:
        super().__init__(client)
        self.store: dict[str, SimpleNamespace] = {}
        self.created: list[Any] = []  # the real ManagedOnlineEndpoint entities the backend built

    def get(self, name: str, **kwargs: Any) -> Any:
        self._enter("get", name)
        if name not in self.store:
            raise not_found(f"endpoint {name}")
        return copy.deepcopy(self.store[name])

    def begin_create_or_update(self, endpoint: Any, **kwargs: Any) -> Poller:
        self._enter("begin_create_or_update", endpoint.name)
        deployments = self.c.online_deployments.store.get(endpoint.name, {})
        traffic = {k: int(v) for k, v in (endpoint.traffic or {}).items()}
        mirror = {k: int(v) for k, v in (getattr(endpoint, "mirror_traffic", None) or {}).items()}
        if sum(traffic.values()) not in (0, 100):
            raise http_error(400, f"traffic {traffic} must add up to 100", "BadArgument")
        if any(k not in deployments for k, v in {**traffic, **mirror}.items() if v > 0):
            raise http_error(400, "traffic names a deployment that does not exist", "BadArgument")
        if any(traffic.get(k, 0) > 0 for k in mirror):
            raise http_error(400, "a deployment cannot take live and mirror traffic", "BadArgument")
        if endpoint.name not in self.store:
            self.created.append(endpoint)
        self.store[endpoint.name] = SimpleNamespace(
            name=endpoint.name,
            auth_mode=endpoint.auth_mode,
            traffic=traffic,
            mirror_traffic=mirror,
            scoring_uri=f"{self.c.scoring_host or f'https://{endpoint.name}.eastus2.inference.ml.azure.com'}/score",
        )
        return Poller(copy.deepcopy(self.store[endpoint.name]))

    def begin_delete(self, name: str | None = None, **kwargs: Any) -> Poller:
        self._enter("begin_delete", name)
        self.store.pop(name, None)
        self.c.online_deployments.store.pop(name, None)
        return Poller()

    def get_keys(self, name: str) -> Any:
        self._enter("get_keys", name)
        return SimpleNamespace(primary_key=self.c.endpoint_key, secondary_key="secondary-" + self.c.endpoint_key)


class OnlineDeployments(_Ops):
    group = "online_deployments"

    def __init__(self, client: FakeMLClient) -> None:
        super().__init__(client)
        self.store: dict[str, dict[str, SimpleNamespace]] = defaultdict(dict)
        self.created: list[Any] = []  # the real ManagedOnlineDeployment entities
        self.scripts: dict[str, list[str]] = {}
        self.logs = "model load: out of memory"

    def begin_create_or_update(self, deployment: Any, **kwargs: Any) -> Poller:
        self._enter("begin_create_or_update", deployment.name)
        self.created.append(deployment)
        script = list(self.c.deployment_states.get(deployment.name, ["Creating", "Succeeded"]))
        self.scripts[deployment.name] = script
        self.store[deployment.endpoint_name][deployment.name] = SimpleNamespace(
            name=deployment.name,
            endpoint_name=deployment.endpoint_name,
            model=deployment.model,
            provisioning_state=script.pop(0),
        )
        return Poller()

    def add(self, endpoint: str, name: str, model: str, state: str = "Succeeded") -> None:
        self.store[endpoint][name] = SimpleNamespace(
            name=name, endpoint_name=endpoint, model=model, provisioning_state=state
        )

    def get(self, name: str, endpoint_name: str, **kwargs: Any) -> Any:
        self._enter("get", name, endpoint_name)
        found = self.store.get(endpoint_name, {}).get(name)
        if found is None:
            raise not_found(f"deployment {name}")
        result = copy.copy(found)
        script = self.scripts.get(name)
        if script:
            found.provisioning_state = script.pop(0)
        return result

    def list(self, endpoint_name: str, **kwargs: Any) -> list[Any]:
        self._enter("list", endpoint_name)
        return [copy.copy(d) for d in self.store.get(endpoint_name, {}).values()]

    def begin_delete(self, name: str, endpoint_name: str, **kwargs: Any) -> Poller:
        self._enter("begin_delete", name, endpoint_name)
        endpoint = self.c.online_endpoints.store.get(endpoint_name)
        if endpoint is not None and endpoint.traffic.get(name, 0) > 0:
            raise http_error(400, f"deployment {name} takes traffic; it cannot be deleted", "BadArgument")
        if name not in self.store.get(endpoint_name, {}):
            raise not_found(f"deployment {name}")
        del self.store[endpoint_name][name]
        if endpoint is not None:  # Azure ML drops a deleted deployment from the endpoint's traffic maps
            endpoint.traffic.pop(name, None)
            endpoint.mirror_traffic.pop(name, None)
        return Poller()

    def get_logs(self, name: str, endpoint_name: str, lines: int, **kwargs: Any) -> str:
        self._enter("get_logs", name, endpoint_name, lines)
        return self.logs


class Workspaces(_Ops):
    group = "workspaces"

    def get(self, name: str | None = None, **kwargs: Any) -> Any:
        self._enter("get", name)
        return SimpleNamespace(name=name, mlflow_tracking_uri=self.c.tracking_uri)


class FakeMLClient:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.failures: dict[str, list[Exception]] = defaultdict(list)
        self.job_statuses = ["Queued", "Running", "Completed"]
        self.job_error_message = "Execution failed: CUDA out of memory"
        self.deployment_states: dict[str, list[str]] = {}
        self.log_files: dict[str, dict[str, str]] = {}
        self.endpoint_key = "fake-key-0123456789abcdef"
        self.tracking_uri: str | None = None
        self.scoring_host: str | None = None  # where the endpoint's routes answer (a loopback server in tests)
        self.jobs = Jobs(self)
        self.environments = Environments(self)
        self.compute = Compute(self)
        self.models = Models(self)
        self.online_endpoints = OnlineEndpoints(self)
        self.online_deployments = OnlineDeployments(self)
        self.workspaces = Workspaces(self)

    def fail(self, op: str, *errors: Exception) -> None:
        self.failures[op].extend(errors)

    def called(self, op: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == op]
