"""Azure Machine Learning's REST API on loopback HTTPS, for the real ``azure-ai-ml`` client.

A stateful server on 127.0.0.1 answering the routes azure-ai-ml 1.23.1 sends for what the ``azureml`` backend does
(the routes and payload shapes read from the SDK's generated REST clients):

- ARM: the workspace, environment and code versions, computes, jobs (create, get, cancel), models and versions,
  online endpoints (create, get, delete, keys, token) and their deployments (create, get, list, delete, logs),
  usages and VM sizes of the region, a user-assigned identity, and the status URLs of long-running operations.
- The workspace's discovery document and run history (``runs/{id}/details``, with log file URLs).
- The log files (honouring ``Range``) and each endpoint's scoring routes (``/score`` and
  ``/v1/chat/completions``, keyed like a managed endpoint).
- Azure Monitor's metrics route on an endpoint's resource id (``{id}/providers/Microsoft.Insights/metrics``, for
  azure-monitor-query's ``MetricsQueryClient``): the numbers the test scripts in :meth:`AzureMLFake.metrics_of`
  (:mod:`tests.azure_fake.monitor`); a resource id that is no endpoint of the workspace answers 404 like ARM.

State moves like Azure's: a job goes through its scripted statuses one GET at a time (Queued, Running, Completed by
default), a deployment through its provisioning states (Creating, then Succeeded or Failed), an endpoint keeps the
traffic maps it was sent (the SDK itself fills zeros on read and strips them on write). A PUT or DELETE answers
synchronously unless :attr:`AzureMLFake.lro` names the resource kind: then it answers 201/202 with an
``Azure-AsyncOperation`` URL whose status goes InProgress, then Succeeded or Failed with Azure's error body.

:meth:`AzureMLFake.fault` scripts failures per method and path (status, body, ``Retry-After``, delay);
:attr:`AzureMLFake.requests` logs every request with its JSON body.
"""

from __future__ import annotations

import copy
import datetime
import json
import re
import ssl
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.azure_fake.monitor import EndpointMetrics, metrics_answer
from tests.azure_fake.tls import self_signed_certificate

SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
# Blob storage answers on https://<account>.blob.<STORAGE_DOMAIN>:<port>: a host name (the SDK builds the account URL
# from the datastore's account name), which tests resolve to 127.0.0.1 (:func:`tests.azure_fake.client.fake_cloud`).
STORAGE_DOMAIN = "fake.core.windows.net"
STORAGE_ACCOUNT = "fakestorage"
BLOB_CONTAINER = "azureml-blobstore-0000"
PROVIDER = "Microsoft.MachineLearningServices"
DEFAULT_SIZES = [
    {"name": "Standard_E4s_v3", "family": "standardESv3Family", "vCPUs": 4, "gpus": 0, "memoryGB": 32.0},
    {"name": "Standard_DS3_v2", "family": "standardDSv2Family", "vCPUs": 4, "gpus": 0, "memoryGB": 14.0},
    {"name": "Standard_NC24ads_A100_v4", "family": "StandardNCADSA100v4Family", "vCPUs": 24, "gpus": 1},
]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _system_data() -> dict[str, str]:
    stamp = _now()
    return {"createdAt": stamp, "createdBy": "fake", "lastModifiedAt": stamp, "lastModifiedBy": "fake"}


@dataclass
class Fault:
    """The next ``times`` requests matching ``method`` and the ``path`` regex (searched in the path) fail."""

    method: str
    path: str
    status: int = 503
    body: Any = None
    retry_after: int | None = None
    delay_s: float = 0.0
    times: int = 1


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes = b""


class AzureError(Exception):
    """An error answer: HTTP status and Azure's ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class AzureMLFake:
    """One workspace (``sub``/``rg``/``ws`` in ``location``) served on ``https://127.0.0.1:<port>``."""

    def __init__(
        self,
        *,
        subscription: str = SUBSCRIPTION,
        resource_group: str = "rg",
        workspace: str = "ws",
        location: str = "eastus2",
    ) -> None:
        self.subscription, self.resource_group, self.workspace, self.location = (
            subscription,
            resource_group,
            workspace,
            location,
        )
        self.lock = threading.RLock()
        self.requests: list[Request] = []
        self.faults: list[Fault] = []
        self.workspace_exists = True
        self.environments: dict[tuple[str, str], dict[str, Any]] = {}
        self.codes: dict[tuple[str, str], dict[str, Any]] = {}
        self.code_snapshots_exist = True  # the job's code folder was uploaded before (found by its content hash)
        self.computes: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.job_statuses = ["Queued", "Running", "Completed"]  # what each new job goes through, one GET each
        self.job_scripts: dict[str, list[str]] = {}
        self.job_error = {"code": "UserError", "message": "Execution failed: CUDA out of memory"}
        self.log_files: dict[str, dict[str, str]] = {}  # job -> {file name: text}
        self.models: dict[str, dict[str, dict[str, Any]]] = {}
        self.endpoints: dict[str, dict[str, Any]] = {}
        self.deployments: dict[str, dict[str, dict[str, Any]]] = {}
        self.deployment_states: dict[str, list[str]] = {}  # deployment -> states after Creating (default Succeeded)
        self.deployment_scripts: dict[tuple[str, str], list[str]] = {}
        self.deployment_logs = "model load: out of memory"
        self.deployment_error = {"code": "ResourceNotReady", "message": "User container has crashed or terminated."}
        self.sizes = copy.deepcopy(DEFAULT_SIZES)
        self.usage = {
            "standardESv3Family": (0, 100),
            "standardDSv2Family": (0, 100),
            "StandardNCADSA100v4Family": (0, 24),
        }
        self.blobs: dict[str, tuple[bytes, dict[str, str]]] = {}  # "container/path" -> (content, metadata)
        self.identities: set[str] = set()  # resource ids of user-assigned identities that exist
        self.endpoint_key = "fake-key-0123456789abcdef"
        self.broken: set[str] = set()  # deployments whose scoring route fails (424) or never stops generating
        self.scored: list[tuple[str, str, Any]] = []  # (route, deployment, body) of each scoring request
        self.lro: dict[str, list[str]] = {}  # kind -> operation statuses, e.g. {"endpoint": ["InProgress", "Failed"]}
        self.lro_error = {"code": "BadArgument", "message": "The operation failed."}
        self.monitor: dict[str, EndpointMetrics] = {}  # endpoint -> what Azure Monitor answers for it
        self._operations: dict[str, dict[str, Any]] = {}
        self._folder = Path(tempfile.mkdtemp(prefix="azure-fake-"))
        self.cert_path, key_path = self_signed_certificate(self._folder, (f"{STORAGE_ACCOUNT}.blob.{STORAGE_DOMAIN}",))
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.fake = self  # type: ignore[attr-defined]
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_path, key_path)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, name="azure-fake", daemon=True)

    # --------------------------------------------------------------------------------------------- lifecycle
    @property
    def port(self) -> int:
        return self._server.server_port

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self._server.server_port}"

    @property
    def workspace_path(self) -> str:
        return (
            f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}/providers/{PROVIDER}"
            f"/workspaces/{self.workspace}"
        )

    def start(self) -> AzureMLFake:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    # --------------------------------------------------------------------------------------------- scripting
    def fault(
        self,
        method: str,
        path: str,
        status: int = 503,
        *,
        times: int = 1,
        body: Any = None,
        retry_after: int | None = None,
        delay_s: float = 0.0,
    ) -> None:
        with self.lock:
            self.faults.append(Fault(method.upper(), path, status, body, retry_after, delay_s, times))

    def sent(self, method: str, path: str) -> list[Request]:
        """Requests of ``method`` whose path matches the regex ``path`` (searched), in order."""
        with self.lock:
            return [r for r in self.requests if r.method == method.upper() and re.search(path, r.path)]

    def add_identity(self, name: str = "finetune-phi-id") -> str:
        resource_id = (
            f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}/providers/"
            f"Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
        )
        self.identities.add(resource_id.lower())
        return resource_id

    def add_endpoint(self, name: str, tags: dict[str, str] | None = None) -> None:
        """An endpoint made outside the backend (by someone else, when its tags say so)."""
        props = {"authMode": "Key", "properties": {}, "traffic": {}, "mirrorTraffic": {}}
        props.update(provisioningState="Succeeded", scoringUri=self.scoring_uri(name))
        with self.lock:
            self.endpoints[name] = self._resource(
                self._arm_id("onlineEndpoints", name), name, "onlineEndpoints", props,
                location=self.location, kind="Managed", tags=dict(tags or {}), identity=None,
            )  # fmt: skip
            self.deployments.setdefault(name, {})

    def metrics_of(self, endpoint: str) -> EndpointMetrics:
        """What Azure Monitor answers for ``endpoint``'s metrics (the test fills it in)."""
        with self.lock:
            return self.monitor.setdefault(endpoint, EndpointMetrics())

    def add_job(self, name: str, status: str, script: list[str] | None = None) -> None:
        with self.lock:
            self.jobs[name] = self._job_resource(name, {"jobType": "Command", "status": status, "tags": {}})
            self.job_scripts[name] = list(script or [])

    # --------------------------------------------------------------------------------------------- dispatch
    def handle(self, method: str, raw_path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any, dict]:
        split = urlsplit(raw_path)
        path = split.path
        query = {k: v[0] for k, v in parse_qs(split.query).items()}
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            payload = body
        with self.lock:
            self.requests.append(Request(method, path, query, payload, headers, body))
            fault = next((f for f in self.faults if f.method == method and re.search(f.path, path) and f.times), None)
            if fault is not None:
                fault.times -= 1
        if fault is not None:
            if fault.delay_s:
                time.sleep(fault.delay_s)
            extra = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
            answer = fault.body or {"error": {"code": "ServiceUnavailable", "message": "scripted fault"}}
            return fault.status, answer, extra
        try:
            with self.lock:
                return self._route(self.requests[-1])
        except AzureError as exc:
            return exc.status, {"error": {"code": exc.code, "message": exc.message}}, {}
        except Exception as exc:  # a bug in the fake: say so in the answer rather than drop the connection
            import traceback

            traceback.print_exc()
            return 500, {"error": {"code": "FakeServerBug", "message": f"{type(exc).__name__}: {exc}"}}, {}

    def _route(self, request: Request) -> tuple[int, Any, dict]:
        method, path = request.method, request.path
        if f".blob.{STORAGE_DOMAIN}" in request.headers.get("host", ""):
            return self._blob(request)
        ws = re.escape(self.workspace_path)
        sub = re.escape(f"/subscriptions/{self.subscription}")
        routes: list[tuple[str, str, Any]] = [
            ("GET", rf"{ws}", self._workspace),
            ("GET", r"/discovery", lambda _: (200, {"api": self.base_url, "history": self.base_url}, {})),
            ("GET", rf"/history/v1\.0{ws}/runs/(?P<job>[^/]+)/details", self._run_details),
            ("GET", rf"{ws}/environments/(?P<name>[^/]+)/versions/(?P<version>[^/]+)", self._get_environment),
            ("PUT", rf"{ws}/environments/(?P<name>[^/]+)/versions/(?P<version>[^/]+)", self._put_environment),
            ("GET", rf"{ws}/codes/(?P<name>[^/]+)/versions", self._list_codes),
            ("GET", rf"{ws}/codes/(?P<name>[^/]+)/versions/(?P<version>[^/]+)", self._get_code),
            ("PUT", rf"{ws}/codes/(?P<name>[^/]+)/versions/(?P<version>[^/]+)", self._put_code),
            ("GET", rf"{ws}/datastores/(?P<name>[^/]+)", self._datastore),
            ("POST", rf"{ws}/datastores/(?P<name>[^/]+)/listSecrets", self._datastore_secrets),
            ("GET", rf"{ws}/computes/(?P<name>[^/]+)", self._get_compute),
            ("PUT", rf"{ws}/computes/(?P<name>[^/]+)", self._put_compute),
            ("DELETE", rf"{ws}/computes/(?P<name>[^/]+)", self._delete_compute),
            ("GET", rf"{sub}/providers/{PROVIDER}/locations/(?P<loc>[^/]+)/vmSizes", self._vm_sizes),
            ("GET", rf"{sub}/providers/{PROVIDER}/locations/(?P<loc>[^/]+)/usages", self._usages),
            ("GET", rf"{ws}/jobs/(?P<name>[^/]+)", self._get_job),
            ("PUT", rf"{ws}/jobs/(?P<name>[^/]+)", self._put_job),
            ("POST", rf"{ws}/jobs/(?P<name>[^/]+)/cancel", self._cancel_job),
            ("GET", rf"{ws}/models/(?P<name>[^/]+)", self._get_model_container),
            ("PUT", rf"{ws}/models/(?P<name>[^/]+)", self._put_model_container),
            ("GET", rf"{ws}/models/(?P<name>[^/]+)/versions", self._list_models),
            ("GET", rf"{ws}/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)", self._get_model),
            ("PUT", rf"{ws}/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)", self._put_model),
            ("GET", rf"{ws}/onlineEndpoints/(?P<name>[^/]+)", self._get_endpoint),
            ("PUT", rf"{ws}/onlineEndpoints/(?P<name>[^/]+)", self._put_endpoint),
            ("DELETE", rf"{ws}/onlineEndpoints/(?P<name>[^/]+)", self._delete_endpoint),
            ("POST", rf"{ws}/onlineEndpoints/(?P<name>[^/]+)/listKeys", self._list_keys),
            ("POST", rf"{ws}/onlineEndpoints/(?P<name>[^/]+)/token", self._token),
            ("GET", rf"{ws}/onlineEndpoints/(?P<ep>[^/]+)/deployments", self._list_deployments),
            ("GET", rf"{ws}/onlineEndpoints/(?P<ep>[^/]+)/deployments/(?P<name>[^/]+)", self._get_deployment),
            ("PUT", rf"{ws}/onlineEndpoints/(?P<ep>[^/]+)/deployments/(?P<name>[^/]+)", self._put_deployment),
            ("DELETE", rf"{ws}/onlineEndpoints/(?P<ep>[^/]+)/deployments/(?P<name>[^/]+)", self._delete_deployment),
            ("POST", rf"{ws}/onlineEndpoints/(?P<ep>[^/]+)/deployments/(?P<name>[^/]+)/getLogs", self._logs),
            ("GET", r"/operations/(?P<op>[^/]+)", self._operation),
            (
                "GET",
                rf"{sub}/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.ManagedIdentity/"
                r"userAssignedIdentities/(?P<name>[^/]+)",
                self._identity,
            ),
            ("GET", r"(?P<resource>/subscriptions/.+)/providers/Microsoft\.Insights/metrics", self._metrics),
            ("GET", r"/logs/(?P<job>[^/]+)/(?P<file>.+)", self._log_file),
            ("POST", r"/endpoints/(?P<ep>[^/]+)/(?P<route>score|v1/chat/completions)", self._score),
        ]
        for verb, pattern, handler in routes:
            match = re.fullmatch(pattern, path, flags=re.IGNORECASE)
            if verb == method and match:
                return handler(request, **match.groupdict())
        raise AzureError(404, "NotFound", f"no route for {method} {path}")

    # --------------------------------------------------------------------------------------------- helpers
    def _arm_id(self, *parts: str) -> str:
        return "/".join([self.workspace_path, *parts])

    def _resource(self, rid: str, name: str, rtype: str, properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {
            "id": rid,
            "name": name,
            "type": f"{PROVIDER}/workspaces/{rtype}",
            "properties": properties,
            "systemData": _system_data(),
            **extra,
        }

    def _long_running(self, kind: str, resource: dict[str, Any], status: int = 200) -> tuple[int, Any, dict]:
        """A PUT/DELETE's answer: synchronous, or 201/202 with a status URL when ``lro`` names the kind."""
        script = self.lro.get(kind)
        if not script:
            return status, resource, {}
        op = uuid.uuid4().hex
        self._operations[op] = {"script": list(script), "resource": resource}
        url = f"{self.base_url}/operations/{op}"
        answer = 201 if resource is not None else 202
        return answer, resource, {"Azure-AsyncOperation": url, "Location": url, "Retry-After": "1"}

    def _operation(self, req: Request, op: str) -> tuple[int, Any, dict]:
        entry = self._operations.get(op)
        if entry is None:
            raise AzureError(404, "NotFound", f"operation {op} not found")
        script = entry["script"]
        status = script.pop(0) if len(script) > 1 else script[0]
        body: dict[str, Any] = {"id": op, "name": op, "status": status}
        if status == "Failed":
            body["error"] = dict(self.lro_error)
        return 200, body, {"Retry-After": "1"} if status == "InProgress" else {}

    # --------------------------------------------------------------------------------------------- workspace
    def _workspace(self, req: Request) -> tuple[int, Any, dict]:
        if not self.workspace_exists:
            raise AzureError(404, "ResourceNotFound", f"workspace {self.workspace} not found")
        props = {
            "discoveryUrl": f"{self.base_url}/discovery",
            "mlFlowTrackingUri": f"azureml://{self.location}.api.azureml.ms/mlflow/v1.0{self.workspace_path}",
            "friendlyName": self.workspace,
            "storageAccount": f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}/providers/"
            "Microsoft.Storage/storageAccounts/fakestorage",
        }
        rid = self.workspace_path
        return (
            200,
            {
                "id": rid,
                "name": self.workspace,
                "type": f"{PROVIDER}/workspaces",
                "location": self.location,
                "properties": props,
                "systemData": _system_data(),
            },
            {},
        )

    def _vm_sizes(self, req: Request, loc: str) -> tuple[int, Any, dict]:
        if loc.lower() != self.location.lower():
            return 200, {"value": []}, {}
        return 200, {"value": copy.deepcopy(self.sizes)}, {}

    def _usages(self, req: Request, loc: str) -> tuple[int, Any, dict]:
        base = f"/subscriptions/{self.subscription}/providers/{PROVIDER}/locations/{loc}/usages"
        value = [
            {
                "id": f"{base}/{family}",
                "amlWorkspaceLocation": loc,
                "type": f"{PROVIDER}/totalCores/usages",
                "unit": "Count",
                "currentValue": used,
                "limit": limit,
                "name": {"value": family, "localizedValue": f"{family} vCPUs"},
            }
            for family, (used, limit) in self.usage.items()
        ]
        return 200, {"value": value}, {}

    def _identity(self, req: Request, rg: str, name: str) -> tuple[int, Any, dict]:
        rid = (
            f"/subscriptions/{self.subscription}/resourceGroups/{rg}/providers/"
            f"Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
        )
        if rid.lower() not in self.identities:
            raise AzureError(
                404, "ResourceNotFound", f"The Resource '{name}' under resource group '{rg}' was not found"
            )
        props = {"clientId": str(uuid.uuid5(uuid.NAMESPACE_URL, rid)), "principalId": str(uuid.uuid4())}
        return 200, {"id": rid, "name": name, "location": self.location, "properties": props}, {}

    # --------------------------------------------------------------------------------------------- assets
    def _get_environment(self, req: Request, name: str, version: str) -> tuple[int, Any, dict]:
        found = self.environments.get((name, version))
        if found is None:
            raise AzureError(404, "UserError", f"environment {name}:{version} not found")
        return 200, found, {}

    def _put_environment(self, req: Request, name: str, version: str) -> tuple[int, Any, dict]:
        resource = self._resource(
            self._arm_id("environments", name, "versions", version),
            version,
            "environments",
            dict(req.body.get("properties", {})),
        )
        self.environments[(name, version)] = resource
        return 200, resource, {}

    def _list_codes(self, req: Request, name: str) -> tuple[int, Any, dict]:
        wanted = req.query.get("hash")
        if (
            wanted
            and self.code_snapshots_exist
            and not any(c["properties"].get("codeHash") == wanted for (n, _), c in self.codes.items() if n == name)
        ):  # a snapshot with this content hash was uploaded by an earlier run: the SDK skips the upload
            uri = f"https://fakestorage.blob.fake.core.windows.net/azureml-blobstore/LocalUpload/{wanted}/training"
            self.codes[(name, "1")] = self._resource(
                self._arm_id("codes", name, "versions", "1"),
                "1",
                "codes",
                {"codeUri": uri, "codeHash": wanted, "isAnonymous": True},
            )
        value = [c for (n, _), c in self.codes.items() if n == name and c["properties"].get("codeHash") == wanted]
        return 200, {"value": value}, {}

    def _get_code(self, req: Request, name: str, version: str) -> tuple[int, Any, dict]:
        found = self.codes.get((name, version))
        if found is None:
            raise AzureError(404, "UserError", f"code {name}:{version} not found")
        return 200, found, {}

    def _put_code(self, req: Request, name: str, version: str) -> tuple[int, Any, dict]:
        resource = self._resource(
            self._arm_id("codes", name, "versions", version), version, "codes", dict(req.body.get("properties", {}))
        )
        self.codes[(name, version)] = resource
        return 200, resource, {}

    def _datastore(self, req: Request, name: str) -> tuple[int, Any, dict]:
        if name != "workspaceblobstore":
            raise AzureError(404, "UserError", f"datastore {name} not found")
        props = {
            "datastoreType": "AzureBlob",
            "accountName": STORAGE_ACCOUNT,
            "containerName": BLOB_CONTAINER,
            "endpoint": STORAGE_DOMAIN,
            "protocol": "https",
            "credentials": {"credentialsType": "AccountKey"},
            "isDefault": True,
        }
        return 200, self._resource(self._arm_id("datastores", name), name, "datastores", props), {}

    def _datastore_secrets(self, req: Request, name: str) -> tuple[int, Any, dict]:
        return 200, {"secretsType": "Sas", "sasToken": "sv=2021-08-06&ss=b&sig=fake"}, {}

    def _blob(self, req: Request) -> tuple[int, Any, dict]:
        """Enough of the Blob service for the SDK's upload: HEAD (properties, with metadata), PUT (a block blob),
        PUT ?comp=metadata; errors carry ``x-ms-error-code`` as Azure Storage's do."""
        key = req.path.lstrip("/")
        comp = req.query.get("comp")
        stamp = "Tue, 01 Dec 2026 00:00:00 GMT"
        if req.method in ("GET", "HEAD"):
            if key not in self.blobs:
                return 404, b"", {"x-ms-error-code": "BlobNotFound"}
            data, metadata = self.blobs[key]
            headers = {"x-ms-blob-type": "BlockBlob", "Last-Modified": stamp, "ETag": '"0x1"'}
            headers.update({f"x-ms-meta-{k}": v for k, v in metadata.items()})
            return 200, data if req.method == "GET" else b"", headers
        if req.method == "PUT" and comp == "metadata":
            if key not in self.blobs:
                return 404, b"", {"x-ms-error-code": "BlobNotFound"}
            metadata = {k[len("x-ms-meta-") :]: v for k, v in req.headers.items() if k.startswith("x-ms-meta-")}
            self.blobs[key] = (self.blobs[key][0], metadata)
            return 200, b"", {"ETag": '"0x2"', "Last-Modified": stamp}
        if req.method == "PUT" and comp is None:
            data = req.body if isinstance(req.body, bytes) else json.dumps(req.body).encode() if req.body else b""
            self.blobs[key] = (req.raw or data, {})
            return 201, b"", {"ETag": '"0x1"', "Last-Modified": stamp, "x-ms-request-server-encrypted": "true"}
        return 400, b"", {"x-ms-error-code": "UnsupportedHttpVerb"}

    def _get_compute(self, req: Request, name: str) -> tuple[int, Any, dict]:
        found = self.computes.get(name)
        if found is None:
            raise AzureError(404, "NotFound", f"compute {name} not found")
        return 200, found, {}

    def _put_compute(self, req: Request, name: str) -> tuple[int, Any, dict]:
        props = copy.deepcopy(req.body.get("properties", {}))
        props["provisioningState"] = "Succeeded"
        resource = self._resource(
            self._arm_id("computes", name),
            name,
            "computes",
            props,
            location=req.body.get("location", self.location),
            tags=req.body.get("tags"),
        )
        self.computes[name] = resource
        return self._long_running("compute", resource)

    def _delete_compute(self, req: Request, name: str) -> tuple[int, Any, dict]:
        if self.computes.pop(name, None) is None:
            return 204, None, {}
        return self._long_running("compute", None, 200)

    # --------------------------------------------------------------------------------------------- jobs
    def _job_resource(self, name: str, props: dict[str, Any]) -> dict[str, Any]:
        studio = f"https://ml.azure.com/runs/{name}?wsid={self.workspace_path}"
        props = {**props, "services": {"Studio": {"endpoint": studio, "jobServiceType": "Studio"}}}
        return self._resource(self._arm_id("jobs", name), name, "jobs", props)

    def _get_job(self, req: Request, name: str) -> tuple[int, Any, dict]:
        job = self.jobs.get(name)
        if job is None:
            raise AzureError(404, "UserError", f"job {name} not found")
        answer = copy.deepcopy(job)
        script = self.job_scripts.get(name)
        if script:  # the next GET sees the next status
            job["properties"]["status"] = script.pop(0)
        return 200, answer, {}

    def _put_job(self, req: Request, name: str) -> tuple[int, Any, dict]:
        if name in self.jobs:
            raise AzureError(409, "UserError", f"job {name} already exists")
        script = list(self.job_statuses)
        props = {**copy.deepcopy(req.body["properties"]), "status": script.pop(0)}
        self.jobs[name] = self._job_resource(name, props)
        answer = copy.deepcopy(self.jobs[name])
        if script:  # the first GET after the submit sees the next status
            self.jobs[name]["properties"]["status"] = script.pop(0)
        self.job_scripts[name] = script
        return 201, answer, {}

    def _cancel_job(self, req: Request, name: str) -> tuple[int, Any, dict]:
        job = self.jobs.get(name)
        if job is None:
            raise AzureError(404, "UserError", f"job {name} not found")
        job["properties"]["status"] = "CancelRequested"
        self.job_scripts[name] = ["Canceled"]
        return 200, None, {}

    def _run_details(self, req: Request, job: str) -> tuple[int, Any, dict]:
        found = self.jobs.get(job)
        if found is None:
            raise AzureError(404, "UserError", f"run {job} not found")
        status = found["properties"]["status"]
        files = {f: f"{self.base_url}/logs/{job}/{f}" for f in self.log_files.get(job, {})}
        details: dict[str, Any] = {"runId": job, "status": status, "logFiles": files}
        if status == "Failed":
            details["error"] = {"error": dict(self.job_error)}
        return 200, details, {}

    def _log_file(self, req: Request, job: str, file: str) -> tuple[int, Any, dict]:
        text = self.log_files.get(job, {}).get(file)
        if text is None:
            raise AzureError(404, "BlobNotFound", "The specified blob does not exist.")
        data = text.encode()
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", req.headers.get("range") or "")
        if match is None:
            return 200, data, {}
        if match.group(1):
            start = int(match.group(1))
            if start >= len(data):
                return 416, b"", {}
            return 206, data[start:], {}
        return 206, data[-int(match.group(2)) :], {}

    # --------------------------------------------------------------------------------------------- models
    def _get_model_container(self, req: Request, name: str) -> tuple[int, Any, dict]:
        if name not in self.models:
            raise AzureError(404, "UserError", f"model {name} not found")
        latest = self._latest(name)
        props = {"latestVersion": latest, "nextVersion": str(int(latest or 0) + 1)}
        return 200, self._resource(self._arm_id("models", name), name, "models", props), {}

    def _put_model_container(self, req: Request, name: str) -> tuple[int, Any, dict]:
        self.models.setdefault(name, {})
        return (
            200,
            self._resource(self._arm_id("models", name), name, "models", dict(req.body.get("properties", {}))),
            {},
        )

    def _latest(self, name: str) -> str | None:
        versions = [int(v) for v in self.models.get(name, {}) if v.isdigit()]
        return str(max(versions)) if versions else None

    def _list_models(self, req: Request, name: str) -> tuple[int, Any, dict]:
        return 200, {"value": [copy.deepcopy(m) for m in self.models.get(name, {}).values()]}, {}

    def _get_model(self, req: Request, name: str, version: str) -> tuple[int, Any, dict]:
        found = self.models.get(name, {}).get(version)
        if found is None:
            raise AzureError(404, "UserError", f"model {name}:{version} not found")
        return 200, copy.deepcopy(found), {}

    def _put_model(self, req: Request, name: str, version: str) -> tuple[int, Any, dict]:
        props = copy.deepcopy(req.body.get("properties", {}))
        old = self.models.get(name, {}).get(version)
        if old is not None and old["properties"].get("modelUri") != props.get("modelUri"):
            raise AzureError(400, "UserError", "model versions are immutable except tags and description")
        props.setdefault("flavors", {"python_function": {"data": {"loader_module": "mlflow.transformers"}}})
        resource = self._resource(self._arm_id("models", name, "versions", version), version, "versions", props)
        self.models.setdefault(name, {})[version] = resource
        return 200, copy.deepcopy(resource), {}

    # --------------------------------------------------------------------------------------------- endpoints
    def scoring_uri(self, endpoint: str) -> str:
        return f"{self.base_url}/endpoints/{endpoint}/score"

    def _get_endpoint(self, req: Request, name: str) -> tuple[int, Any, dict]:
        found = self.endpoints.get(name)
        if found is None:
            raise AzureError(404, "UserError", f"online endpoint {name} not found")
        return 200, copy.deepcopy(found), {}

    def _put_endpoint(self, req: Request, name: str) -> tuple[int, Any, dict]:
        if not re.fullmatch(r"[a-zA-Z][a-zA-Z0-9-]{1,30}[a-zA-Z0-9]", name):
            raise AzureError(400, "BadArgument", f"endpoint name {name} is invalid")
        props = copy.deepcopy(req.body.get("properties", {}))
        deployments = self.deployments.get(name, {})
        traffic = {k: int(v) for k, v in (props.get("traffic") or {}).items()}
        mirror = {k: int(v) for k, v in (props.get("mirrorTraffic") or {}).items()}
        if traffic and sum(traffic.values()) not in (0, 100):
            raise AzureError(400, "BadArgument", f"traffic {traffic} must add up to 100")
        missing = sorted(k for k in {**traffic, **mirror} if k not in deployments)
        if missing:
            raise AzureError(400, "BadArgument", f"traffic names deployments that do not exist: {missing}")
        if any(traffic.get(k, 0) > 0 for k in mirror):
            raise AzureError(400, "BadArgument", "a deployment cannot take live and mirror traffic at once")
        identity = req.body.get("identity")
        if identity and identity.get("userAssignedIdentities"):
            for rid in identity["userAssignedIdentities"]:
                if rid.lower() not in self.identities:
                    raise AzureError(400, "BadArgument", f"user-assigned identity {rid} does not exist")
            identity = {
                "type": identity.get("type", "UserAssigned"),
                "userAssignedIdentities": {
                    rid: {"principalId": str(uuid.uuid4()), "clientId": str(uuid.uuid4())}
                    for rid in identity["userAssignedIdentities"]
                },
            }
        props.update(
            traffic=traffic,
            mirrorTraffic=mirror,
            provisioningState="Succeeded",
            scoringUri=self.scoring_uri(name),
            swaggerUri=f"{self.base_url}/endpoints/{name}/swagger.json",
        )
        resource = self._resource(
            self._arm_id("onlineEndpoints", name),
            name,
            "onlineEndpoints",
            props,
            location=req.body.get("location", self.location),
            kind="Managed",
            tags=req.body.get("tags") or {},
            identity=identity,
        )
        self.endpoints[name] = resource
        self.deployments.setdefault(name, {})
        return self._long_running("endpoint", copy.deepcopy(resource))

    def _delete_endpoint(self, req: Request, name: str) -> tuple[int, Any, dict]:
        if self.endpoints.pop(name, None) is None:
            return 204, None, {}
        self.deployments.pop(name, None)
        return self._long_running("endpoint", None, 200)

    def _list_keys(self, req: Request, name: str) -> tuple[int, Any, dict]:
        if name not in self.endpoints:
            raise AzureError(404, "UserError", f"online endpoint {name} not found")
        return 200, {"primaryKey": self.endpoint_key, "secondaryKey": "secondary-" + self.endpoint_key}, {}

    def _token(self, req: Request, name: str) -> tuple[int, Any, dict]:
        if name not in self.endpoints:
            raise AzureError(404, "UserError", f"online endpoint {name} not found")
        return 200, {"accessToken": self.endpoint_key, "tokenType": "Bearer", "expiryTimeUtc": 2**31}, {}

    def _endpoint_of(self, ep: str) -> dict[str, dict[str, Any]]:
        if ep not in self.endpoints:
            raise AzureError(404, "UserError", f"online endpoint {ep} not found")
        return self.deployments.setdefault(ep, {})

    def _list_deployments(self, req: Request, ep: str) -> tuple[int, Any, dict]:
        return 200, {"value": [copy.deepcopy(d) for d in self._endpoint_of(ep).values()]}, {}

    def _get_deployment(self, req: Request, ep: str, name: str) -> tuple[int, Any, dict]:
        found = self._endpoint_of(ep).get(name)
        if found is None:
            raise AzureError(404, "UserError", f"deployment {name} not found")
        answer = copy.deepcopy(found)
        script = self.deployment_scripts.get((ep, name))
        if script:  # the next GET sees the next provisioning state
            found["properties"]["provisioningState"] = script.pop(0)
        return 200, answer, {}

    def _put_deployment(self, req: Request, ep: str, name: str) -> tuple[int, Any, dict]:
        deployments = self._endpoint_of(ep)
        props = copy.deepcopy(req.body.get("properties", {}))
        props["provisioningState"] = "Creating"
        props.setdefault("scaleSettings", {"scaleType": "Default"})
        resource = self._resource(
            self._arm_id("onlineEndpoints", ep, "deployments", name),
            name,
            "deployments",
            props,
            location=req.body.get("location", self.location),
            kind="Managed",
            tags=req.body.get("tags") or {},
            sku=req.body.get("sku"),
        )
        deployments[name] = resource
        self.deployment_scripts[(ep, name)] = list(self.deployment_states.get(name, ["Succeeded"]))
        script = self.lro.get("deployment")
        if script is None:
            return 200, copy.deepcopy(resource), {}
        op = uuid.uuid4().hex
        self._operations[op] = {"script": list(script), "resource": resource}
        url = f"{self.base_url}/operations/{op}"
        return 201, copy.deepcopy(resource), {"Azure-AsyncOperation": url, "Retry-After": "1"}

    def _delete_deployment(self, req: Request, ep: str, name: str) -> tuple[int, Any, dict]:
        deployments = self._endpoint_of(ep)
        endpoint = self.endpoints[ep]
        if int(endpoint["properties"].get("traffic", {}).get(name, 0)) > 0:
            raise AzureError(400, "BadArgument", f"deployment {name} takes traffic; it cannot be deleted")
        if deployments.pop(name, None) is None:
            return 204, None, {}
        for key in ("traffic", "mirrorTraffic"):  # Azure drops a deleted deployment from the traffic maps
            endpoint["properties"].get(key, {}).pop(name, None)
        return self._long_running("deployment_delete", None, 200)

    def _logs(self, req: Request, ep: str, name: str) -> tuple[int, Any, dict]:
        if name not in self._endpoint_of(ep):
            raise AzureError(404, "UserError", f"deployment {name} not found")
        return 200, {"content": self.deployment_logs}, {}

    # --------------------------------------------------------------------------------------------- Azure Monitor
    def _metrics(self, req: Request, resource: str) -> tuple[int, Any, dict]:
        if not req.headers.get("authorization", "").startswith("Bearer "):
            raise AzureError(401, "AuthenticationFailed", "the Authorization header is missing")
        if "api-version" not in req.query:
            raise AzureError(400, "MissingApiVersionParameter", "The api-version query parameter is required.")
        # ARM ids are case-insensitive; only the endpoints of this workspace have metrics here.
        name = next((n for n, e in self.endpoints.items() if e["id"].lower() == resource.lower()), None)
        if name is None:
            raise AzureError(404, "ResourceNotFound", f"The Resource '{resource}' was not found.")
        metrics = self.monitor.get(name, EndpointMetrics())
        try:
            return 200, metrics_answer(resource, self.location, metrics, req.query), {}
        except ValueError as exc:
            raise AzureError(400, "BadRequest", str(exc)) from exc

    def _score(self, req: Request, ep: str, route: str) -> tuple[int, Any, dict]:
        endpoint = self.endpoints.get(ep)
        if endpoint is None:
            raise AzureError(404, "NotFound", f"endpoint {ep} not found")
        if req.headers.get("authorization") != f"Bearer {self.endpoint_key}":
            return 401, {"message": "Invalid key"}, {}
        traffic = endpoint["properties"].get("traffic") or {}
        deployment = req.headers.get("azureml-model-deployment") or max(traffic, key=traffic.get, default="")
        if deployment not in self.deployments.get(ep, {}):
            return 404, {"message": f"no deployment {deployment!r} takes traffic"}, {}
        self.scored.append((route, deployment, req.body))
        answer = {"azureml-model-deployment": deployment}
        if route == "score":
            if deployment in self.broken:
                return 424, {"message": "An unexpected error occurred in scoring script."}, answer
            return 200, ["Hello."] * len((req.body or {}).get("input_data", [None])), answer
        finish = "length" if deployment in self.broken else "stop"
        return 200, {"choices": [{"message": {"content": "Hello."}, "finish_reason": finish}]}, answer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, answer, extra = self.server.fake.handle(self.command, self.path, headers, body)  # type: ignore[attr-defined]
        data = answer if isinstance(answer, bytes) else (b"" if answer is None else json.dumps(answer).encode())
        self.send_response(status)
        self.send_header(
            "Content-Type", "application/octet-stream" if isinstance(answer, bytes) else "application/json"
        )
        self.send_header("Content-Length", str(len(data)))
        for key, value in extra.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _any

    def log_message(self, *args: Any) -> None:
        pass
