"""The flow's register step: the training job's model into the registry, with the ``candidate`` alias on it.

Registering before the gate keeps a rejected candidate's lineage in the registry too; only a model that passed the
gate and the whole rollout becomes ``champion`` (:mod:`tasks.rollout`).
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.backends import get_backend
from tasks.backends.base import ModelVersion
from tasks.config import Settings
from tasks.retry import with_step_retries

CANDIDATE = "candidate"


def register_candidate(settings: Settings, job_id: str, dataset: dict[str, Any]) -> ModelVersion:
    """Register the job's model (idempotent on the job) and point the ``candidate`` alias at it."""
    backend = get_backend(settings)
    tags = {"manifest_sha256": dataset["sha256"], "recipe": str(settings.training.recipe)}
    version = backend.register_model(job_id, tags)
    backend.set_alias(CANDIDATE, version)
    return version


@task(name="register-model", cache_policy=NO_CACHE, persist_result=False)
def register_task(settings: Settings, training: dict[str, Any], dataset: dict[str, Any]) -> ModelVersion:
    version = register_candidate(settings, training["job_id"], dataset)
    get_run_logger().info("registered %s version %s from job %s", version.name, version.version, training["job_id"])
    return version


def register_step(settings: Settings, training: dict[str, Any], dataset: dict[str, Any]) -> ModelVersion:
    """:data:`register_task` retried as a whole on transient faults, as ``settings.retry`` says."""
    return with_step_retries(register_task, settings.retry)(settings, training, dataset)


__all__ = ["CANDIDATE", "register_candidate", "register_step", "register_task"]
