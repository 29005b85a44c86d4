"""The flow's train step: the job spec from the config, submit and wait on the backend, the job's metrics.

:func:`train` is the plain function; :data:`train_task` caches it on the training key
(:func:`tasks.caching.training_cache_key`) and :func:`training_task` gives it this run's retries (transient faults
only: a failed or timed-out training is never retried). :func:`train_step` is what the flow calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from tasks.backends import get_backend
from tasks.backends.base import Backend, TrainingJobSpec
from tasks.caching import StepResult, content_key_fn, run_cached, training_cache_key
from tasks.config import Settings
from tasks.jobs import PollTiming, submit_training_job, wait_for_training_job
from tasks.retry import retry_condition_fn, with_step_retries


def train(
    settings: Settings,
    dataset: dict[str, Any],
    fresh: bool = False,
    *,
    backend: Backend | None = None,
    timing: PollTiming | None = None,
) -> dict[str, Any]:
    """Submit the training job with the dataset's files and wait for it; return its id, folder and metrics.

    Both steps are Prefect tasks of ``tasks/jobs.py``; ``backend`` and ``timing`` are for tests (a fake client, a
    fake clock)."""
    backend = backend or get_backend(settings)
    spec = TrainingJobSpec(
        recipe=Path(settings.training.recipe),
        train_file=Path(dataset["train_path"]),
        eval_file=Path(dataset["test_path"]),
        manifest_sha256=dataset["sha256"],
        overrides=dict(settings.training.overrides),
        experiment=settings.registry.model_name,
        # The store the backend registers from (local: the state folder's SQLite unless registry.tracking_uri), never
        # a MLFLOW_TRACKING_URI left in the environment by another state folder: the model is registered from there.
        tracking_uri=getattr(backend, "tracking_uri", None) or settings.registry.tracking_uri,
        fresh=fresh,
    )
    # No retry loop around the calls: a transient fault fails the attempt and train_task's retries submit again
    # (the same inputs find the same job), so the attempts stay those of settings.retry.
    job = submit_training_job(backend, spec)
    job = wait_for_training_job(backend, job.job_id, settings, timing)
    return {
        "job_id": job.job_id,
        "url": job.url,
        "output_dir": str(job.output_dir) if job.output_dir else None,
        "metrics": backend.job_metrics(job.job_id),
    }


@task(name="train-model", cache_key_fn=content_key_fn, persist_result=True, retry_condition_fn=retry_condition_fn)
def train_task(settings: Settings, dataset: dict[str, Any], content_key: str, fresh: bool = False) -> dict[str, Any]:
    return train(settings, dataset, fresh)


def training_task(settings: Settings, refresh: bool) -> Any:
    """``train_task`` as this run needs it: retries from ``settings.retry`` (transient faults only, never a training
    that failed or timed out) with our own jittered delays, and a timeout above the wait's own."""
    return with_step_retries(
        train_task, settings.retry, refresh_cache=refresh, timeout_seconds=settings.training.timeout_s + 120
    )


def train_step(settings: Settings, dataset: dict[str, Any], refresh: bool = False) -> StepResult:
    """The flow's train step, keyed on the manifest hash, the recipe, the training code and the overrides. A cached
    result whose job folder was deleted trains again."""
    return run_cached(
        training_task(settings, refresh),
        settings,
        dataset,
        training_cache_key(settings, dataset["sha256"]),
        refresh,
        refresh=refresh,
        still_valid=lambda training: not training.get("output_dir") or Path(training["output_dir"]).exists(),
        stale="the cached training result points at a deleted job folder",
    )


__all__ = ["train", "train_step", "train_task", "training_task"]
