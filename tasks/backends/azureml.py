"""The ``azureml`` backend: the same pipeline on Azure Machine Learning, through azure-ai-ml 1.23.1.

- Training: the environment (versioned by the content hash of image + ``training/conda.yml``) and the compute
  cluster are fetched and only created when missing; the command job runs the same ``training/sft.py`` command
  line as the local backend with ``code=training/``. Its name is derived from what it computes, so a re-run after
  a crash finds the job already running instead of paying for a second one.
- Status: one ``jobs.get`` per call, mapped onto :class:`JobStatus`; the flow's wait loop polls it. Logs: the job's
  log files are read through their URLs in the run details (what ``jobs.stream`` reads, but without blocking, so the
  flow can stream new lines, cancel the job on timeout and keep its own schedule); ``job_log_since`` asks blob
  storage only for the bytes after the last poll's offset (``Range: bytes=N-``).
- Registry: the MLflow model in the job's ``model_output`` (``azureml.model_output_subpath``, ``mlflow_model/`` by
  default) is registered as an ``mlflow_model``; registration is idempotent on the job
  (a version tagged ``job_id=<job>`` is reused, its tags merged). Azure ML models have no aliases: an alias is the
  tag ``alias.<name>=true`` on exactly one version of the model (``set_alias`` tags the new one, then untags the old).
- Rollout primitives: the endpoint is created when missing and never deleted (only ``azureml teardown`` deletes it);
  deployments are created after a VM quota check, polled until ready (the container log on failure), and deleted;
  traffic is set on ``endpoint.traffic`` (mirror traffic is dropped from a deployment that gets live traffic).
- Every SDK call goes through :meth:`AzureMLBackend._call`: transient faults (HTTP 408/429/5xx, connection errors,
  a long-running operation failing with a transient code) are retried with :func:`tasks.retry.call_with_retry`
  (exponential backoff with our own jitter), everything else becomes a :class:`BackendError` with a sentence. That
  is the only retry layer: the ``MLClient`` is built with ``retry_total=0``, so ``retry.*`` and the injected clock
  govern every wait. Once the retries are spent the error is a :class:`RetriesExhaustedError`, so the flow's own
  retry wrapper does not multiply the attempts.
- Long-running operations (:meth:`AzureMLBackend._lro`) are waited for at most ``rollout.ready_timeout_s``; a poller
  the backend does not wait on (deployment create, job cancel), or one still running at the deadline, is stopped,
  and the SDK's progress dots never reach stdout.

Azure cannot be reached from CI: the tests drive this code through the real ``MLClient`` against a REST fake of
Azure ML on loopback HTTPS (``tests/azure_fake``), with a fake in-process ``MLClient`` kept for fast timing tests, and
load every entity back with the SDK's own YAML loaders.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline.transport import RequestsTransport

from deployments.names import name_problem
from tasks.backends import azureml_entities as entities
from tasks.backends.base import (
    USAGE_ERROR_EXIT_CODE,
    BackendError,
    DeploymentFailedError,
    DeploymentInfo,
    EndpointInfo,
    JobFailedError,
    JobInfo,
    JobStatus,
    ModelVersion,
    RetriesExhaustedError,
    TrainingJobSpec,
    TransientBackendError,
)
from tasks.config import Settings
from tasks.logs import split_log_chunk
from tasks.polling import PollTimeout, PollTiming, backoff, poll_until
from tasks.retry import call_with_retry
from tasks.state import atomic_write_text

T = TypeVar("T")
_LOG = logging.getLogger("finetune_phi.azureml")

# Azure ML job statuses (JobStatus in the REST API) onto ours. Unknown ones count as running: the flow's wait
# loop keeps polling until its timeout rather than stopping on a status it does not know.
STATUS_MAP: dict[str, JobStatus] = {
    "NotStarted": JobStatus.QUEUED,
    "Queued": JobStatus.QUEUED,
    "Preparing": JobStatus.QUEUED,
    "Provisioning": JobStatus.QUEUED,
    "Starting": JobStatus.QUEUED,
    "Paused": JobStatus.QUEUED,
    "Running": JobStatus.RUNNING,
    "Finalizing": JobStatus.RUNNING,
    "CancelRequested": JobStatus.RUNNING,
    "NotResponding": JobStatus.RUNNING,
    "Completed": JobStatus.COMPLETED,
    "Failed": JobStatus.FAILED,
    "Canceled": JobStatus.CANCELED,
}
# Deployment provisioning states onto DeploymentInfo.state.
DEPLOYMENT_STATES = {
    "creating": "creating",
    "updating": "creating",
    "scaling": "creating",
    "succeeded": "ready",
    "failed": "failed",
    "canceled": "failed",
    "deleting": "deleting",
}
TRANSIENT_HTTP = frozenset({408, 429, 500, 502, 503, 504})
ALIAS_TAG = "alias.{alias}"
MAX_JOB_ATTEMPTS = 50  # fresh job names tried after failed/canceled jobs with the same inputs
LOG_LINES_ON_FAILURE = 50
# How Azure ML reports the user process's exit code in a failed job's error ("... exited with status code 2 ...").
_USAGE_EXIT = re.compile(rf"exit(?:ed)? (?:with )?(?:status |exit )?code:? {USAGE_ERROR_EXIT_CODE}\b", re.IGNORECASE)
POLLER_STOP_WAIT_S = 10.0  # a stopped poller ends after its current sleep (the injected clock's in tests)
# Codes of a failed long-running operation worth another try (the operation's status answer is HTTP 200).
TRANSIENT_LRO_CODES = frozenset(
    {"internalservererror", "serviceunavailable", "toomanyrequests", "requesttimeout", "timeout", "conflict"}
)


def map_job_status(status: str | None) -> JobStatus:
    return STATUS_MAP.get(status or "", JobStatus.RUNNING)


def map_deployment_state(state: str | None) -> str:
    return DEPLOYMENT_STATES.get((state or "").lower(), "creating")


def _version_from_model_ref(model: Any) -> str | None:
    """``azureml:name:3``, ``name:3`` or an ARM id ``.../models/name/versions/3`` -> ``"3"``."""
    text = getattr(model, "id", None) or getattr(model, "version", None) or model
    if not isinstance(text, str) or not text:
        return None
    match = re.search(r"/versions/([^/]+)$", text) or re.search(r":([^:/]+)$", text)
    return match.group(1) if match else None


def _tokenizer_beside_weights(root: Path) -> None:
    """MLflow's transformers flavour keeps the tokenizer in ``components/tokenizer/`` beside ``model/``: copy it
    into ``model/`` so that folder loads on its own with ``from_pretrained`` (our private download, not the asset)."""
    for tokenizer in root.rglob("components/tokenizer"):
        weights = tokenizer.parent.parent / "model"
        if tokenizer.is_dir() and (weights / "config.json").is_file():
            for item in tokenizer.iterdir():
                if item.is_file() and not (weights / item.name).exists():
                    shutil.copy2(item, weights / item.name)


class _UniformRng:
    """Adapts a ``random.random``-style callable to the ``uniform(a, b)`` that :mod:`tasks.retry` draws from."""

    def __init__(self, draw: Callable[[], float]) -> None:
        self._draw = draw

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self._draw()


LOG_TAIL_BYTES = 256 * 1024  # a log is read from its end: a long training log is many MB by the last epoch


def _fetch_log(url: str, start: int | None = None) -> bytes:
    """A log file's bytes over HTTP (blob storage honours ``Range``).

    ``start=None``: its last ``LOG_TAIL_BYTES`` (a long training log is many MB by the last epoch), from the first
    whole line; otherwise everything from byte ``start`` on (empty when nothing was written past it)."""
    import httpx

    header = f"bytes=-{LOG_TAIL_BYTES}" if start is None else f"bytes={start}-"
    response = httpx.get(url, timeout=30.0, follow_redirects=True, headers={"Range": header})
    if start is not None and response.status_code == 416:  # Range Not Satisfiable: no bytes past ``start`` yet
        return b""
    response.raise_for_status()
    data = response.content
    if response.status_code != 206:  # a server that ignores Range sends the whole file
        return data[start:] if start else data
    if start is None and b"\n" in data:
        return data.split(b"\n", 1)[1]  # the suffix starts mid-line
    return data


def _prefect_secret_store(name: str, value: str) -> None:
    """Keep the key in a Prefect Secret block when a Prefect API is configured; otherwise keep nothing."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return
    from prefect.blocks.system import Secret

    Secret(value=value).save(name, overwrite=True)


class _PollingStopped(Exception):
    """Raised inside a poller's thread to end it: the backend polls (or gave up on) that operation itself."""


def _stop_polling(poller: Any) -> None:
    """End an SDK poller's thread at its next poll, without a request.

    An ``LROPoller`` polls on a daemon thread until Azure says the operation ended, 15 to 40 minutes for a
    deployment; azure-core offers no cancel, so its polling method's next status update raises instead."""
    if poller is None or poller.done():
        return

    def stopped() -> None:
        raise _PollingStopped()

    poller.polling_method().update_status = stopped
    with contextlib.suppress(Exception):  # wait() re-raises what ended the thread: ours, or the poll it raced with
        poller.wait(timeout=POLLER_STOP_WAIT_S)


def _silence_progress_dots() -> None:
    """azure-ai-ml's ``AzureMLPolling`` prints a ``.`` to stdout on every poll (and the job ops a progress bar):
    nothing the flow's logs or a CLI's output should get."""
    from azure.ai.ml._utils import _azureml_polling

    _azureml_polling.print = lambda *args, **kwargs: None  # type: ignore[attr-defined]


def _sent(exc: Exception) -> str:
    """The request an SDK error answers, as `` (at GET <path in the workspace>)``: one SDK call sends several (a
    workspace GET before usages, an endpoint GET before a deployment PUT), and a fault in any of them would otherwise
    read as a fault of the outer call."""
    request = getattr(getattr(exc, "response", None), "request", None)
    url = getattr(request, "url", None)
    if not url:
        return ""
    path = urlsplit(url).path
    return f" (at {request.method} {path.split('/workspaces/', 1)[-1] or path})"


def _usage_family(usage: Any) -> str:
    """The VM family of a quota usage. ``Usage._from_rest_object`` copies the REST dict onto the entity, so
    ``usage.name`` is ``{"value": ..., "localizedValue": ...}`` from the SDK (a ``UsageName`` only when built)."""
    name = getattr(usage, "name", None)
    value = name.get("value") if isinstance(name, dict) else getattr(name, "value", None)
    return str(value or "")


def _weights(traffic: dict[str, Any] | None) -> dict[str, int]:
    """A traffic map as Azure means it: ``online_endpoints.get`` fills in 0 for every deployment without traffic,
    and ``begin_create_or_update`` drops zeros (and lowercases names) before the PUT, so zeros carry nothing."""
    return {str(k).lower(): int(v) for k, v in (traffic or {}).items() if int(v or 0) > 0}


class _ClockedTransport(RequestsTransport):
    """azure-core's requests transport whose ``sleep`` (what LRO pollers wait with between polls) is ours."""

    def __init__(self, sleep: Callable[[float], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._clock_sleep = sleep

    def sleep(self, duration: float) -> None:
        self._clock_sleep(duration)


class AzureMLBackend:
    """:class:`~tasks.backends.base.Backend` on Azure ML. ``ml_client`` may be injected (tests use a fake)."""

    name = "azureml"

    def __init__(
        self,
        settings: Settings,
        ml_client: Any | None = None,
        credential: Any | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        rng: Callable[[], float] | random.Random = random.random,
        clock: Callable[[], float] = time.monotonic,
        fetch_log: Callable[[str, int | None], bytes] = _fetch_log,
        secret_store: Callable[[str, str], None] | None = _prefect_secret_store,
        training_dir: Path = entities.TRAINING_DIR,
        cloud: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.cfg = entities.azure_config(settings)
        self._client_obj = ml_client
        self._credential = credential
        self._sleep = sleep
        self._rng = rng if hasattr(rng, "uniform") else _UniformRng(rng)  # type: ignore[arg-type]
        self._clock = clock
        self._fetch_log = fetch_log
        self._streamed_log: dict[str, str] = {}  # job -> the log file job_log_since follows (offsets are its bytes)
        self._secret_store = secret_store
        self._training_dir = training_dir
        self._secret_saved = False
        self._cloud = dict(cloud or {})  # MLClient's ``cloud`` / ``cloud_metadata`` for a sovereign or test cloud
        self._transport: _ClockedTransport | None = None
        self._metrics_clients: list[Any] = []  # the MetricsQueryClients live_metrics made, closed with the backend

    def __deepcopy__(self, memo: dict[int, Any]) -> AzureMLBackend:
        # A backend is a handle on remote state, not a value: Prefect's transaction ``get`` deep-copies what the
        # rollout stored (the backend included), and the rollback hooks must act through this same client.
        return self

    def close(self) -> None:
        """Close the clients' connections (a later call builds a new client)."""
        metrics_clients, self._metrics_clients = self._metrics_clients, []
        for metrics_client in metrics_clients:
            metrics_client.close()
        transport, self._transport = self._transport, None
        if transport is not None:
            self._client_obj = None
            transport.close()

    # ------------------------------------------------------------------------------------------ plumbing
    @property
    def client(self) -> Any:
        """The ``MLClient``, built on first use (construction is lazy: no network until the first call)."""
        if self._client_obj is None:
            from azure.ai.ml import MLClient

            _silence_progress_dots()
            self._client_obj = MLClient(
                self._credential or self._make_credential(),
                self.cfg.subscription_id,
                self.cfg.resource_group,
                self.cfg.workspace,
                # One retry layer: ours (_call, on retry.* and the injected clock). azure-core's RetryPolicy would
                # retry each request 3 more times with real sleeps the config and the clock never see.
                retry_total=0,
                # Long-running-operation polls sleep through the transport: on the injected clock too.
                transport=self._new_transport(),
                enable_telemetry=False,
                show_progress=False,
                **self._cloud,
            )
        return self._client_obj

    def _new_transport(self) -> _ClockedTransport:
        self._transport = _ClockedTransport(self._sleep)
        return self._transport

    def _make_credential(self) -> Any:
        from azure.identity import AzureCliCredential, DefaultAzureCredential, ManagedIdentityCredential

        if self.cfg.credential == "azure_cli":
            return AzureCliCredential()
        if self.cfg.credential == "managed_identity":
            return ManagedIdentityCredential(client_id=self.cfg.managed_identity_client_id)
        if self.cfg.managed_identity_client_id:
            return DefaultAzureCredential(managed_identity_client_id=self.cfg.managed_identity_client_id)
        return DefaultAzureCredential()

    def _translate(self, exc: Exception, what: str) -> Exception | None:
        """Our error for an SDK/transport exception, or None to let it through unchanged."""
        where = f"workspace {self.cfg.workspace!r} (resource group {self.cfg.resource_group!r})"
        if isinstance(exc, ClientAuthenticationError):
            return BackendError(
                f"could not sign in to Azure to {what} ({type(exc).__name__}): run `az login`, or set "
                "azureml.credential / azureml.managed_identity_client_id in the config"
            )
        if isinstance(exc, ResourceNotFoundError):
            return BackendError(f"could not {what}: it does not exist in {where}{_sent(exc)}")
        if isinstance(exc, HttpResponseError) and (exc.status_code or 0) < 400 and exc.error is not None:
            # A long-running operation that failed: the exception carries the last poll's status (200) and the
            # operation's error body, which is what Azure has to say.
            code, message = exc.error.code or "OperationFailed", (exc.error.message or "").strip()
            text = f"Azure ML could not {what}: {code}: {message.splitlines()[0] if message else 'no message'}"
            return TransientBackendError(text) if code.lower() in TRANSIENT_LRO_CODES else BackendError(text)
        if isinstance(exc, HttpResponseError):
            code = exc.status_code
            reason = (exc.message or str(exc)).strip().splitlines()[0] if (exc.message or str(exc)) else ""
            at = _sent(exc)
            if code is None or code in TRANSIENT_HTTP or code >= 500:
                return TransientBackendError(f"Azure ML answered HTTP {code} to {what}{at}: {reason}")
            if code == 403:
                return BackendError(
                    f"permission denied to {what} in {where}{at}: {reason}; the signed-in identity needs the "
                    "Contributor (or AzureML Data Scientist) role on the workspace"
                )
            return BackendError(f"Azure ML refused to {what} (HTTP {code}){at}: {reason}")
        if isinstance(exc, (ServiceRequestError, ServiceResponseError, ConnectionError, TimeoutError)):
            return TransientBackendError(f"could not reach Azure ML to {what} ({type(exc).__name__}: {exc})")
        try:
            from azure.ai.ml.exceptions import MlException
        except ImportError:  # pragma: no cover
            return None
        if isinstance(exc, MlException):
            return BackendError(f"azure-ai-ml rejected the request to {what}: {exc.message}")
        return None

    def _call(self, what: str, fn: Callable[..., T], *args: Any, missing_ok: bool = False, **kwargs: Any) -> T:
        """One SDK call with retries on transient faults. ``missing_ok``: a 404 returns None instead of failing."""

        def attempt() -> T:
            try:
                return fn(*args, **kwargs)
            except ResourceNotFoundError:
                if missing_ok:
                    return None  # type: ignore[return-value]
                raise
            except BackendError:
                raise
            except Exception as exc:
                translated = self._translate(exc, what)
                if translated is None:
                    raise
                raise translated from exc

        policy = self.settings.retry
        try:
            return call_with_retry(attempt, policy=policy, what=what, sleep=self._sleep, rng=self._rng, logger=_LOG)
        except TransientBackendError as exc:
            raise RetriesExhaustedError(
                f"{exc} (gave up after {policy.attempts} attempts; retry.attempts in the config)"
            ) from exc
        except ResourceNotFoundError as exc:
            raise self._translate(exc, what) from exc  # type: ignore[misc]

    def _lro(self, what: str, begin: Callable[[], Any], *, missing_ok: bool = False) -> Any:
        """A long-running operation, waited for at most ``rollout.ready_timeout_s``: an SDK poller is never left
        polling (one still running at the deadline is stopped) and a transient failure restarts the operation."""

        timeout_s = float(self.settings.rollout.ready_timeout_s)

        def run() -> Any:
            poller = begin()
            try:
                poller.wait(timeout=timeout_s)  # raises the operation's error when it failed
                if not poller.done():
                    raise BackendError(
                        f"could not {what} within {timeout_s:.0f} s (rollout.ready_timeout_s): Azure ML "
                        "is still working on it; a re-run picks up what it finished"
                    )
                return poller.result()
            finally:
                _stop_polling(poller)

        return self._call(what, run, missing_ok=missing_ok)

    def _start(self, what: str, begin: Callable[..., Any], *args: Any) -> None:
        """Start a long-running operation the backend then polls itself (or needs no answer of): no SDK poller."""
        _stop_polling(self._call(what, begin, *args))

    # ------------------------------------------------------------------------------------------ preflight reads
    @property
    def credential(self) -> Any:
        if self._credential is None:
            self._credential = self._make_credential()
        return self._credential

    @property
    def resource_manager_url(self) -> str:
        """Azure Resource Manager of the client's cloud (public Azure, a sovereign cloud, or a test server)."""
        from azure.ai.ml._azure_environments import _get_base_url_from_metadata

        self.client  # noqa: B018 - building the client registers and selects its cloud
        return _get_base_url_from_metadata(self._cloud.get("cloud")).rstrip("/")

    def arm_token(self) -> str:
        """A token for Azure Resource Manager from the configured credential (what every call needs first)."""
        return self.credential.get_token(self.resource_manager_url + "/.default").token

    def workspace_location(self) -> str:
        workspace = self._call(f"get workspace {self.cfg.workspace}", self.client.workspaces.get, self.cfg.workspace)
        return str(workspace.location or "")

    def vm_sizes(self) -> dict[str, tuple[str, int]]:
        """The workspace region's VM sizes: lowercase name -> (family, vCPUs)."""
        sizes = self._call("list VM sizes", self.client.compute.list_sizes)
        return {(s.name or "").lower(): (s.family or "", int(getattr(s, "v_cp_us", 0) or 0)) for s in sizes or []}

    def vcpu_quota(self) -> dict[str, tuple[int, int]]:
        """The region's vCPU quota: lowercase VM family -> (in use, limit)."""
        usages = self._call("list quota usage", self.client.compute.list_usage)
        return {
            _usage_family(u).lower(): (int(u.current_value or 0), int(u.limit))
            for u in usages or []
            if u.limit is not None
        }

    def arm_resource_exists(self, resource_id: str, api_version: str) -> bool:
        """An ARM GET on ``resource_id`` (e.g. the user-assigned identity): True found, False 404."""
        from azure.core import PipelineClient
        from azure.core.pipeline.policies import BearerTokenCredentialPolicy
        from azure.core.rest import HttpRequest

        base = self.resource_manager_url
        policy = BearerTokenCredentialPolicy(self.credential, base + "/.default")
        url = f"{base}/{resource_id.lstrip('/')}?api-version={api_version}"

        def get() -> bool:
            with PipelineClient(base, policies=[policy], transport=_ClockedTransport(self._sleep)) as client:
                response = client.send_request(HttpRequest("GET", url))
            if response.status_code == 404:
                return False
            response.raise_for_status()
            return True

        return self._call(f"get {resource_id.rsplit('/', 1)[-1]}", get)

    def endpoint_tags(self) -> dict[str, str] | None:
        """The existing endpoint's tags, or None when the name is free in the workspace."""
        endpoint = self._get_endpoint_entity()
        return None if endpoint is None else dict(endpoint.tags or {})

    # ------------------------------------------------------------------------------------------ training
    def _ensure_environment(self) -> Any:
        env = entities.training_environment(self.cfg, self._training_dir.parent)
        found = self._call(
            f"get environment {env.name}:{env.version}",
            self.client.environments.get,
            env.name,
            version=env.version,
            missing_ok=True,
        )
        if found is not None:
            return found
        _LOG.info("creating environment %s:%s", env.name, env.version)
        return self._call(f"create environment {env.name}", self.client.environments.create_or_update, env)

    def _ensure_compute(self) -> Any:
        name = self.cfg.compute.name
        found = self._call(f"get compute {name}", self.client.compute.get, name, missing_ok=True)
        if found is not None:
            return found
        _LOG.info("creating compute cluster %s (%s)", name, self.cfg.compute.size)
        cluster = entities.compute_cluster(self.cfg)
        return self._lro(f"create compute {name}", lambda: self.client.compute.begin_create_or_update(cluster))

    def _job_for(self, spec: TrainingJobSpec) -> tuple[str, Any | None]:
        """The job name to submit under, and the job already there when one with these inputs is reusable."""
        for attempt in range(1, MAX_JOB_ATTEMPTS + 1):
            name = entities.job_name(spec, self.cfg, self._training_dir, attempt)
            job = self._call(f"get job {name}", self.client.jobs.get, name, missing_ok=True)
            if job is None:
                return name, None
            if spec.fresh:
                continue  # refresh asked: the next free attempt name, a new job
            if map_job_status(job.status) not in (JobStatus.FAILED, JobStatus.CANCELED):
                return name, job  # running or completed: same data, recipe and code, so the same result
            if map_job_status(job.status) == JobStatus.FAILED:
                reason = self._failure_reason(job)
                if _USAGE_EXIT.search(reason):
                    raise JobFailedError(
                        f"{reason.splitlines()[0]} That is training/sft.py's usage error (exit code "
                        f"{USAGE_ERROR_EXIT_CODE}): the same inputs fail the same way, so no new job is submitted; "
                        "fix the recipe or the overrides"
                    )
        raise BackendError(
            f"{MAX_JOB_ATTEMPTS} Azure ML jobs with these exact inputs failed or were canceled; fix the cause "
            "(see the last job's log in the studio) before trying again"
        )

    def submit_training(self, spec: TrainingJobSpec) -> JobInfo:
        env = self._ensure_environment()
        self._ensure_compute()
        name, existing = self._job_for(spec)
        if existing is not None:
            _LOG.info("job %s with the same inputs already exists (%s): reusing it", name, existing.status)
            return self._job_info(existing)
        job = entities.training_command(
            spec, self.cfg, environment=f"azureml:{env.name}:{env.version}", name=name, training_dir=self._training_dir
        )
        try:
            created = self._call(f"submit training job {name}", self.client.jobs.create_or_update, job)
        except BackendError:
            # A submit whose answer was lost (a timeout after Azure accepted it) leaves the job there: use it.
            created = self._call(f"get job {name}", self.client.jobs.get, name, missing_ok=True)
            if created is None:
                raise
            _LOG.warning("job %s was created although its submission reported an error; using it", name)
        return self._job_info(created)

    def _run_details(self, job_id: str) -> Any | None:
        """Run history details (error, log file URLs): the private API ``jobs.stream`` itself uses."""
        runs = getattr(self.client.jobs, "_runs_operations", None)
        if runs is None:
            return None
        try:
            return self._call(f"get run details of job {job_id}", runs.get_run_details, job_id, missing_ok=True)
        except BackendError as exc:
            _LOG.warning("%s", exc)
            return None

    def _failure_reason(self, job: Any) -> str:
        details = self._run_details(job.name)
        error = getattr(details, "error", None)
        inner = getattr(error, "error", error)
        message = getattr(inner, "message", None) or "no error message recorded"
        code = getattr(inner, "code", None)
        tail = self.job_log_tail(job.name, 10)
        text = f"Azure ML job {job.name} ended {job.status}: {f'{code}: ' if code else ''}{message}."
        if job.studio_url:
            text += f" Details: {job.studio_url}"
        if tail:
            text += "\nlast log lines:\n" + "\n".join(tail)
        return text

    def _job_info(self, job: Any) -> JobInfo:
        status = map_job_status(job.status)
        error = self._failure_reason(job) if status in (JobStatus.FAILED, JobStatus.CANCELED) else None
        return JobInfo(job_id=job.name, status=status, error=error, url=getattr(job, "studio_url", None))

    def get_job(self, job_id: str) -> JobInfo:
        return self._job_info(self._call(f"get job {job_id}", self.client.jobs.get, job_id))

    def cancel_job(self, job_id: str) -> None:
        """Ask Azure ML to cancel the job (returns once the request is accepted; the status goes to Canceled)."""
        job = self._call(f"get job {job_id}", self.client.jobs.get, job_id, missing_ok=True)
        if job is None or map_job_status(job.status).is_terminal:
            return
        _LOG.warning("canceling Azure ML job %s (%s)", job_id, job.status)
        self._start(f"cancel job {job_id}", self.client.jobs.begin_cancel, job_id)

    @staticmethod
    def _pick_log(log_files: dict[str, str], any_log: bool = True) -> str | None:
        """The user's stdout/stderr log (process 0 first), else the legacy driver log, else (``any_log``) any log."""
        names = sorted(log_files)
        for pattern in (r"user_logs/std_log(_process_0+)?\.txt$", r"user_logs/std_log.*\.txt$", r"driver_log.*\.txt$"):
            hits = [n for n in names if re.search(pattern, n)]
            if hits:
                return hits[0]
        return names[0] if names and any_log else None

    def _log_files(self, job_id: str) -> dict[str, str]:
        details = self._run_details(job_id)
        return dict(getattr(details, "log_files", None) or {})

    def _read_log(self, job_id: str, url: str, start: int | None) -> bytes | None:
        try:
            return self._fetch_log(url, start)
        except Exception as exc:  # a log we cannot read yet is not a failure of the job
            _LOG.debug("could not read the log of job %s: %s", job_id, type(exc).__name__)
            return None

    def job_log_tail(self, job_id: str, lines: int = 50) -> list[str]:
        log_files = self._log_files(job_id)
        chosen = self._pick_log(log_files)
        data = self._read_log(job_id, log_files[chosen], None) if chosen else None
        if not data or lines <= 0:
            return []
        return data.decode("utf-8", "replace").splitlines()[-lines:]

    def job_log_since(self, job_id: str, offset: int = 0) -> tuple[list[str], int]:
        """The training's own log (``user_logs/std_log*.txt``) from byte ``offset``, as the run details link it.

        Only the user log is followed, and the same file for the whole job: an offset means nothing in another file
        (system logs appear first, process logs one by one)."""
        log_files = self._log_files(job_id)
        chosen = self._streamed_log.get(job_id) or self._pick_log(log_files, any_log=False)
        if chosen is None or chosen not in log_files:
            return [], offset
        self._streamed_log[job_id] = chosen
        data = self._read_log(job_id, log_files[chosen], offset)
        if data is None:
            return [], offset
        return split_log_chunk(data, offset)

    def _tracking_uri(self) -> str:
        workspace = self._call(f"get workspace {self.cfg.workspace}", self.client.workspaces.get, self.cfg.workspace)
        uri = getattr(workspace, "mlflow_tracking_uri", None)
        if not uri:
            raise BackendError(f"workspace {self.cfg.workspace!r} reports no MLflow tracking URI")
        return uri

    def _mlflow_run(self, job_id: str) -> Any:
        """The job's MLflow run in the workspace (on Azure ML the run id is the job name)."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = self._tracking_uri()
        try:
            return MlflowClient(tracking_uri=uri).get_run(job_id)
        except MlflowException as exc:
            raise BackendError(
                f"could not read the metrics of job {job_id} from the workspace's MLflow: {exc}"
            ) from exc

    def job_metrics(self, job_id: str) -> dict[str, Any]:
        """The final metrics of the job's MLflow run."""
        return dict(self._mlflow_run(job_id).data.metrics)

    def _lineage_tags(self, job_id: str) -> dict[str, str]:
        """The tags the local backend takes from the job's ``metrics.json`` (:func:`tasks.registry.lineage_tags`),
        from its MLflow run instead: ``sft.py`` logs the numbers as metrics and recipe, data hash and base model as
        params (the file itself sits in the job's output next to the model, which we do not download for this)."""
        from tasks.registry import lineage_tags

        try:
            run = self._mlflow_run(job_id)
        except Exception as exc:  # the azureml-mlflow plugin raises bare Exceptions too: lineage never blocks it
            _LOG.warning("registering job %s without its lineage tags: %s: %s", job_id, type(exc).__name__, exc)
            return {}
        params = {str(k): str(v) for k, v in (run.data.params or {}).items()}
        # sft.py's params name the base model "tiny (built from the training split)" where metrics.json says "tiny".
        base_model = params.get("base_model") or params.get("model_name_or_path", "").split(" (", 1)[0]
        method = params.get("method") or ("lora" if params.get("use_peft", "").lower() == "true" else "full")
        facts = {
            **dict(run.data.metrics),
            "recipe": params.get("recipe"),
            "manifest_sha256": params.get("manifest_sha256"),
            "base_model": base_model,
            "method": method if params.get("use_peft") or params.get("method") else None,
        }
        return lineage_tags(facts)

    # ------------------------------------------------------------------------------------------ registry
    @property
    def model_name(self) -> str:
        return self.settings.registry.model_name

    def _versions(self) -> list[Any]:
        found = self._call(f"list versions of model {self.model_name}", self.client.models.list, name=self.model_name)
        return list(found or [])

    def _model_version(self, model: Any) -> ModelVersion:
        tags = {str(k): str(v) for k, v in (model.tags or {}).items()}
        return ModelVersion(
            name=model.name,
            version=str(model.version),
            source_job_id=tags.get("job_id", ""),
            uri=f"azureml:{model.name}:{model.version}",
            tags=tags,
        )

    def register_model(self, job_id: str, tags: dict[str, str]) -> ModelVersion:
        """Register the job's ``model_output`` with the job's lineage tags (as locally); a second call for the same
        job merges tags into that version."""
        tags = {str(k): str(v) for k, v in tags.items()}
        existing = [m for m in self._versions() if (m.tags or {}).get("job_id") == job_id]
        if existing:
            model = max(existing, key=lambda m: int(m.version) if str(m.version).isdigit() else 0)
            merged = {**(model.tags or {}), **tags}
            if merged != (model.tags or {}):
                model.tags = merged
                model = self._call(
                    f"update tags of {model.name}:{model.version}", self.client.models.create_or_update, model
                )
            return self._model_version(model)
        # Lineage first, the flow's tags over it: the same precedence as the local registry.
        tags = {**self._lineage_tags(job_id), **tags}
        entity = entities.registered_model(self.model_name, job_id, tags, self.cfg.model_output_subpath)
        created = self._call(f"register the model of job {job_id}", self.client.models.create_or_update, entity)
        return self._model_version(created)

    def get_model_by_alias(self, alias: str) -> ModelVersion | None:
        tag = ALIAS_TAG.format(alias=alias)
        holders = [m for m in self._versions() if (m.tags or {}).get(tag) == "true"]
        if not holders:
            return None
        return self._model_version(max(holders, key=lambda m: int(m.version) if str(m.version).isdigit() else 0))

    def set_alias(self, alias: str, version: ModelVersion) -> None:
        """Tag the new holder first, then untag the old ones: the alias never points nowhere."""
        tag = ALIAS_TAG.format(alias=alias)
        target = self._call(
            f"get model {version.name}:{version.version}",
            self.client.models.get,
            version.name,
            version=version.version,
        )
        if (target.tags or {}).get(tag) != "true":
            target.tags = {**(target.tags or {}), tag: "true"}
            self._call(
                f"set alias {alias} on {version.name}:{version.version}", self.client.models.create_or_update, target
            )
        for model in self._versions():
            if str(model.version) != str(version.version) and (model.tags or {}).get(tag) == "true":
                model.tags = {k: v for k, v in model.tags.items() if k != tag}
                self._call(
                    f"move alias {alias} off {model.name}:{model.version}", self.client.models.create_or_update, model
                )

    def model_folder(self, version: ModelVersion) -> Path:
        """Download the model version once into the state folder; return the folder with the Hugging Face files."""
        root = (
            Path(self.settings.state_dir).expanduser().resolve()
            / "azureml"
            / "models"
            / version.name
            / version.version
        )
        if not (root / ".complete").exists():
            root.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{version.version}.", dir=root.parent))
            try:
                self._call(
                    f"download model {version.name}:{version.version}",
                    self.client.models.download,
                    version.name,
                    version.version,
                    download_path=str(tmp),
                )
                _tokenizer_beside_weights(tmp)
                atomic_write_text(tmp / ".complete", version.uri)
                if root.exists():
                    shutil.rmtree(root)
                tmp.rename(root)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        # The Hugging Face folder: config.json, preferably beside the tokenizer (MLflow's transformers flavour may
        # keep the tokenizer in components/tokenizer when the model was logged from objects).
        configs = sorted(root.rglob("config.json"), key=lambda p: len(p.parts))
        with_tokenizer = [c for c in configs if (c.parent / "tokenizer_config.json").is_file()]
        if with_tokenizer or configs:
            return (with_tokenizer or configs)[0].parent
        mlmodels = sorted(root.rglob("MLmodel"), key=lambda p: len(p.parts))
        return mlmodels[0].parent if mlmodels else root

    # ------------------------------------------------------------------------------------------ endpoint
    @property
    def endpoint_name(self) -> str:
        """The configured endpoint name, refused before any request when Azure ML would refuse it."""
        problem = name_problem(self.settings.endpoint.name, "endpoint")
        if problem is not None:
            raise BackendError(f"endpoint.name {problem}")
        return self.settings.endpoint.name

    def _get_endpoint_entity(self) -> Any | None:
        return self._call(
            f"get endpoint {self.endpoint_name}",
            self.client.online_endpoints.get,
            self.endpoint_name,
            missing_ok=True,
        )

    def _deployments(self) -> list[Any]:
        found = self._call(
            f"list deployments of {self.endpoint_name}",
            self.client.online_deployments.list,
            self.endpoint_name,
        )
        return list(found or [])

    def _endpoint_info(self, endpoint: Any) -> EndpointInfo:
        scoring = endpoint.scoring_uri or ""
        deployments = [
            DeploymentInfo(
                name=d.name,
                model_version=_version_from_model_ref(d.model),
                state=map_deployment_state(d.provisioning_state),
            )
            for d in self._deployments()
        ]
        return EndpointInfo(
            name=endpoint.name,
            scoring_uri=scoring,
            # Only a deployment that serves the OpenAI routes answers here; a no-code MLflow deployment serves /score.
            openai_base_url=re.sub(r"/score/?$", "", scoring).rstrip("/") + "/v1" if scoring else "",
            traffic=_weights(endpoint.traffic),
            deployments=deployments,
        )

    def get_endpoint(self) -> EndpointInfo | None:
        endpoint = self._get_endpoint_entity()
        return None if endpoint is None else self._endpoint_info(endpoint)

    def ensure_endpoint(self) -> EndpointInfo:
        """Create the endpoint when it is missing; an existing one is left as it is (never deleted or replaced)."""
        endpoint = self._get_endpoint_entity()
        if endpoint is None:
            _LOG.info("creating endpoint %s", self.endpoint_name)
            endpoint = self._lro(
                f"create endpoint {self.endpoint_name}",
                # A fresh entity per attempt: the SDK rewrites the identity objects of one it has serialised.
                lambda: self.client.online_endpoints.begin_create_or_update(entities.online_endpoint(self.settings)),
            )
        return self._endpoint_info(endpoint)

    def check_quota(self) -> None:
        """Raise :class:`DeploymentFailedError` when the region lacks the vCPUs the deployment needs."""
        d = self.cfg.deployment
        sizes = self._call("list VM sizes", self.client.compute.list_sizes)
        size = next((s for s in sizes or [] if (s.name or "").lower() == d.instance_type.lower()), None)
        if size is None:
            raise DeploymentFailedError(
                f"VM size {d.instance_type} is not offered in the workspace's region; choose another "
                "azureml.deployment.instance_type"
            )
        vcpus = int(getattr(size, "v_cp_us", 0) or 0)
        instances = math.ceil(d.instance_count * (1 + d.quota_upgrade_reserve))
        need = instances * vcpus
        usages = self._call("list quota usage", self.client.compute.list_usage)
        family = (size.family or "").lower()
        usage = next((u for u in usages or [] if _usage_family(u).lower() == family), None)
        if usage is None or usage.limit is None:
            _LOG.warning("no quota figure for VM family %s; creating deployment without a quota check", size.family)
            return
        available = int(usage.limit) - int(usage.current_value or 0)
        if need > available:
            raise DeploymentFailedError(
                f"not enough quota for {d.instance_count} x {d.instance_type} ({size.family}): the deployment needs "
                f"{need} vCPUs ({instances} instances x {vcpus}, with Azure's {d.quota_upgrade_reserve:.0%} upgrade "
                f"reserve) but only {available} of {usage.limit} are available; request a quota increase for "
                f"{size.family} or lower azureml.deployment.instance_count / choose another instance_type"
            )

    def create_deployment(self, name: str, version: ModelVersion) -> DeploymentInfo:
        """Start creating the deployment at 0 traffic (after a quota check); :meth:`wait_deployment_ready` waits."""
        problem = name_problem(name, "deployment")  # the same rule and message as the local endpoint's
        if problem is not None:
            raise DeploymentFailedError(problem)
        if self._get_endpoint_entity() is None:
            raise DeploymentFailedError(f"endpoint {self.endpoint_name} does not exist; ensure_endpoint() first")
        existing = self._call(
            f"get deployment {name}",
            self.client.online_deployments.get,
            name,
            self.endpoint_name,
            missing_ok=True,
        )
        if existing is not None and map_deployment_state(existing.provisioning_state) != "failed":
            return DeploymentInfo(name, version.version, map_deployment_state(existing.provisioning_state))
        self.check_quota()
        deployment = entities.online_deployment(
            self.settings,
            name,
            f"{version.name}:{version.version}",
            tags={"model_version": version.version, "job_id": version.source_job_id},
        )
        # Not waiting on the poller: creation takes many minutes, wait_deployment_ready polls with backoff.
        self._start(f"create deployment {name}", self.client.online_deployments.begin_create_or_update, deployment)
        return DeploymentInfo(name, version.version, "creating")

    def _deployment_logs(self, name: str) -> str:
        try:
            return self._call(
                f"get logs of deployment {name}",
                self.client.online_deployments.get_logs,
                name,
                self.endpoint_name,
                LOG_LINES_ON_FAILURE,
            )
        except BackendError as exc:
            return f"(logs unavailable: {exc})"

    def wait_deployment_ready(self, name: str, timeout_s: float) -> DeploymentInfo:
        """Poll the provisioning state with exponential backoff and jitter until ready; raise
        :class:`DeploymentFailedError` (with the container log) when it failed, is gone or ``timeout_s`` passed."""
        timing = PollTiming(self._sleep, self._clock, self._rng)

        def read() -> Any:
            return self._call(
                f"get deployment {name}", self.client.online_deployments.get, name, self.endpoint_name, missing_ok=True
            )

        try:
            deployment = poll_until(
                read,
                lambda d: d is None or map_deployment_state(d.provisioning_state) in ("ready", "failed"),
                timeout_s=timeout_s,
                schedule=backoff(self.settings.retry, timing),
                timing=timing,
            )
        except PollTimeout as exc:
            raise DeploymentFailedError(
                f"deployment {name} not ready after {timeout_s:.0f} s ({exc.last.provisioning_state}); "
                f"raise rollout.ready_timeout_s or check the container log:\n{self._deployment_logs(name)}"
            ) from None
        if deployment is None:
            raise DeploymentFailedError(f"deployment {name} does not exist (deleted?)")
        if map_deployment_state(deployment.provisioning_state) == "failed":
            raise DeploymentFailedError(
                f"deployment {name} {deployment.provisioning_state}; container log:\n{self._deployment_logs(name)}"
            )
        return DeploymentInfo(name, _version_from_model_ref(deployment.model), "ready")

    def delete_deployment(self, name: str) -> None:
        """Delete a deployment that takes no live traffic (mirror traffic to it is dropped first); a no-op if gone."""
        endpoint = self._get_endpoint_entity()
        if endpoint is None:
            return
        if _weights(endpoint.traffic).get(name.lower(), 0) > 0:
            raise BackendError(
                f"deployment {name} still takes {endpoint.traffic[name]}% of the traffic; move it first (set_traffic)"
            )
        if name.lower() in _weights(endpoint.mirror_traffic):
            endpoint.mirror_traffic = {k: v for k, v in endpoint.mirror_traffic.items() if k != name}
            self._update_endpoint(endpoint, f"drop mirror traffic to {name}")
        found = self._call(
            f"get deployment {name}", self.client.online_deployments.get, name, self.endpoint_name, missing_ok=True
        )
        if found is None:
            return
        self._lro(
            f"delete deployment {name}",
            lambda: self.client.online_deployments.begin_delete(name, self.endpoint_name),
            missing_ok=True,
        )

    def _update_endpoint(self, endpoint: Any, what: str) -> Any:
        return self._lro(what, lambda: self.client.online_endpoints.begin_create_or_update(endpoint))

    def set_traffic(self, traffic: dict[str, int]) -> dict[str, int]:
        """Set ``endpoint.traffic`` (weights add up to 100, or 0 to stop serving); mirror traffic to a deployment
        that now takes live traffic is dropped (Azure ML refuses both on one deployment)."""
        weights = {str(k): int(v) for k, v in traffic.items()}
        if sum(weights.values()) not in (0, 100) or any(v < 0 for v in weights.values()):
            raise BackendError(f"traffic weights {weights} must be non-negative and add up to 100 (or 0)")
        endpoint = self._get_endpoint_entity()
        if endpoint is None:
            raise BackendError(f"endpoint {self.endpoint_name} does not exist; cannot set traffic {weights}")
        known = {d.name for d in self._deployments()}
        unknown = sorted(k for k, v in weights.items() if k not in known and v > 0)
        if unknown:
            raise BackendError(f"cannot send traffic to {unknown}: no such deployment on {self.endpoint_name}")
        endpoint.traffic = {k: v for k, v in weights.items() if k in known}
        endpoint.mirror_traffic = {
            k: v for k, v in (endpoint.mirror_traffic or {}).items() if weights.get(k, 0) == 0 and k in known
        }
        updated = self._update_endpoint(endpoint, f"set traffic {weights} on {self.endpoint_name}")
        return _weights(updated.traffic)

    def set_mirror_traffic(self, name: str | None, percent: int | None = None) -> dict[str, int]:
        """Mirror ``percent`` (default ``rollout.mirror_percent``, at most 50) of live traffic to a deployment that
        takes no live traffic; its answers are never returned. ``None`` stops mirroring."""
        endpoint = self._get_endpoint_entity()
        if endpoint is None:
            raise BackendError(f"endpoint {self.endpoint_name} does not exist; cannot mirror traffic")
        percent = self.settings.rollout.mirror_percent if percent is None else int(percent)
        if not 0 <= percent <= 50:
            raise BackendError(f"mirror traffic {percent}% is out of range: Azure ML mirrors 0 to 50% of traffic")
        if name is not None and _weights(endpoint.traffic).get(name.lower(), 0) > 0:
            raise BackendError(f"deployment {name} takes live traffic; Azure ML mirrors only to one that does not")
        endpoint.mirror_traffic = {name: percent} if name is not None and percent > 0 else {}
        updated = self._update_endpoint(endpoint, f"mirror {percent}% of traffic to {name}")
        return _weights(updated.mirror_traffic)

    @property
    def secret_block_name(self) -> str:
        slug = re.sub(r"[^a-z0-9-]+", "-", self.endpoint_name.lower()).strip("-")
        return f"{slug}-endpoint-key"

    def live_metrics(self) -> Any:
        """The endpoint's per-deployment metrics in Azure Monitor for the rollout's alarms: a ``MetricsQueryClient``
        on the resource manager of ``MLClient``'s cloud with the same credential (and TLS trust: azure-core's
        requests transport, which honours ``REQUESTS_CA_BUNDLE``), closed by :meth:`close`."""
        from azure.monitor.query import MetricsQueryClient

        from tasks.guardrails.sources import AzureMonitorMetrics, endpoint_resource_id

        client = MetricsQueryClient(
            self.credential,
            endpoint=self.resource_manager_url,
            # One retry layer, as for MLClient: a reading that fails is a check without numbers and the bake reads
            # again at its next check; azure-core's RetryPolicy would sleep for real, outside the injected clock.
            retry_total=0,
        )
        self._metrics_clients.append(client)
        resource = endpoint_resource_id(
            self.cfg.subscription_id, self.cfg.resource_group, self.cfg.workspace, self.settings.endpoint.name
        )
        return AzureMonitorMetrics(client, resource)

    def scoring_key(self) -> str:
        """The endpoint's primary key (its token in aml_token mode), kept in a Prefect Secret block; never logged."""
        keys = self._call(
            f"get keys of {self.endpoint_name}", self.client.online_endpoints.get_keys, self.endpoint_name
        )
        key = getattr(keys, "primary_key", None) or getattr(keys, "access_token", None)
        if not key:
            raise BackendError(
                f"endpoint {self.endpoint_name} returned no key or token (auth_mode {self.cfg.auth_mode})"
            )
        if self._secret_store is not None and not self._secret_saved:
            try:
                self._secret_store(self.secret_block_name, key)
                self._secret_saved = True
            except Exception as exc:  # the key is still usable; only its copy in Prefect failed
                _LOG.warning(
                    "could not store the endpoint key in Prefect Secret %s (%s)",
                    self.secret_block_name,
                    type(exc).__name__,
                )
        return key

    # ------------------------------------------------------------------------------------------ cost controls
    def teardown_plan(self, include_compute: bool = False) -> list[tuple[str, str]]:
        """What :meth:`teardown` would delete, as (kind, name) pairs; only what exists."""
        plan: list[tuple[str, str]] = []
        if self._get_endpoint_entity() is not None:
            plan += [("deployment", f"{self.endpoint_name}/{d.name}") for d in self._deployments()]
            plan.append(("endpoint", self.endpoint_name))
        if include_compute:
            name = self.cfg.compute.name
            if self._call(f"get compute {name}", self.client.compute.get, name, missing_ok=True) is not None:
                plan.append(("compute", name))
        return plan

    def teardown(self, plan: Iterable[tuple[str, str]]) -> list[str]:
        """Delete what the plan lists; returns what went.

        Deleting the endpoint deletes its deployments with it (Azure ML refuses to delete a deployment that still
        takes traffic), so deployments are deleted one by one only when their endpoint stays.
        """
        plan = list(plan)
        endpoints = {name for kind, name in plan if kind == "endpoint"}
        done: list[str] = []
        for kind, name in plan:
            if kind == "deployment" and name.split("/", 1)[0] in endpoints:
                done.append(f"{kind} {name} (with its endpoint)")
                continue
            if kind == "deployment":
                endpoint_name, deployment = name.split("/", 1)
                self._lro(
                    f"delete deployment {name}",
                    lambda d=deployment, e=endpoint_name: self.client.online_deployments.begin_delete(d, e),
                    missing_ok=True,
                )
            elif kind == "endpoint":
                self._lro(
                    f"delete endpoint {name}",
                    lambda n=name: self.client.online_endpoints.begin_delete(name=n),
                    missing_ok=True,
                )
            elif kind == "compute":
                self._lro(
                    f"delete compute {name}", lambda n=name: self.client.compute.begin_delete(n), missing_ok=True
                )
            done.append(f"{kind} {name}")
        return done


__all__ = ["DEPLOYMENT_STATES", "STATUS_MAP", "AzureMLBackend", "map_deployment_state", "map_job_status"]
