"""The blue/green rollout as one Prefect transaction: :func:`run_rollout`, and the flow's :func:`rollout_step`."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger
from prefect.transactions import transaction

from tasks.backends.base import Backend, BackendError, ModelVersion
from tasks.config import Settings
from tasks.guardrails.picture import publish_rollout_picture
from tasks.guardrails.plan import traffic_plan
from tasks.guardrails.step import Watch, arm_rescue, disarm_rescue, metrics_source_of
from tasks.rollout.approval import await_approval, check_approval_possible
from tasks.rollout.reconcile import retire_old
from tasks.rollout.result import CHAMPION, RolloutFailed, RolloutResult, read_rollback, rollback_state
from tasks.rollout.steps import (
    StepCheck,
    can_mirror,
    check_step_task,
    create_deployment_task,
    default_step_check,
    end_mirror_task,
    mirror_task,
    pinned_smoke_task,
    promote_task,
    reconcile_task,
    shift_traffic_task,
    wait_ready_task,
)
from tasks.rollout.traffic import fresh_name, is_live, live_traffic


def run_rollout(
    backend: Backend,
    version: ModelVersion,
    settings: Settings,
    check: StepCheck = default_step_check,
    force: bool = False,
) -> RolloutResult:
    """Roll ``version`` out blue/green. Call inside a flow. Raises :class:`RolloutFailed` after rolling back.

    When the version is already live with all traffic the rollout is skipped, unless ``force`` (``--refresh
    deploy``) asks for a fresh deployment of it.
    """
    refuse_impossible(backend, settings)
    # Create the endpoint if missing (locally: start the server, which reloads its deployments); never delete it.
    backend.ensure_endpoint()
    champion = backend.get_model_by_alias(CHAMPION)
    actions = reconcile_task(backend, champion, settings)
    endpoint = backend.get_endpoint()
    before = live_traffic(endpoint)
    result = RolloutResult(
        version.version, fresh_name(endpoint, version.version), False, before, before, reconcile=actions,
        previous_champion=champion.version if champion else None,
    )  # fmt: skip
    if is_live(endpoint, version.version) and not force:
        return _already_live(backend, version, champion, result)
    watch = _watch(backend, settings, result)
    try:
        with transaction() as txn:
            txn.set("backend", backend)
            txn.set("new_deployment", result.deployment)
            txn.set("previous_traffic", before)
            txn.set("previous_champion", champion)
            _transaction_steps(backend, version, settings, check, result, watch)
    except Exception as exc:
        disarm_rescue(backend)
        result.steps = watch.steps  # the failed step too: its numbers say why
        result.live = publish_rollout_picture(watch, result, settings)
        result.rollback = read_rollback(backend)
        failed = RolloutFailed(
            f"rollout of model v{version.version} rolled back "
            f"({rollback_state(result.rollback, result.deployment)}): {exc}"
        )
        failed.rollout = result
        raise failed from exc
    disarm_rescue(backend)
    result.live = publish_rollout_picture(watch, result, settings)
    result.traffic_after = live_traffic(backend.get_endpoint())
    try:
        result.retired = retire_old(backend, result.deployment, settings.rollout.keep_previous, settings)
    except BackendError as exc:  # the rollout succeeded; an old deployment left over is not a failure
        get_run_logger().warning("could not retire old deployments (%s); they stay at 0 traffic", exc)
    return result


def refuse_impossible(backend: Backend, settings: Settings) -> None:
    """Refuse, before anything changes, a mirror the backend cannot make or an approval nobody could give."""
    mirror = settings.rollout.mirror_percent
    if mirror and not can_mirror(backend):
        raise RolloutFailed(
            f"rollout.mirror_percent is {mirror} but the {backend.name} backend cannot "
            "mirror traffic (only Azure ML endpoints can); set rollout.mirror_percent to 0"
        )
    check_approval_possible(settings)


def _already_live(
    backend: Backend, version: ModelVersion, champion: ModelVersion | None, result: RolloutResult
) -> RolloutResult:
    """Nothing to roll out: the version takes all traffic already; the champion alias follows it if it lagged."""
    result.deployment = next(iter(result.traffic_before))
    get_run_logger().info(
        "model v%s is already live on %s with all traffic: nothing to roll out", version.version, result.deployment
    )
    if champion is None or champion.version != version.version:
        backend.set_alias(CHAMPION, version)
    result.skipped = True
    return result


def _watch(backend: Backend, settings: Settings, result: RolloutResult) -> Watch:
    """What the bakes watch: the backend's live metrics, the new deployment and the one that had the traffic.
    A first rollout has no live traffic and no champion to compare with: its probes decide, no source is read."""
    before = result.traffic_before
    baking = bool(before) and (settings.rollout.bake_s > 0 or settings.rollout.final_bake_s > 0)
    champion = max(before, key=before.__getitem__) if before else None
    watch = Watch(metrics_source_of(backend) if baking else None, result.deployment, champion)
    watch.begin_baseline()  # the champion takes all traffic until the first step
    return watch


def _transaction_steps(
    backend: Backend,
    version: ModelVersion,
    settings: Settings,
    check: StepCheck,
    result: RolloutResult,
    watch: Watch,
) -> None:
    """Create, wait, mirror, pinned smoke test, approval, traffic steps, promotion: recording into ``result``."""
    name, before, mirror = result.deployment, result.traffic_before, settings.rollout.mirror_percent
    create_deployment_task(backend, name, version, settings)
    wait_ready_task(backend, name, settings.rollout.ready_timeout_s)
    # Mirroring copies live traffic: on a first rollout there is none to copy.
    if mirror and before:
        mirror_task(backend, name, settings)
        result.mirror = {"percent": mirror, "duration_s": settings.rollout.mirror_duration_s, "deployment": name}
    elif mirror:
        get_run_logger().info("rollout.mirror_percent is set but no live traffic to mirror yet (a first rollout)")
    result.pinned_smoke = pinned_smoke_task(backend, name, settings)
    if result.mirror:
        end_mirror_task(backend, settings)
    if settings.rollout.require_approval:
        await_approval(name, settings)
    # Steps below the 100% mark only make sense when there is a live deployment to share traffic with.
    steps = traffic_plan(settings.rollout) if before else [100]
    result.strategy = f"{settings.rollout.strategy} {steps}"
    watch.end_baseline(settings.rollout.alarms.min_requests)
    for percent in steps:
        # Armed before the shift: a user's request may reach the new deployment as soon as traffic moves.
        rescued = arm_rescue(backend, watch, settings, percent)
        weights = shift_traffic_task(backend, name, percent, settings)
        check_step_task(backend, name, percent, weights, settings, check, watch, rescued)
        result.steps = watch.steps
    promote_task(backend, version, settings)


def rollout_step(
    backend: Backend, version: ModelVersion, decision: dict[str, Any], settings: Settings, force: bool = False
) -> tuple[dict[str, Any] | None, RolloutFailed | None]:
    """The flow's rollout step: roll a promoted candidate out (a rejected one leaves the champion serving).

    Returns what the rollout did and, when it failed, the :class:`RolloutFailed` for the flow to raise once the run's
    summary (what the rollback left) is published."""
    if not decision["promote"]:
        get_run_logger().warning(
            "the candidate was not promoted (%s): checking that the champion serves", decision["reason"]
        )
        return None, None
    try:
        return run_rollout(backend, version, settings, force=force).to_dict(), None
    except RolloutFailed as exc:
        return (exc.rollout.to_dict() if exc.rollout is not None else None), exc


__all__ = ["refuse_impossible", "rollout_step", "run_rollout"]
