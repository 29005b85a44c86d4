"""The rollout's steps as Prefect tasks, each with the ``on_rollback`` hook that undoes it.

The hooks find the backend and the weights to restore in the enclosing transaction (``txn.get``), set by
:func:`tasks.rollout.run.run_rollout` before any side effect. A hook never raises: a raising hook would stop Prefect
from running the remaining ones; what it cannot undo, the next run's reconcile step repairs. The tasks call the
backend directly: each backend retries its own transient transport faults, so no step adds attempts of its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.transactions import Transaction, get_transaction

from tasks.backends.base import Backend, MirroringBackend, ModelVersion
from tasks.config import Settings, SmokeConfig
from tasks.guardrails.step import Watch, judge_step
from tasks.rollout.reconcile import reconcile
from tasks.rollout.result import CHAMPION, RolloutFailed
from tasks.rollout.traffic import full_traffic, live_traffic, split_traffic
from tasks.smoke import SmokeReport, smoke_deployment

_LOG = logging.getLogger("finetune_phi.rollout")


def default_step_check(
    backend: Backend, settings: Settings, new: str, percent: int, smoke: SmokeConfig | None = None
) -> tuple[SmokeReport, SmokeReport]:
    """The pinned smoke test of the new deployment and ``rollout.requests_per_step`` unpinned requests."""
    smoke = smoke or settings.smoke
    pinned = smoke_deployment(backend, smoke, _endpoint_gone(settings), deployment=new)
    prompts = [smoke.prompts[i % len(smoke.prompts)] for i in range(settings.rollout.requests_per_step)]
    unpinned = smoke_deployment(backend, smoke, _endpoint_gone(settings), prompts=prompts)
    return pinned, unpinned


def _endpoint_gone(settings: Settings) -> RolloutFailed:
    return RolloutFailed(f"endpoint {settings.endpoint.name!r} disappeared during the rollout")


StepCheck = Callable[[Backend, Settings, str, int], tuple[SmokeReport, SmokeReport]]


def _hook_logger(txn: Transaction) -> logging.Logger | logging.LoggerAdapter:
    return txn.logger if txn.logger is not None else _LOG


@task(name="reconcile-endpoint", cache_policy=NO_CACHE, persist_result=False)
def reconcile_task(backend: Backend, champion: ModelVersion | None, settings: Settings) -> list[str]:
    report = reconcile(backend, champion, settings)
    if report.changed:
        get_run_logger().warning("reconciled the endpoint after an unfinished rollout: %s", "; ".join(report.actions))
    return report.actions


@task(name="create-deployment", cache_policy=NO_CACHE, persist_result=False)
def create_deployment_task(backend: Backend, name: str, version: ModelVersion, settings: Settings) -> str:
    """Create the new deployment at 0 traffic. A failed create cleans up after itself (via the hook below)."""
    backend.ensure_endpoint()
    backend.create_deployment(name, version)
    return name


@create_deployment_task.on_rollback
def _delete_new_deployment(txn: Transaction) -> None:
    backend: Backend = txn.get("backend")
    name: str = txn.get("new_deployment")
    previous: dict[str, int] = txn.get("previous_traffic")
    log = _hook_logger(txn)
    try:
        endpoint = backend.get_endpoint()
        if live_traffic(endpoint) != previous:
            backend.set_traffic(full_traffic(endpoint, previous))
        if endpoint is not None and any(d.name == name for d in endpoint.deployments):
            backend.delete_deployment(name)
        log.warning("rolled back: traffic %s restored, deployment %s deleted", previous, name)
    except Exception as exc:  # the reconcile step of the next run finishes the job
        log.error("rollback of deployment %s incomplete (%s); the next run's reconcile step repairs it", name, exc)


@task(name="wait-deployment-ready", cache_policy=NO_CACHE, persist_result=False)
def wait_ready_task(backend: Backend, name: str, timeout_s: float) -> str:
    """Wait for the new deployment; a failed one raises :class:`DeploymentFailedError` (every backend's contract)."""
    return backend.wait_deployment_ready(name, timeout_s).state


def can_mirror(backend: Backend) -> bool:
    """Whether the backend implements :class:`~tasks.backends.base.MirroringBackend` (Azure ML endpoints do)."""
    return isinstance(backend, MirroringBackend)


@task(name="mirror-traffic", cache_policy=NO_CACHE, persist_result=False)
def mirror_task(
    backend: MirroringBackend, name: str, settings: Settings, sleep: Callable[[float], None] = time.sleep
) -> dict[str, int]:
    """Mirror ``rollout.mirror_percent`` of live traffic to ``name`` and hold it for ``rollout.mirror_duration_s``.

    Azure ML sends the copies and discards the new deployment's answers; we cannot read them, so the window's
    verdict is the pinned smoke test that follows (the deployment still answers, and answers well, after meeting
    real load) plus what the deployment's metrics in Azure Monitor show a person watching."""
    percent, hold = settings.rollout.mirror_percent, settings.rollout.mirror_duration_s
    mirrored = backend.set_mirror_traffic(name, percent)
    get_run_logger().info(
        "mirroring %d%% of live traffic to %s for %.0f s (its answers are discarded)", percent, name, hold
    )
    sleep(hold)
    return mirrored


@mirror_task.on_rollback
def _drop_mirror(txn: Transaction) -> None:
    backend: MirroringBackend = txn.get("backend")
    try:
        backend.set_mirror_traffic(None)
    except Exception as exc:  # deleting the deployment drops its mirror too (the next hook)
        _hook_logger(txn).error("could not stop mirroring traffic (%s); deleting the deployment stops it", exc)


@task(name="end-mirror", cache_policy=NO_CACHE, persist_result=False)
def end_mirror_task(backend: MirroringBackend, settings: Settings) -> dict[str, int]:
    """Stop mirroring before live traffic moves (Azure ML refuses live and mirrored traffic on one deployment)."""
    return backend.set_mirror_traffic(None)


@task(name="pinned-smoke-test", cache_policy=NO_CACHE, persist_result=False)
def pinned_smoke_task(backend: Backend, name: str, settings: Settings) -> dict[str, Any]:
    report = smoke_deployment(backend, settings.smoke, _endpoint_gone(settings), deployment=name)
    get_run_logger().info(report.summary())
    if not report.passed:
        raise RolloutFailed(f"the new deployment failed its pinned smoke test; no traffic moved: {report.summary()}")
    return report.to_dict()


@task(name="shift-traffic", cache_policy=NO_CACHE, persist_result=False)
def shift_traffic_task(backend: Backend, name: str, percent: int, settings: Settings) -> dict[str, int]:
    previous: dict[str, int] = get_transaction().get("previous_traffic")
    endpoint = backend.get_endpoint()
    weights = split_traffic(previous, name, percent)
    backend.set_traffic(full_traffic(endpoint, weights))
    get_run_logger().info("traffic now %s", weights)
    return weights


@shift_traffic_task.on_rollback
def _restore_traffic(txn: Transaction) -> None:
    backend: Backend = txn.get("backend")
    previous: dict[str, int] = txn.get("previous_traffic")
    try:
        endpoint = backend.get_endpoint()
        if live_traffic(endpoint) != previous:
            backend.set_traffic(full_traffic(endpoint, previous))
    except Exception as exc:
        _hook_logger(txn).error("could not restore traffic %s (%s); the next run's reconcile step will", previous, exc)


def probe_step(
    backend: Backend, name: str, percent: int, settings: Settings, check: StepCheck
) -> tuple[bool, str, float]:
    """The synthetic probes of a step: the pinned smoke test and ``rollout.requests_per_step`` unpinned requests
    within ``rollout.max_error_rate``. Returns (passed, what they saw, the unpinned error rate)."""
    pinned, unpinned = check(backend, settings, name, percent)
    rate = unpinned.error_rate
    if not pinned.passed:
        return False, f"the pinned smoke test failed: {pinned.summary()}", rate
    if rate > settings.rollout.max_error_rate:
        return False, (
            f"the error rate was {rate:.0%} (rollout.max_error_rate {settings.rollout.max_error_rate:.0%}): "
            f"{unpinned.summary()}"
        ), rate  # fmt: skip
    return True, f"{pinned.summary()}; {unpinned.summary()}", rate


@task(name="check-traffic-step", cache_policy=NO_CACHE, persist_result=False)
def check_step_task(
    backend: Backend,
    name: str,
    percent: int,
    weights: dict[str, int],
    settings: Settings,
    check: StepCheck,
    watch: Watch,
    rescued: bool = False,
) -> dict[str, Any]:
    """Bake the step with live alarms (:mod:`tasks.guardrails`); the probes decide without a bake or traffic.
    ``rescued``: the rollout armed the rescue for this step before moving traffic (``rollout.rescue``, local
    backend), so the champion answers what the new deployment fails meanwhile."""
    step = judge_step(
        settings, percent, weights, watch, lambda: probe_step(backend, name, percent, settings, check),
        log=get_run_logger(),
    )  # fmt: skip
    step["rescue"] = rescued
    if not step["passed"]:
        raise RolloutFailed(step["reason"])
    return step


@task(name="promote-champion", cache_policy=NO_CACHE, persist_result=False)
def promote_task(backend: Backend, version: ModelVersion, settings: Settings) -> str:
    backend.set_alias(CHAMPION, version)
    return version.version


@promote_task.on_rollback
def _restore_alias(txn: Transaction) -> None:
    backend: Backend = txn.get("backend")
    previous: ModelVersion | None = txn.get("previous_champion")
    if previous is not None:
        try:
            backend.set_alias(CHAMPION, previous)
        except Exception as exc:
            _hook_logger(txn).error("could not move the champion alias back to v%s (%s)", previous.version, exc)


__all__ = [
    "StepCheck",
    "can_mirror",
    "check_step_task",
    "create_deployment_task",
    "default_step_check",
    "end_mirror_task",
    "mirror_task",
    "pinned_smoke_task",
    "promote_task",
    "reconcile_task",
    "shift_traffic_task",
    "wait_ready_task",
]
