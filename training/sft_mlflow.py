"""MLflow logging of a run: parameters, per-step metrics, ``model/`` logged from the saved folder (not reloaded)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sft_outputs import atomic_path

# What the serving side needs to load the logged model; MLflow's inference adds torchvision, which is absent.
MLFLOW_PIP_REQUIREMENTS = ["torch", "transformers>=5", "tokenizers", "accelerate", "safetensors"]


MLFLOW_RUN_FILE = "mlflow_run_id"


class MlflowRun:
    """The job's MLflow run; its id is kept in the output folder so a resumed job continues the same run."""

    def __init__(self, tracking_uri: str, experiment: str, output_dir: Path, run_name: str) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        id_file = output_dir / MLFLOW_RUN_FILE
        previous = id_file.read_text().strip() if id_file.is_file() else None
        # Inside an Azure ML job MLFLOW_RUN_ID names the job's own run: start_run() attaches to it.
        if not previous and not os.environ.get("MLFLOW_RUN_ID"):
            mlflow.set_experiment(experiment_id=experiment_id(tracking_uri, experiment))
        self.run = mlflow.start_run(run_id=previous) if previous else mlflow.start_run(run_name=run_name)
        self.run_id = self.run.info.run_id
        output_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(id_file) as tmp:
            tmp.write_text(self.run_id + "\n")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def log_params(self, params: dict[str, Any]) -> None:
        existing = self.mlflow.get_run(self.run_id).data.params
        fresh = {k: v for k, v in params.items() if k not in existing}  # a resumed run must not re-log a param
        if fresh:
            self.mlflow.log_params(fresh)

    def log_model(self, model_dir: Path) -> str:
        """Log the saved folder by path (weights copied, not loaded into memory); return the model URI."""
        with pipeline_impl_as_class():
            info = self.mlflow.transformers.log_model(
                transformers_model=str(model_dir),
                name="model",
                task="text-generation",
                pip_requirements=list(MLFLOW_PIP_REQUIREMENTS),
            )
        return info.model_uri

    def log_result(self, metrics: dict[str, Any], model_dir: Path, loss_curve: Path) -> dict[str, str]:
        """Log the numbers of ``metrics``, ``model/`` (from the folder) and the loss curve, then end the run;
        returns the MLflow ids for ``metrics.json``."""
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        self.log_metrics(numbers, step=metrics["steps"])
        model_uri = self.log_model(model_dir)
        self.mlflow.log_artifact(str(loss_curve))
        self.end()
        return {"mlflow_model_uri": model_uri, "mlflow_run_id": self.run_id}

    def end(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


def sqlite_artifact_location(tracking_uri: str) -> str | None:
    """``artifacts/`` beside a SQLite store's file (as ``tasks/registry.py`` does), None for any other store.

    MLflow's default artifact root for a SQLite store is ``./mlruns`` of the process's working folder, which for a
    job is this code folder: every model logged from it would land in ``training/mlruns/``."""
    if not tracking_uri.startswith("sqlite:///"):
        return None  # a tracking server or Azure ML has its own artifact store
    return (Path(tracking_uri[len("sqlite:///") :]).resolve().parent / "artifacts").as_uri()


def experiment_id(tracking_uri: str, name: str) -> str:
    """The experiment's id; a new one gets its artifacts in the tracking store's own place, never ``./mlruns``."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=sqlite_artifact_location(tracking_uri))
    except MlflowException:  # another process created it in between
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


@contextlib.contextmanager
def pipeline_impl_as_class() -> Iterator[None]:
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


def run_params(script_args: Any, training_args: Any, model_args: Any) -> dict[str, Any]:
    keys = (
        "learning_rate", "lr_scheduler_type", "warmup_steps", "num_train_epochs", "max_steps",
        "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "packing", "padding_free",
        "assistant_only_loss", "bf16", "activation_checkpointing", "weight_decay", "seed", "save_steps",
    )  # fmt: skip
    params: dict[str, Any] = {k: getattr(training_args, k) for k in keys}
    params.update(
        {
            "model_name_or_path": "tiny (built from the training split)"
            if script_args.build_tiny_model
            else model_args.model_name_or_path,
            "use_peft": model_args.use_peft,
            "recipe": script_args.recipe_name,
            "manifest_sha256": script_args.manifest_sha256,
        }
    )
    if model_args.use_peft:
        params.update({"lora_r": model_args.lora_r, "lora_alpha": model_args.lora_alpha})
    return {k: str(v) for k, v in params.items() if v is not None}


__all__ = [
    "MLFLOW_PIP_REQUIREMENTS",
    "MLFLOW_RUN_FILE",
    "MlflowRun",
    "experiment_id",
    "pipeline_impl_as_class",
    "run_params",
    "sqlite_artifact_location",
]
