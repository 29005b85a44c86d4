"""Typed run configuration: one YAML file per use (``configs/local.yaml``, ``configs/azureml.yaml``).

Precedence, lowest first: the YAML file, environment variables ``FINETUNE_PHI__<SECTION>__<FIELD>``
(double underscores between levels, e.g. ``FINETUNE_PHI__ENDPOINT__PORT=9000``), then explicit overrides
(``{"endpoint.port": 9000}`` or ``["endpoint.port=9000"]``). An unknown key, a wrong type or a missing value
raises :class:`ConfigError` naming the field and the file, before any work starts.

Secrets are never fields: keys and tokens come from the environment, a Prefect Secret block or the state
folder. The local endpoint's keys: :mod:`deployments.keys` (``FINETUNE_PHI_ENDPOINT_KEY`` and friends, else
``<state_dir>/endpoint/keys.json`` with 0600 permissions). The Azure ML endpoint's key: asked from the workspace
and kept in a Prefect Secret block by :mod:`tasks.backends.azureml`, whose Azure sign-in is azure-identity's
(environment, managed identity or ``az login``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deployments.device import DEVICE_PATTERN

ENV_PREFIX = "FINETUNE_PHI__"
# Field names that would tempt someone to put a secret in a file. Refused at load time.
_SECRET_WORDS = ("key", "secret", "password", "token")


class ConfigError(ValueError):
    """A configuration problem, with a message that names the file and the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class HubSource(_Section):
    """A Hugging Face hub dataset, as in the sample."""

    id: str = "HuggingFaceH4/ultrachat_200k"
    config: str | None = "default"
    split: str = "train_sft[:1%]"
    revision: str | None = None


class DataConfig(_Section):
    """Dataset preparation. Exactly one of ``path`` (local JSONL/JSON/Parquet file or folder) or ``hub``."""

    path: Path | None = None
    hub: HubSource | None = None
    test_share: float = Field(0.2, gt=0.0, lt=1.0)
    seed: int = 0
    min_valid_share: float = Field(0.9, ge=0.0, le=1.0)
    max_rows: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.path is None) == (self.hub is None):
            raise ValueError("set exactly one of 'path' (local file or folder) or 'hub' (a hub dataset)")
        return self


class TrainingConfig(_Section):
    """Which recipe to run and how long to wait for it. Hyper-parameters live in the recipe, not here."""

    recipe: Path = Path("training/recipes/tiny_full_cpu.yaml")
    timeout_s: float = Field(1800, gt=0)
    poll_interval_s: float = Field(2.0, gt=0)
    # Extra `--flag value` overrides passed to the training script (e.g. {"max_steps": 20}).
    overrides: dict[str, Any] = Field(default_factory=dict)


# Where a model runs: auto is the first GPU in bfloat16 where one is present, else the CPU in float32
# (deployments.device.resolve_placement; an impossible choice such as cuda without a GPU is refused there).
DeviceChoice = Annotated[str, Field(pattern=DEVICE_PATTERN)]
DtypeChoice = Literal["auto", "float32", "bfloat16", "float16"]


class EvaluationConfig(_Section):
    device: DeviceChoice = "auto"
    dtype: DtypeChoice = "auto"
    num_prompts: int = Field(8, gt=0)
    max_new_tokens: int = Field(64, gt=0)
    latency_budget_s: float = Field(30.0, gt=0)
    # Optional last step: flow_chat/ over the test split through the live endpoint (tasks/batch_eval.py).
    chat_flow_eval: bool = False
    chat_flow_max_rows: int | None = Field(None, gt=0)  # None: the whole test split


class GateConfig(_Section):
    """Promote when the candidate is no worse than the champion on ``metric`` (lower is better) within tolerance."""

    metric: Literal["eval_loss", "perplexity"] = "eval_loss"
    tolerance: float = Field(0.02, ge=0.0)  # relative: 0.02 lets the candidate be at most 2% worse
    min_ended_share: float = Field(0.5, ge=0.0, le=1.0)


class RegistryConfig(_Section):
    model_name: str = "finetune-phi"
    # None: a SQLite store in the state folder. Any MLflow tracking URI otherwise (a server, azureml://...).
    tracking_uri: str | None = None


class EndpointConfig(_Section):
    name: str = "finetune-phi"
    host: str = "127.0.0.1"
    port: int = Field(8765, gt=0, lt=65536)
    # The sample's deployment settings are the defaults.
    max_concurrent_requests: int = Field(3, gt=0)
    request_timeout_ms: int = Field(180_000, gt=0)
    max_queue_wait_ms: int = Field(120_000, ge=0)
    max_body_bytes: int = Field(1_000_000, gt=0)
    max_new_tokens_cap: int = Field(512, gt=0)
    max_batch_size: int = Field(16, gt=0)
    startup_timeout_s: float = Field(120.0, gt=0)
    # Azure answers 429 once more than 2 x max_concurrent_requests are in flight per instance; None: that rule.
    max_pending_requests: int | None = Field(None, gt=0)
    batch_wait_ms: float = Field(3.0, ge=0)  # how long the batching worker waits for more requests to join
    # Short prompts joining a running batch: prefilled inside the running rows' next decoding step when the worker's
    # own forward timings say one forward costs less than two ("auto"), always, or in a forward of their own.
    fuse_joins: Literal["auto", "always", "never"] = "auto"
    # The builtin engine's decoding loop in a child process of the deployment process, with its own GIL, the HTTP
    # side (parsing, chat template without torch, answers) in the parent (deployments/engine_process.py); false: a
    # thread of the deployment process (the default: on a CPU shared with other work, a lightly loaded deployment
    # in two processes measured 2x the per-token latency of a busy one and failed a healthy canary; see the README).
    engine_process: bool = False
    default_max_new_tokens: int = Field(128, gt=0)  # when a request names none
    stop_grace_s: float = Field(30.0, gt=0)  # stop: SIGTERM, in-flight requests finish, then SIGKILL after this
    # torch intra-op threads in the server. 1 suits small models and shared CPUs (2 threads stalled the batching
    # worker 10-50x on a busy 2-core machine); 0 keeps torch's default (one per core) for big models.
    torch_threads: int = Field(1, ge=0)
    # Defaults for every deployment of this endpoint (a deployment may name its own).
    device: DeviceChoice = "auto"
    dtype: DtypeChoice = "auto"
    # What serves a deployment: the builtin engine, `transformers serve --continuous-batching`, or `vllm serve`
    # (GPU only); see deployments/engines.py.
    engine: Literal["builtin", "transformers-serve", "vllm"] = "builtin"
    # Each deployment runs in processes of its own behind the router (deployments/instances.py), like Azure ML
    # instances: instance_count processes per deployment, each capped at memory_limit_mb of address space
    # (RLIMIT_AS, per process: with engine_process the model's process and the HTTP side each; None: no cap, the
    # size check still compares with the machine's available memory).
    instance_count: int = Field(1, ge=1, le=50)
    memory_limit_mb: int | None = Field(None, gt=0)
    # Azure ML's probe fields. Liveness keeps Azure's defaults (a hang is detected after failure_threshold x
    # period); readiness probes each second from the start, since the process answers 503 until the model is loaded.
    liveness_probe: AzureProbeConfig = Field(
        default_factory=lambda: AzureProbeConfig(initial_delay=10, period=10, timeout=2, failure_threshold=30)
    )
    readiness_probe: AzureProbeConfig = Field(
        default_factory=lambda: AzureProbeConfig(initial_delay=0, period=1, timeout=2, failure_threshold=30)
    )
    # Folders whose models may be deployed besides the state folder and registered models' folders.
    model_roots: list[Path] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _azure_endpoint_name(cls, name: str) -> str:
        from deployments.names import name_problem

        problem = name_problem(name, "endpoint")
        if problem is not None:
            raise ValueError(problem)
        return name


class AlarmConfig(_Section):
    """Thresholds of the live-traffic alarms during a bake: the new deployment's own requests against the
    champion's over the same window (:mod:`tasks.guardrails.alarms`)."""

    # Server-side errors (5xx, 408, 424 and the crashed-container code; not a client's 4xx) over requests answered.
    max_error_rate: float = Field(0.05, ge=0.0, le=1.0)  # absolute ceiling, whatever the champion does
    max_error_rate_ratio: float = Field(2.0, ge=1.0)  # and at most this many times the champion's, when it has any
    # p95 of seconds per generated token (long replies do not trip it), as a multiple of the champion's.
    max_latency_ratio: float = Field(2.0, ge=1.0)
    # Share of chat replies that ended (finish_reason "stop"): at most this far (absolute) below the champion's.
    max_ended_share_drop: float = Field(0.25, ge=0.0, le=1.0)
    # No verdict before the new deployment answered this many requests in the window; with less live traffic the
    # bake extends by up to max_extension_s, then the synthetic probes of rollout.requests_per_step decide.
    min_requests: int = Field(20, ge=1)
    max_extension_s: float = Field(60.0, ge=0)
    check_interval_s: float = Field(1.0, gt=0)  # how often the alarms are evaluated during a bake


class RolloutConfig(_Section):
    # How traffic moves to the new deployment: traffic_steps (the explicit list below), all_at_once (100 at once),
    # canary (canary_percent, then 100) or linear (linear_steps equal steps up to 100).
    strategy: Literal["traffic_steps", "all_at_once", "canary", "linear"] = "traffic_steps"
    canary_percent: int = Field(10, gt=0, lt=100)
    linear_steps: int = Field(4, ge=1, le=100)
    # Seconds each step below 100% bakes with live alarms; final_bake_s: at 100%, before the old deployment is
    # retired (traffic can still go back to it). 0: no bake, the synthetic probes alone decide, as before.
    bake_s: float = Field(0.0, ge=0)
    final_bake_s: float = Field(0.0, ge=0)
    alarms: AlarmConfig = Field(default_factory=AlarmConfig)
    # Local backend: while a rollout runs, a request to the new deployment that fails server-side (or cannot be
    # admitted) is retried once on the champion before any byte reaches the client; counted as the new one's error.
    rescue: bool = True
    traffic_steps: list[int] = Field(default_factory=lambda: [10, 50, 100])
    requests_per_step: int = Field(6, ge=1)
    max_error_rate: float = Field(0.0, ge=0.0, le=1.0)
    keep_previous: int = Field(1, ge=0)  # old deployments kept (at 0 traffic) after a successful rollout
    ready_timeout_s: float = Field(600.0, gt=0)
    # Pause the flow run before the first traffic shift (the new deployment is up and passed its pinned smoke test)
    # until a person resumes it in the Prefect UI; not resumed within approval_timeout_s rolls the rollout back.
    # Needs a Prefect server (PREFECT_API_URL): a temporary local engine ends with the run and cannot be resumed.
    require_approval: bool = False
    approval_timeout_s: int = Field(3600, gt=0)
    # Azure ML only: mirror this share of live traffic (at most 50, Azure's limit) to the new deployment, whose
    # answers are discarded, for mirror_duration_s before its pinned smoke test; dropped before live traffic moves.
    mirror_percent: int = Field(0, ge=0, le=50)
    mirror_duration_s: float = Field(300.0, ge=0)

    @field_validator("traffic_steps")
    @classmethod
    def _steps_increase_to_100(cls, steps: list[int]) -> list[int]:
        if not steps or steps[-1] != 100 or any(not 0 < s <= 100 for s in steps) or steps != sorted(set(steps)):
            raise ValueError("must be strictly increasing percentages in (0, 100] ending at 100, e.g. [10, 50, 100]")
        return steps


class SmokeConfig(_Section):
    prompts: list[str] = Field(
        default_factory=lambda: ["What is a Prefect flow?", "Hello! Who are you?"], min_length=1
    )
    max_new_tokens: int = Field(64, gt=0)
    latency_budget_s: float = Field(30.0, gt=0)
    timeout_s: float = Field(60.0, gt=0)
    # chat: /v1/chat/completions (finish_reason says whether a reply ended); score: the sample's /score, all an
    # Azure ML no-code MLflow deployment serves; auto: score on the azureml backend, chat otherwise.
    route: Literal["auto", "chat", "score"] = "auto"


class RetryConfig(_Section):
    """Backoff for transient faults (connection errors, HTTP 429 and 5xx): delay = base * 2**n, +/- jitter."""

    attempts: int = Field(4, ge=1)
    base_delay_s: float = Field(1.0, ge=0)
    max_delay_s: float = Field(30.0, ge=0)
    jitter: float = Field(0.5, ge=0.0, le=1.0)


class AzureComputeConfig(_Section):
    name: str = "gpu-cluster"
    size: str = "Standard_NC24ads_A100_v4"
    min_instances: int = Field(0, ge=0)
    max_instances: int = Field(1, ge=1)
    tier: Literal["dedicated", "low_priority"] = "dedicated"
    idle_time_before_scale_down_s: int = Field(1800, ge=0)


class AzureEnvironmentConfig(_Section):
    name: str = "finetune-phi-train"
    image: str = "mcr.microsoft.com/azureml/openmpi4.1.0-cuda11.8-cudnn8-ubuntu22.04:latest"
    conda_file: Path = Path("training/conda.yml")


class AzureProbeConfig(_Section):
    initial_delay: int = Field(500, ge=0)
    period: int = Field(100, gt=0)
    timeout: int = Field(2, gt=0)
    failure_threshold: int = Field(30, gt=0)
    success_threshold: int = Field(1, gt=0)


class AzureDeploymentConfig(_Section):
    instance_type: str = "Standard_E4s_v3"
    instance_count: int = Field(1, ge=1)
    max_concurrent_requests_per_instance: int = Field(3, ge=1)
    request_timeout_ms: int = Field(180_000, gt=0, le=180_000)
    liveness_probe: AzureProbeConfig = Field(default_factory=AzureProbeConfig)
    readiness_probe: AzureProbeConfig = Field(default_factory=AzureProbeConfig)
    environment_image: str = "mcr.microsoft.com/azureml/minimal-ubuntu22.04-py39-cpu-inference:latest"
    # Azure ML reserves extra VM quota for upgrades on managed online deployments: checked before creating one.
    quota_upgrade_reserve: float = Field(0.2, ge=0.0, le=1.0)


class AzureMLConfig(_Section):
    subscription_id: str
    resource_group: str
    workspace: str
    credential: Literal["default", "azure_cli", "managed_identity"] = "default"
    managed_identity_client_id: str | None = None
    user_assigned_identity_id: str | None = None  # ARM id of the endpoint's identity
    auth_mode: Literal["key", "aml_token"] = "key"
    compute: AzureComputeConfig = Field(default_factory=AzureComputeConfig)
    environment: AzureEnvironmentConfig = Field(default_factory=AzureEnvironmentConfig)
    deployment: AzureDeploymentConfig = Field(default_factory=AzureDeploymentConfig)
    instance_count: int = Field(1, ge=1)  # training nodes
    processes_per_node: int = Field(1, ge=1)  # GPUs per node, for PyTorchDistribution
    experiment_name: str = "finetune-phi"
    # The job's model_output folder (training/sft.py's --output_dir: model/, metrics.json, checkpoints) and the
    # MLflow model inside it that is registered and deployed without a scoring script ("" for the folder itself).
    model_output_type: Literal["mlflow_model", "uri_folder"] = "uri_folder"
    model_output_subpath: str = "mlflow_model"


class Settings(_Section):
    """The whole run configuration."""

    backend: Literal["local", "azureml"] = "local"
    state_dir: Path = Path(".finetune-phi")
    data: DataConfig
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    smoke: SmokeConfig = Field(default_factory=SmokeConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    azureml: AzureMLConfig | None = None
    # Where this config came from, for messages and relative paths. Not a YAML field.
    source_file: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _backend_section(self) -> Settings:
        if self.backend == "azureml" and self.azureml is None:
            raise ValueError(
                "backend 'azureml' needs an 'azureml:' section (subscription_id, resource_group, workspace)"
            )
        if self.backend == "local" and self.rollout.mirror_percent:
            raise ValueError(
                "rollout.mirror_percent needs the azureml backend (the local endpoint server cannot mirror "
                "traffic); set it to 0"
            )
        return self


def _looks_secret(key: str) -> bool:
    # Whole words, not substrings: 'api_key', 'hfToken', 'apikey' are refused; 'max_new_tokens' is not.
    words = re.findall(r"[a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).lower())
    if words and words[-1] in ("id", "ids"):
        return False
    return any(word.endswith(secret) for word in words for secret in _SECRET_WORDS)


def _check_no_secret_fields(data: Any, where: str = "") -> None:
    if isinstance(data, Mapping):
        for key, value in data.items():
            name = f"{where}.{key}" if where else str(key)
            if _looks_secret(str(key)):
                raise ConfigError(
                    f"field '{name}' looks like a secret; secrets never go in config files. "
                    "Set it in the environment or a Prefect Secret block instead."
                )
            _check_no_secret_fields(value, name)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = [p for p in dotted.split(".") if p]
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _parse_value(raw: str) -> Any:
    """Environment and CLI values are YAML scalars/lists: '9000' -> 9000, '[10, 100]' -> [10, 100]."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Collect ``FINETUNE_PHI__SECTION__FIELD=value`` variables as dotted overrides."""
    environ = os.environ if environ is None else environ
    found: dict[str, Any] = {}
    for name, raw in environ.items():
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            dotted = ".".join(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
            found[dotted] = _parse_value(raw)
    return found


def normalise_overrides(overrides: Mapping[str, Any] | Iterable[str] | None) -> dict[str, Any]:
    """Accept ``{"a.b": 1}`` or ``["a.b=1"]`` (the CLI form)."""
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    result: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        result[key.strip()] = _parse_value(raw)
    return result


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; see configs/local.yaml for the known fields)"
        elif item["type"] == "missing":
            message = "required field is missing"
        got = item.get("input")
        suffix = f" (got {got!r})" if item["type"] not in ("missing", "extra_forbidden") and got is not None else ""
        lines.append(f"  - field '{field}': {message}{suffix}")
    return "\n".join(lines)


def load_config(
    path: str | Path,
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Load, merge and validate a run configuration. Raises :class:`ConfigError` with a readable message."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (try configs/local.yaml)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (data:, training:, ...), not {type(data).__name__}")
    _check_no_secret_fields(data)
    merged: dict[str, Any] = data
    extra = {**env_overrides(environ), **normalise_overrides(overrides)}
    _check_no_secret_fields({k.replace(".", "_"): v for k, v in extra.items()})
    for dotted, value in extra.items():
        _set_dotted(merged, dotted, value)
    # A local path switches the source off the hub and back (an override of one must clear the other).
    data_section = merged.get("data")
    if isinstance(data_section, dict):
        if "data.path" in extra and extra["data.path"] is not None:
            data_section.pop("hub", None)
        elif any(k.startswith("data.hub") for k in extra):
            data_section.pop("path", None)
    try:
        settings = Settings.model_validate(merged)
    except ValidationError as exc:
        source = str(path) + (" (with overrides)" if extra else "")
        raise ConfigError(_format_validation_error(exc, source)) from None
    settings.source_file = path
    return settings


__all__ = ["ConfigError", "Settings", "env_overrides", "load_config", "normalise_overrides"]
