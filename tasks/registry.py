"""The model registry: MLflow's, on a SQLite store in the state folder by default (any tracking URI works).

A training job's model becomes a registered version with lineage tags (``job_id``, ``recipe``,
``manifest_sha256``, the job's eval metrics). Registering the same job again returns the version it already has
(looked up by the ``job_id`` tag), so a retried or re-run flow step never makes duplicates. Aliases mark the
model under test (``candidate``) and the one that serves (``champion``).

The training script logs its model with ``mlflow.transformers.log_model`` from the saved folder and writes the
model URI as ``mlflow_model_uri`` into ``metrics.json``; when it did not, this module logs the saved folder
itself, by path, so the weights are copied rather than loaded into memory (MLflow PRs #13064/#13070).

Every call names its tracking URI and talks through ``MlflowClient(tracking_uri=...)``; the few MLflow calls that
only exist on the global API run inside :func:`_tracking`, which puts the previous global URI back afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.backends.base import ModelVersion
from tasks.state import read_json

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

log = logging.getLogger(__name__)

ALIASES = ("candidate", "champion")
TAG_JOB_ID = "job_id"
TAG_MODEL_DIR = "model_dir"  # where the job's Hugging Face folder was, for a local path without a download
# metrics.json keys copied into tags (besides every numeric eval_* / train_* metric).
_LINEAGE_KEYS = ("recipe", "manifest_sha256", "dataset_manifest_sha256", "base_model", "method")
# What the serving environment needs; MLflow's inference would add torchvision, which is not installed.
PIP_REQUIREMENTS = ("torch", "transformers>=5", "tokenizers", "accelerate", "safetensors")

# The sample's generation params, with defaults, as the logged model's signature declares them.
SIGNATURE_PARAMS = (
    ("max_new_tokens", 128),
    ("temperature", 0.7),
    ("top_p", 1.0),
    ("do_sample", False),
    ("return_full_text", False),
)

_lock = threading.Lock()


def _client(tracking_uri: str | None) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@contextlib.contextmanager
def _tracking(tracking_uri: str | None) -> Iterator[None]:
    """Point MLflow's global (fluent) API at ``tracking_uri`` for the block, then restore what was there."""
    import mlflow
    from mlflow.tracking import _model_registry, _tracking_service

    if tracking_uri is None:
        yield
        return
    with _lock:
        saved_env = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        saved_tracking = _tracking_service.utils._tracking_uri
        saved_registry = _model_registry.utils._registry_uri
        try:
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_registry_uri(tracking_uri)
            yield
        finally:
            _tracking_service.utils._tracking_uri = saved_tracking
            _model_registry.utils._registry_uri = saved_registry
            for name, value in saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _to_version(mv: Any, local_path: Path | None = None) -> ModelVersion:
    tags = dict(mv.tags or {})
    if local_path is None and tags.get(TAG_MODEL_DIR) and (Path(tags[TAG_MODEL_DIR]) / "config.json").is_file():
        local_path = Path(tags[TAG_MODEL_DIR])
    return ModelVersion(
        name=mv.name,
        version=str(mv.version),
        source_job_id=tags.get(TAG_JOB_ID, ""),
        uri=f"models:/{mv.name}/{mv.version}",
        local_path=local_path,
        tags=tags,
    )


def lineage_tags(metrics: dict[str, Any]) -> dict[str, str]:
    """Tags taken from a job's ``metrics.json``: recipe, dataset manifest hash, eval/train metrics."""
    tags: dict[str, str] = {}
    for key in _LINEAGE_KEYS:
        if metrics.get(key) not in (None, ""):
            tags[key] = str(metrics[key])
    for key, value in metrics.items():
        if key.startswith(("eval_", "train_")) and isinstance(value, int | float) and not isinstance(value, bool):
            tags[key] = f"{value:.6g}" if isinstance(value, float) else str(value)
    return tags


def find_job_version(model_name: str, job_id: str, *, tracking_uri: str | None = None) -> ModelVersion | None:
    """The version already registered for ``job_id``, if any."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        found = client.search_model_versions(f"name = '{model_name}' and tags.{TAG_JOB_ID} = '{job_id}'")
    except MlflowException:
        return None
    live = [mv for mv in found if str(getattr(mv, "status", "READY")) in ("READY", "ModelVersionStatus.READY")]
    if not live:
        return None
    return _to_version(min(live, key=lambda mv: int(mv.version)))


@contextlib.contextmanager
def _pipeline_impl_as_class() -> Iterator[None]:
    """MLflow 3.17 logs a checkpoint folder with ``check_task(task)[1]["impl"].__name__``, but transformers 5 names
    the pipeline class as a dotted string there (AttributeError). Resolve it to the class for the block."""
    import importlib

    from transformers import pipelines

    original = pipelines.check_task

    def check_task(task: str) -> Any:
        name, meta, options = original(task)
        impl = meta.get("impl")
        if isinstance(impl, str):
            module, _, attr = impl.rpartition(".")
            meta = {**meta, "impl": getattr(importlib.import_module(module), attr)}
        return name, meta, options

    pipelines.check_task = check_task
    try:
        yield
    finally:
        pipelines.check_task = original


def _experiment_id(tracking_uri: str, name: str) -> str:
    """The experiment's id, created with its artifacts beside a SQLite store (MLflow's default for a SQLite store
    is ``./mlruns`` in whatever folder the process runs in)."""
    client = _client(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    folder = _sqlite_folder(tracking_uri)
    location = (folder / "artifacts").as_uri() if folder else None
    return client.create_experiment(name, artifact_location=location)


def _log_folder(model_dir: Path, model_name: str, job_id: str) -> str:
    """Log a saved Hugging Face folder as an MLflow transformers model, by path (no load). Returns its URI."""
    import mlflow
    from mlflow.models import infer_signature

    experiment_id = _experiment_id(mlflow.get_tracking_uri(), model_name)
    # Declared params: MLflow's scoring server (and Azure's no-code MLflow deployment) silently drop params that
    # are not in the signature, so the sample's max_new_tokens/temperature would otherwise be ignored.
    signature = infer_signature("question", "answer", params=dict(SIGNATURE_PARAMS))
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"register-{job_id}") as run:
        mlflow.set_tag(TAG_JOB_ID, job_id)
        with _pipeline_impl_as_class():
            info = mlflow.transformers.log_model(
                transformers_model=str(model_dir),
                name="model",
                task="text-generation",
                pip_requirements=list(PIP_REQUIREMENTS),
                signature=signature,
            )
        log.info("logged %s as %s (run %s)", model_dir, info.model_uri, run.info.run_id)
        return info.model_uri


def register_job_model(
    tracking_uri: str | None = None,
    model_name: str = "finetune-phi",
    job_id: str = "",
    model_dir: str | Path | None = None,
    *,
    job_output_dir: str | Path | None = None,
    mlflow_model_uri: str | None = None,
    tags: dict[str, str] | None = None,
) -> ModelVersion:
    """Register a training job's model; the same job always gets the same version.

    Give ``model_dir`` (the Hugging Face folder) or ``job_output_dir`` (a job's output: ``model/`` and
    ``metrics.json``, whose ``mlflow_model_uri`` and lineage are read). ``tags`` are added to the lineage tags.
    """
    if not job_id:
        raise ValueError("register_job_model needs the training job's id (job_id) for lineage and idempotency")
    metrics: dict[str, Any] = {}
    if job_output_dir is not None:
        output = Path(job_output_dir)
        metrics = read_json(output / "metrics.json", default={}) or {}
        model_dir = model_dir or output / "model"
        mlflow_model_uri = mlflow_model_uri or metrics.get("mlflow_model_uri")
    if model_dir is None and mlflow_model_uri is None:
        raise ValueError("register_job_model needs model_dir, job_output_dir or mlflow_model_uri")
    model_dir = Path(model_dir).resolve() if model_dir is not None else None

    existing = find_job_version(model_name, job_id, tracking_uri=tracking_uri)
    if existing is not None:
        return existing

    all_tags = {**lineage_tags(metrics), **{k: str(v) for k, v in (tags or {}).items()}, TAG_JOB_ID: job_id}
    if model_dir is not None:
        all_tags[TAG_MODEL_DIR] = str(model_dir)
    client = _client(tracking_uri)
    with _tracking(tracking_uri):
        if mlflow_model_uri is None:
            if model_dir is None or not (model_dir / "config.json").is_file():
                raise FileNotFoundError(
                    f"job {job_id} left no model at {model_dir} (config.json missing) and logged none to MLflow; "
                    "check the job's log"
                )
            mlflow_model_uri = _log_folder(model_dir, model_name, job_id)
        import mlflow

        with contextlib.suppress(Exception):
            client.create_registered_model(model_name, description="finetune-phi: fine-tuned Phi-3 chat models")
        mv = mlflow.register_model(mlflow_model_uri, model_name, tags=all_tags)
    log.info("registered job %s as %s version %s", job_id, model_name, mv.version)
    return _to_version(client.get_model_version(model_name, mv.version))


def set_alias(model_name: str, alias: str, version: str | int, *, tracking_uri: str | None = None) -> None:
    """Point ``alias`` (``candidate`` or ``champion``) at ``version``."""
    if alias not in ALIASES:
        raise ValueError(f"unknown alias {alias!r}; use one of {', '.join(ALIASES)}")
    _client(tracking_uri).set_registered_model_alias(model_name, alias, str(version))


def delete_alias(model_name: str, alias: str, *, tracking_uri: str | None = None) -> None:
    from mlflow.exceptions import MlflowException

    with contextlib.suppress(MlflowException):
        _client(tracking_uri).delete_registered_model_alias(model_name, alias)


def get_version_by_alias(model_name: str, alias: str, *, tracking_uri: str | None = None) -> ModelVersion | None:
    """The version behind ``alias``, or None when the model or the alias does not exist yet."""
    from mlflow.exceptions import MlflowException

    try:
        mv = _client(tracking_uri).get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None
    return _to_version(mv)


def get_version(model_name: str, version: str | int, *, tracking_uri: str | None = None) -> ModelVersion:
    return _to_version(_client(tracking_uri).get_model_version(model_name, str(version)))


def model_folder(
    version: ModelVersion, *, tracking_uri: str | None = None, download_dir: str | Path | None = None
) -> Path:
    """A local folder with the version's model: the job's folder when it is still there, else a download.

    A download is an MLflow model folder (``model/`` and ``components/tokenizer/``); the endpoint server and
    :func:`deployments.engine.find_hf_folders` accept both layouts.
    """
    if version.local_path is not None and Path(version.local_path).is_dir():
        return Path(version.local_path)
    kept = version.tags.get(TAG_MODEL_DIR)
    if kept and (Path(kept) / "config.json").is_file():
        return Path(kept)
    import mlflow.artifacts

    if download_dir is None:
        base = _sqlite_folder(tracking_uri)
        download_dir = (base / "downloads") if base else Path.home() / ".cache" / "finetune-phi" / "models"
    target = Path(download_dir) / version.name / version.version
    if (target / "MLmodel").is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    with _tracking(tracking_uri):
        path = mlflow.artifacts.download_artifacts(artifact_uri=version.uri, dst_path=str(target))
    return Path(path)


def _sqlite_folder(tracking_uri: str | None) -> Path | None:
    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///") :]).parent
    return None


__all__ = [
    "ALIASES",
    "delete_alias",
    "find_job_version",
    "get_version",
    "get_version_by_alias",
    "lineage_tags",
    "model_folder",
    "register_job_model",
    "set_alias",
]
