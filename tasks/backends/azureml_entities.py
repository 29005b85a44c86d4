"""Azure ML entities built from the run configuration: pure functions, no client, no network.

The backend (:mod:`tasks.backends.azureml`) submits these; ``finetune-phi azureml export-yaml`` writes the same
entities as Azure ML CLI v2 YAML (:func:`to_yaml_dict`), and the tests load that YAML back with the SDK's own
``load_job`` / ``load_online_endpoint`` / ``load_online_deployment`` / ``load_environment`` / ``load_compute``.

Serialisation gotchas of azure-ai-ml 1.23.1 handled here (measured, see the tests):

- ``command(...).dump()`` writes a pipeline-node YAML that ``load_job`` rejects: we serialise ``._to_job()``.
- A job dict writes a local input path as ``azureml:<path>`` (an asset reference): we put the real path back.
- An endpoint's dict carries ``client_id: null`` / ``principal_id: null`` for a user-assigned identity, which
  ``load_online_endpoint`` rejects: ``None`` values are dropped. Any ``_to_dict()`` of an endpoint also rewrites its
  ``user_assigned_identities`` into dicts in place (a later create fails), so we always serialise a fresh copy.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

from azure.ai.ml import Input, Output, PyTorchDistribution, command
from azure.ai.ml.entities import (
    AmlCompute,
    Environment,
    IdentityConfiguration,
    ManagedIdentityConfiguration,
    ManagedOnlineDeployment,
    ManagedOnlineEndpoint,
    Model,
    OnlineRequestSettings,
    ProbeSettings,
)
from azure.ai.ml.entities._builders.command import Command

from tasks.backends.base import TrainingJobSpec
from tasks.backends.training_job import TRAINING_DIR, job_identity, training_args
from tasks.config import AzureMLConfig, AzureProbeConfig, Settings
from tasks.state import sha256_file, sha256_text

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_OUTPUT = "model_output"
# Tags every asset we create carries, so teardown and the registry can tell ours from others'.
OWNER_TAG = {"created_by": "finetune-phi"}
# Remote locations Azure ML reads directly; anything else is a local file the SDK uploads at submit time.
_URI_SCHEMES = ("azureml", "https", "http", "wasbs", "wasb", "abfss", "abfs", "adl", "gs", "s3")
_SCHEMAS = {
    "job": "https://azuremlschemas.azureedge.net/latest/commandJob.schema.json",
    "endpoint": "https://azuremlschemas.azureedge.net/latest/managedOnlineEndpoint.schema.json",
    "deployment": "https://azuremlschemas.azureedge.net/latest/managedOnlineDeployment.schema.json",
    "environment": "https://azuremlschemas.azureedge.net/latest/environment.schema.json",
    "compute": "https://azuremlschemas.azureedge.net/latest/amlCompute.schema.json",
    "model": "https://azuremlschemas.azureedge.net/latest/model.schema.json",
}


def azure_config(settings: Settings) -> AzureMLConfig:
    if settings.azureml is None:
        raise ValueError("this needs an 'azureml:' section in the config (see configs/azureml.yaml)")
    return settings.azureml


# ---------------------------------------------------------------------------------------------- training


def data_location(path: str | Path) -> str:
    """A data path as Azure ML wants it: a URI or asset reference as is, a local file as an absolute path.

    ``Path("azureml://datastores/...")`` collapses the double slash (``TrainingJobSpec`` types data as ``Path``),
    so it is restored here.
    """
    text = str(path)
    match = re.match(r"^([a-z]+):/+(.*)$", text)
    if match and match.group(1) in _URI_SCHEMES:
        return f"{match.group(1)}://{match.group(2)}"
    if text.startswith("azureml:"):  # azureml:name:version, a registered data asset
        return text
    return str(Path(text).expanduser().resolve())


def is_remote(location: str) -> bool:
    return location.startswith("azureml:") or (location.split(":", 1)[0] in _URI_SCHEMES and "://" in location)


def environment_version(cfg: AzureMLConfig, repo_root: Path = REPO_ROOT) -> str:
    """Content hash of image + conda file: a changed conda file makes a new version, an unchanged one is reused."""
    conda = repo_root / cfg.environment.conda_file
    if not conda.is_file():
        raise FileNotFoundError(
            f"the training environment's conda file {conda} is missing (azureml.environment.conda_file)"
        )
    return sha256_text(f"{cfg.environment.image}\n{sha256_file(conda)}")[:16]


def training_environment(cfg: AzureMLConfig, repo_root: Path = REPO_ROOT) -> Environment:
    return Environment(
        name=cfg.environment.name,
        version=environment_version(cfg, repo_root),
        image=cfg.environment.image,
        conda_file=str(repo_root / cfg.environment.conda_file),
        description="finetune-phi training environment (training/conda.yml on the base image)",
        tags=dict(OWNER_TAG),
    )


def compute_cluster(cfg: AzureMLConfig) -> AmlCompute:
    c = cfg.compute
    return AmlCompute(
        name=c.name,
        size=c.size,
        min_instances=c.min_instances,
        max_instances=c.max_instances,
        tier=c.tier,
        idle_time_before_scale_down=c.idle_time_before_scale_down_s,
        tags=dict(OWNER_TAG),
    )


def training_command_line(spec: TrainingJobSpec, training_dir: Path = TRAINING_DIR) -> str:
    """The same ``training/sft.py`` command line as the local backend, with Azure ML's input/output bindings.

    No ``--mlflow_tracking_uri``: inside an Azure ML job MLflow already points at the workspace.
    """
    args = training_args(
        spec,
        train_file="${{inputs.train_file}}",
        eval_file="${{inputs.eval_file}}",
        output_dir=f"${{{{outputs.{MODEL_OUTPUT}}}}}",
        training_dir=training_dir,
    )
    return " ".join(["python", *(arg if arg.startswith("${{") else shlex.quote(arg) for arg in args)])


def mlflow_export_step(subpath: str) -> str:
    """Bash run after ``sft.py`` in the job: save ``model/`` as an MLflow model in ``model_output/<subpath>``.

    Registering it as an ``mlflow_model`` lets Azure ML deploy it without a scoring script (the sample's route);
    ``sft.py`` logs the model to the MLflow run, but an MLflow 3 logged model is not a job output folder we can
    register by path. Saving from the folder copies the weights without loading them into memory (loading a 3.8B
    model would need its RAM twice). Rank 0 only: with PyTorchDistribution every process runs the command.
    """
    output = f"${{{{outputs.{MODEL_OUTPUT}}}}}"
    code = (
        "import contextlib, sys, mlflow, sft; "
        "stack = contextlib.ExitStack(); "
        "stack.enter_context(getattr(sft, 'pipeline_impl_as_class', contextlib.nullcontext)()); "
        "mlflow.transformers.save_model(transformers_model=sys.argv[1], path=sys.argv[2], "
        "task='text-generation', pip_requirements=sft.MLFLOW_PIP_REQUIREMENTS)"
    )
    return f'if [ "${{RANK:-0}}" = "0" ]; then python -c "{code}" {output}/model {output}/{subpath.strip("/")}; fi'


def job_command(spec: TrainingJobSpec, cfg: AzureMLConfig, training_dir: Path = TRAINING_DIR) -> str:
    """The job's command: the training command line, then the MLflow export when a subpath is configured."""
    line = training_command_line(spec, training_dir)
    subpath = cfg.model_output_subpath.strip("/")
    return f"{line} && {mlflow_export_step(subpath)}" if subpath else line


def job_name(spec: TrainingJobSpec, cfg: AzureMLConfig, training_dir: Path = TRAINING_DIR, attempt: int = 1) -> str:
    """``<experiment>-<identity>``: :func:`~tasks.backends.training_job.job_identity` with the data locations and
    where the job runs (cluster, nodes x processes, environment, model output).

    The same inputs give the same name, so a re-run after a crash finds the job it already submitted instead of
    paying for a second one. ``attempt`` > 1 names a fresh try after a failed or canceled job.
    """
    has_conda = (training_dir.parent / cfg.environment.conda_file).is_file()
    target = {
        "compute": cfg.compute.name,
        "nodes": f"{cfg.instance_count}x{cfg.processes_per_node}",
        "environment": environment_version(cfg, training_dir.parent) if has_conda else "",
        "model_output_subpath": cfg.model_output_subpath,
    }
    data = (data_location(spec.train_file), data_location(spec.eval_file))
    identity = job_identity(spec, data=data, target=target, training_dir=training_dir)
    prefix = re.sub(r"[^a-z0-9_-]+", "-", (spec.experiment or cfg.experiment_name).lower()).strip("-") or "job"
    name = f"{prefix}-{identity}"
    return name if attempt <= 1 else f"{name}-{attempt}"


def training_command(
    spec: TrainingJobSpec,
    cfg: AzureMLConfig,
    *,
    environment: Environment | str,
    name: str | None = None,
    training_dir: Path = TRAINING_DIR,
) -> Command:
    """The command job: ``code=training/``, the data as ``uri_file`` inputs, the model as the ``model_output`` output.

    Multi-GPU: ``instance_count`` nodes x ``processes_per_node`` processes through ``PyTorchDistribution``
    (Azure ML sets the torch.distributed variables; the script runs unchanged).
    """
    return command(
        name=name or job_name(spec, cfg, training_dir),
        display_name=f"sft {spec.recipe.name} ({spec.manifest_sha256[:8]})",
        description="finetune-phi: training/sft.py on the prepared chat dataset",
        experiment_name=spec.experiment or cfg.experiment_name,
        code=str(training_dir),
        command=job_command(spec, cfg, training_dir),
        environment=environment,
        compute=cfg.compute.name,
        inputs={
            "train_file": Input(type="uri_file", path=data_location(spec.train_file)),
            "eval_file": Input(type="uri_file", path=data_location(spec.eval_file)),
        },
        outputs={MODEL_OUTPUT: Output(type=cfg.model_output_type)},
        distribution=PyTorchDistribution(process_count_per_instance=cfg.processes_per_node),
        instance_count=cfg.instance_count,
        tags={
            **OWNER_TAG,
            "manifest_sha256": spec.manifest_sha256,
            "recipe": spec.recipe.as_posix(),
        },
    )


# ---------------------------------------------------------------------------------------------- registry


def job_output_uri(job: str, subpath: str = "") -> str:
    """A folder of the job's ``model_output``: ``azureml://jobs/<job>/outputs/model_output[/paths/<subpath>]``."""
    base = f"azureml://jobs/{job}/outputs/{MODEL_OUTPUT}"
    return f"{base}/paths/{subpath.strip('/')}" if subpath.strip("/") else base


def registered_model(name: str, job: str, tags: dict[str, str], subpath: str = "") -> Model:
    """The MLflow model in the job's ``model_output`` as a model version (deployable without a scoring script);
    ``job_id`` in the tags makes registration idempotent."""
    return Model(
        name=name,
        path=job_output_uri(job, subpath),
        type="mlflow_model",
        description=f"finetune-phi model trained by Azure ML job {job}",
        tags={**OWNER_TAG, **{k: str(v) for k, v in tags.items()}, "job_id": job},
    )


# ---------------------------------------------------------------------------------------------- endpoint


def online_endpoint(
    settings: Settings, traffic: dict[str, int] | None = None, mirror_traffic: dict[str, int] | None = None
) -> ManagedOnlineEndpoint:
    """The managed online endpoint; with a user-assigned identity when one is configured (the sample's set-up)."""
    cfg = azure_config(settings)
    identity = None
    if cfg.user_assigned_identity_id:
        identity = IdentityConfiguration(
            type="user_assigned",
            user_assigned_identities=[ManagedIdentityConfiguration(resource_id=cfg.user_assigned_identity_id)],
        )
    return ManagedOnlineEndpoint(
        name=settings.endpoint.name,
        description="finetune-phi online endpoint (blue/green deployments; never deleted by a rollout)",
        auth_mode=cfg.auth_mode,
        identity=identity,
        traffic=dict(traffic or {}),
        mirror_traffic=dict(mirror_traffic or {}),
        tags=dict(OWNER_TAG),
    )


def _probe(probe: AzureProbeConfig) -> ProbeSettings:
    return ProbeSettings(
        initial_delay=probe.initial_delay,
        period=probe.period,
        timeout=probe.timeout,
        failure_threshold=probe.failure_threshold,
        success_threshold=probe.success_threshold,
    )


def model_reference(model: str) -> str:
    """``name:version`` or ``azureml:name:version`` -> the ``azureml:name:version`` form deployments take."""
    return model if model.startswith(("azureml:", "/")) else f"azureml:{model}"


def online_deployment(
    settings: Settings, name: str, model: str, tags: dict[str, str] | None = None
) -> ManagedOnlineDeployment:
    """A no-code MLflow deployment: Azure ML builds the scoring image from the model's MLmodel file.

    Request settings and probes default to the sample's values. The readiness probe waits ``initial_delay`` (500 s)
    before its first check and then allows ``failure_threshold`` x ``period`` seconds for the model to load, so a slow
    load of a 3.8 B model is not reported as a failed deployment.
    """
    cfg = azure_config(settings)
    d = cfg.deployment
    return ManagedOnlineDeployment(
        name=name,
        endpoint_name=settings.endpoint.name,
        model=model_reference(model),
        instance_type=d.instance_type,
        instance_count=d.instance_count,
        request_settings=OnlineRequestSettings(
            max_concurrent_requests_per_instance=d.max_concurrent_requests_per_instance,
            request_timeout_ms=d.request_timeout_ms,
        ),
        liveness_probe=_probe(d.liveness_probe),
        readiness_probe=_probe(d.readiness_probe),
        tags={**OWNER_TAG, **(tags or {})},
    )


# ---------------------------------------------------------------------------------------------- YAML


def _plain(value: Any) -> Any:
    """JSON-shaped data without ``None`` values (the loaders reject explicit nulls in several schemas)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return json.loads(json.dumps(value, default=str)) if not isinstance(value, (str, int, float, bool)) else value


def _relative(path: str | Path, base: Path) -> str:
    """A path as written in a YAML file in ``base``: relative to it (``az ml`` resolves paths from the file)."""
    return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()


def to_yaml_dict(entity: Any, kind: str, base_dir: Path | None = None) -> dict[str, Any]:
    """The Azure ML CLI v2 YAML of an entity, as a dict, with paths relative to ``base_dir`` (the YAML's folder)."""
    if isinstance(entity, Command):
        job = entity._to_job()
        data = _plain(job._to_dict())
        # Put local input paths back (the dict writes them as azureml:<path>, an asset reference).
        for key, item in entity.inputs.items():
            path = getattr(item, "path", None) or getattr(getattr(item, "_data", None), "path", None)
            if path and key in data.get("inputs", {}):
                data["inputs"][key]["path"] = (
                    path if is_remote(str(path)) or base_dir is None else _relative(path, base_dir)
                )
        if base_dir is not None and isinstance(entity.code, str) and not is_remote(entity.code):
            data["code"] = _relative(entity.code, base_dir)
    elif isinstance(entity, ManagedOnlineEndpoint):
        # Serialise a copy: _to_dict() rewrites user_assigned_identities in place.
        data = _plain(_copy_endpoint(entity)._to_dict())
    else:
        data = _plain(entity._to_dict())
    return {"$schema": _SCHEMAS[kind], **data}


def _copy_endpoint(endpoint: ManagedOnlineEndpoint) -> ManagedOnlineEndpoint:
    """A new endpoint with the same fields and new identity objects (dumping mutates the original's)."""
    identity = None
    if endpoint.identity is not None:
        ids = endpoint.identity.user_assigned_identities or []
        identity = IdentityConfiguration(
            type=endpoint.identity.type,
            user_assigned_identities=[
                ManagedIdentityConfiguration(resource_id=i["resource_id"] if isinstance(i, dict) else i.resource_id)
                for i in ids
            ],
        )
    return ManagedOnlineEndpoint(
        name=endpoint.name,
        description=endpoint.description,
        auth_mode=endpoint.auth_mode,
        identity=identity,
        traffic=dict(endpoint.traffic or {}),
        mirror_traffic=dict(endpoint.mirror_traffic or {}),
        tags=dict(endpoint.tags or {}),
    )


__all__ = [
    "MODEL_OUTPUT",
    "OWNER_TAG",
    "REPO_ROOT",
    "TRAINING_DIR",
    "azure_config",
    "compute_cluster",
    "data_location",
    "environment_version",
    "job_name",
    "job_output_uri",
    "model_reference",
    "online_deployment",
    "online_endpoint",
    "registered_model",
    "to_yaml_dict",
    "training_command",
    "training_command_line",
    "training_environment",
]
