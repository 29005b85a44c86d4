"""The seam between the pipeline and where it runs.

The flow and its tasks talk only to a :class:`Backend`. ``local`` (subprocess jobs, MLflow on SQLite, the
loopback endpoint server in ``deployments/``) and ``azureml`` (command jobs, managed online endpoints)
implement it; tests drive the flow code through both.

All methods are synchronous and raise :class:`BackendError` subclasses with a sentence a person can act on.
:class:`TransientBackendError` marks faults worth retrying (connection refused, HTTP 429/5xx, throttling);
everything else is final.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


class BackendError(RuntimeError):
    """A failure with a message meant for a person (what failed, why, what to do)."""


class TransientBackendError(BackendError):
    """A fault that may pass on its own: retry with backoff."""


class RetriesExhaustedError(BackendError):
    """Transient faults went on past ``retry.attempts``: not retried again on the spot (callers would multiply the
    attempts), but a later status poll or a retry of the whole task may well pass."""


class JobFailedError(BackendError):
    """A training job ended in failure. Never retried."""


# ``training/sft.py`` exits with this code when its arguments are wrong (a missing recipe, an unknown key): the same
# command fails the same way every time, so no backend restarts or resubmits such a job.
USAGE_ERROR_EXIT_CODE = 2


class DeploymentFailedError(BackendError):
    """A deployment could not be created or never became ready."""


class JobStatus(str, Enum):  # noqa: UP042 - StrEnum would change str() of members, which records and messages use
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED)


@dataclass(frozen=True)
class TrainingJobSpec:
    """What a training job needs. The command line is the same on every backend."""

    recipe: Path  # the YAML recipe, inside training/
    train_file: Path  # or a datastore URI on azureml
    eval_file: Path
    manifest_sha256: str  # the dataset manifest hash: lineage and cache key
    overrides: dict[str, Any] = field(default_factory=dict)  # extra --flag value pairs for the script
    experiment: str = "finetune-phi"
    tracking_uri: str | None = None  # MLflow tracking URI the job logs to
    # True (the flow's refresh=["training"]): train again from scratch, even where a job with these inputs exists.
    fresh: bool = False


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    status: JobStatus
    exit_code: int | None = None
    error: str | None = None  # on failure: the reason and the log tail
    url: str | None = None  # Azure ML studio URL, or the local log path
    output_dir: Path | None = None  # local: where the model and metrics.json are


@dataclass(frozen=True)
class ModelVersion:
    """A registered model version."""

    name: str
    version: str
    source_job_id: str
    uri: str  # models:/name/version, or azureml:name:version
    local_path: Path | None = None  # a folder with the Hugging Face model, where one is at hand
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DeploymentInfo:
    name: str
    model_version: str | None
    state: str  # "creating", "ready", "failed", "deleting"
    error: str | None = None


@dataclass(frozen=True)
class EndpointInfo:
    name: str
    scoring_uri: str  # POST /score
    openai_base_url: str  # .../v1 for OpenAI clients
    traffic: dict[str, int]
    deployments: list[DeploymentInfo]
    chat_page_url: str | None = None  # the endpoint's own browser chat page (GET /chat); None where it has none


@runtime_checkable
class Backend(Protocol):
    name: str

    # Training jobs
    def submit_training(self, spec: TrainingJobSpec) -> JobInfo: ...
    def get_job(self, job_id: str) -> JobInfo: ...
    def cancel_job(self, job_id: str) -> None: ...
    # The complete log lines after byte ``offset`` of the job's log and the offset to ask from next: a poller that
    # passes back what it got sees every line exactly once, however many were written between two polls.
    def job_log_since(self, job_id: str, offset: int = 0) -> tuple[list[str], int]: ...
    def job_metrics(self, job_id: str) -> dict[str, Any]: ...  # the job's metrics.json

    # Registry (aliases "candidate" and "champion")
    def register_model(self, job_id: str, tags: dict[str, str]) -> ModelVersion: ...
    def get_model_by_alias(self, alias: str) -> ModelVersion | None: ...
    def set_alias(self, alias: str, version: ModelVersion) -> None: ...
    def model_folder(self, version: ModelVersion) -> Path: ...  # a local folder to evaluate (downloaded if needed)

    # Online endpoint
    def ensure_endpoint(self) -> EndpointInfo: ...
    def get_endpoint(self) -> EndpointInfo | None: ...
    def create_deployment(self, name: str, version: ModelVersion) -> DeploymentInfo: ...
    # The deployment once ready (state "ready"); raises DeploymentFailedError when it failed, is gone or was not
    # ready within timeout_s, with the reason (and the container log where the backend has one) in the message.
    def wait_deployment_ready(self, name: str, timeout_s: float) -> DeploymentInfo: ...
    def delete_deployment(self, name: str) -> None: ...
    def set_traffic(self, traffic: dict[str, int]) -> dict[str, int]: ...
    def scoring_key(self) -> str: ...  # the endpoint's primary key; never log it


@runtime_checkable
class MirroringBackend(Backend, Protocol):
    """A backend whose endpoint can mirror a share of live traffic to a deployment (Azure ML's ``mirror_traffic``);
    the rollout's mirror step needs one, and refuses ``rollout.mirror_percent`` on any other backend."""

    # Mirror ``percent`` (None: the rollout's share) of live traffic to ``name``; ``name=None`` stops mirroring.
    # Returns the endpoint's mirror weights after the change.
    def set_mirror_traffic(self, name: str | None, percent: int | None = None) -> dict[str, int]: ...


@runtime_checkable
class LiveMetricsBackend(Backend, Protocol):
    """A backend whose endpoint reports per-deployment numbers of users' requests (the local router's admin route,
    Azure Monitor): the rollout's bakes judge each traffic step on them."""

    def live_metrics(self) -> Any: ...  # a tasks.guardrails.bake.MetricsSource


@runtime_checkable
class RescuingBackend(Backend, Protocol):
    """A backend whose endpoint can answer a request the new deployment failed with the champion (the local
    router); the rollout arms it while a step bakes (``rollout.rescue``)."""

    def arm_rescue(self, candidate: str, champion: str, ttl_s: float) -> None: ...
    def disarm_rescue(self) -> None: ...
