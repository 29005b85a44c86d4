"""Blue/green rollout with rollback, on any :class:`~tasks.backends.base.Backend`.

Deployment names are ``model-v<registry version>`` (e.g. ``model-v3``): the name says which model a deployment
serves, so a re-run can tell "already live" from "unfinished", and keeping the N previous deployments needs no
bookkeeping. (Plain ``blue``/``green`` slots cannot keep more than one previous deployment; ``v3`` alone is too
short for Azure ML, whose deployment names need 3 to 32 characters.)

The order of a rollout, each step a Prefect task inside one transaction:

1. reconcile: bring the endpoint back to what the ``champion`` alias says (a crash mid-rollout leaves traffic
   split and a deployment nobody owns; the alias only moves after a rollout completed);
2. create the new deployment next to the live one (traffic 0) and wait until it is ready;
3. optionally (``rollout.mirror_percent``, azureml only) mirror that share of live traffic to it for
   ``rollout.mirror_duration_s`` (its answers are discarded: users see only the live deployment's), so it meets
   real load before any user depends on it; the mirror is dropped before live traffic moves;
4. smoke-test it pinned with the ``azureml-model-deployment`` header (after the mirror window, while still
   mirrored): no traffic moves to a deployment that failed this;
   with ``rollout.require_approval``, the flow run then pauses until a person resumes it (``await_approval``);
5. shift traffic in steps (``rollout.strategy``: the explicit ``rollout.traffic_steps``, default 10/50/100,
   ``all_at_once``, ``canary`` or ``linear``); each step bakes for ``rollout.bake_s`` (``final_bake_s`` at 100%,
   while the old deployment still exists) with live alarms on both deployments' own requests, rolling back the
   moment one fires (:mod:`tasks.guardrails`); without a bake, or with too little live traffic, a pinned smoke
   test and an error-rate check of unpinned requests (what users get at that split) decide;
6. move the ``champion`` alias; after the transaction commits, retire older deployments beyond
   ``rollout.keep_previous``.

Any failure once the new deployment exists rolls the transaction back: the ``on_rollback`` hooks restore the
previous traffic weights and delete the new deployment; the alias stays; the flow run fails with the reason.
The endpoint itself is never deleted.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.transactions import Transaction, get_transaction, transaction

from tasks.backends.base import Backend, BackendError, DeploymentFailedError, EndpointInfo, ModelVersion
from tasks.config import Settings, SmokeConfig
from tasks.guardrails.picture import publish_rollout_picture
from tasks.guardrails.plan import traffic_plan
from tasks.guardrails.step import Watch, arm_rescue, disarm_rescue, judge_step, metrics_source_of
from tasks.retry import call_with_retry
from tasks.smoke import SmokeReport, smoke_endpoint

DEPLOYMENT_PREFIX = "model-v"
CHAMPION = "champion"
_LOG = logging.getLogger("finetune_phi.rollout")


class RolloutFailed(BackendError):
    """The new deployment failed a check; traffic and alias were restored.

    Raised by :func:`run_rollout` with ``rollout`` set: what the rollout did up to the failure and what the
    rollback left (``rollout.rollback``), so a failed run's summary can say so. An attribute, not an ``__init__``
    argument, so the exception still pickles (Prefect stores it as the failed state's result)."""

    rollout: RolloutResult | None = None


def deployment_name(version: str, redeploy: int = 0) -> str:
    """``model-v3``; a forced redeploy of a version already live gets ``model-v3-1``, ``model-v3-2``..."""
    return f"{DEPLOYMENT_PREFIX}{version}" + (f"-{redeploy}" if redeploy else "")


_NAME = re.compile(rf"^{DEPLOYMENT_PREFIX}(\d+)(?:-(\d+))?$")


def version_of(name: str) -> int | None:
    """The registry version a deployment name stands for, or None for a name we did not make."""
    match = _NAME.match(name)
    return int(match.group(1)) if match else None


def fresh_name(endpoint: EndpointInfo | None, version: str) -> str:
    """A deployment name for ``version`` not taken on the endpoint."""
    taken = {d.name for d in endpoint.deployments} if endpoint else set()
    n = 0
    while deployment_name(version, n) in taken:
        n += 1
    return deployment_name(version, n)


def _deployments_of(endpoint: EndpointInfo | None, version: str) -> set[str]:
    if endpoint is None:
        return set()
    return {d.name for d in endpoint.deployments if version_of(d.name) == int(version)}


def live_traffic(endpoint: EndpointInfo | None) -> dict[str, int]:
    """Traffic weights without the zero entries."""
    return {} if endpoint is None else {k: int(v) for k, v in endpoint.traffic.items() if int(v) > 0}


def is_live(endpoint: EndpointInfo | None, version: str) -> bool:
    """True when this model version already takes all traffic on one ready deployment."""
    if endpoint is None or not version.isdigit():
        return False
    traffic = live_traffic(endpoint)
    ready = {d.name for d in endpoint.deployments if d.state == "ready"}
    return len(traffic) == 1 and next(iter(traffic)) in ready & _deployments_of(endpoint, version)


def split_traffic(previous: dict[str, int], new: str, percent: int) -> dict[str, int]:
    """Give ``new`` ``percent`` and share the rest among the previous deployments in proportion (sums to 100)."""
    previous = {k: v for k, v in previous.items() if v > 0 and k != new}
    if not previous or percent >= 100:
        return {new: 100}
    rest = 100 - percent
    total = sum(previous.values())
    exact = {k: rest * v / total for k, v in previous.items()}
    shares = {k: int(x) for k, x in exact.items()}
    # Largest remainder, so the integer weights still sum to 100.
    for k in sorted(exact, key=lambda k: exact[k] - shares[k], reverse=True)[: rest - sum(shares.values())]:
        shares[k] += 1
    return {**{k: v for k, v in shares.items() if v > 0}, new: percent}


def full_traffic(endpoint: EndpointInfo | None, weights: dict[str, int]) -> dict[str, int]:
    """Weights for every existing deployment (zeros included), so replace and merge semantics agree."""
    names = [d.name for d in endpoint.deployments] if endpoint else []
    return {**dict.fromkeys(names, 0), **weights}


@dataclass
class ReconcileReport:
    actions: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.actions)


def reconcile(backend: Backend, champion: ModelVersion | None, settings: Settings) -> ReconcileReport:
    """Make the endpoint agree with the ``champion`` alias after a crash; a no-op on a consistent endpoint.

    Consistent means: all traffic on the champion's ready deployment, and no deployment newer than the champion
    (those are unfinished rollouts) or in a failed state.
    """
    policy = settings.retry
    report = ReconcileReport()
    endpoint = call_with_retry(backend.get_endpoint, policy=policy, what="get endpoint")
    if endpoint is None:
        return report
    states = {d.name: d.state for d in endpoint.deployments}
    champion_version = int(champion.version) if champion and champion.version.isdigit() else None
    traffic_now = live_traffic(endpoint)
    candidates = [n for n in _deployments_of(endpoint, champion.version) if states[n] == "ready"] if champion else []
    # Of several deployments of the champion's version (a redeploy cut short), keep the one with most traffic.
    champion_name = max(candidates, key=lambda n: (traffic_now.get(n, 0), -len(n)), default=None)

    if champion_name:
        if live_traffic(endpoint) != {champion_name: 100}:
            call_with_retry(
                backend.set_traffic, full_traffic(endpoint, {champion_name: 100}), policy=policy, what="set traffic"
            )
            report.actions.append(f"traffic {live_traffic(endpoint)} -> {{{champion_name}: 100}}")
        for name, state in states.items():
            version = version_of(name)
            unfinished = version is not None and champion_version is not None and version >= champion_version
            if name != champion_name and (unfinished or state in ("failed", "creating")):
                call_with_retry(backend.delete_deployment, name, policy=policy, what=f"delete deployment {name}")
                report.actions.append(f"deleted {name} ({'unfinished rollout' if unfinished else state})")
        return report

    if champion is None:
        # No rollout ever completed: whatever exists is left over from an unfinished first rollout.
        ours = [name for name in states if version_of(name) is not None]
        if ours and live_traffic(endpoint):
            call_with_retry(backend.set_traffic, full_traffic(endpoint, {}), policy=policy, what="clear traffic")
            report.actions.append("traffic cleared (no champion yet)")
        for name in ours:
            call_with_retry(backend.delete_deployment, name, policy=policy, what=f"delete deployment {name}")
            report.actions.append(f"deleted {name} (unfinished first rollout)")
        return report

    # The champion's deployment is gone or broken: keep traffic on ready deployments only, and say so.
    ready = {n for n, s in states.items() if s == "ready"}
    traffic = live_traffic(endpoint)
    if any(n not in ready for n in traffic) and ready:
        keep = max(ready, key=lambda n: version_of(n) or -1)
        call_with_retry(backend.set_traffic, full_traffic(endpoint, {keep: 100}), policy=policy, what="set traffic")
        report.actions.append(f"champion deployment {champion_name} missing; traffic -> {{{keep}: 100}}")
    for name, state in states.items():
        if state in ("failed", "creating") and name not in live_traffic(backend.get_endpoint()):
            call_with_retry(backend.delete_deployment, name, policy=policy, what=f"delete deployment {name}")
            report.actions.append(f"deleted {name} ({state})")
    return report


def retire_old(backend: Backend, live: str, keep: int, settings: Settings) -> list[str]:
    """Delete our zero-traffic deployments beyond the ``keep`` newest ones (never the live one)."""
    endpoint = call_with_retry(backend.get_endpoint, policy=settings.retry, what="get endpoint")
    if endpoint is None:
        return []
    traffic = live_traffic(endpoint)
    old = sorted(
        (d.name for d in endpoint.deployments if d.name != live and d.name not in traffic and version_of(d.name)),
        key=lambda n: version_of(n) or 0,
        reverse=True,
    )
    retired = old[keep:]
    for name in retired:
        call_with_retry(backend.delete_deployment, name, policy=settings.retry, what=f"delete deployment {name}")
    return retired


def default_step_check(
    backend: Backend, settings: Settings, new: str, percent: int, smoke: SmokeConfig | None = None
) -> tuple[SmokeReport, SmokeReport]:
    """The pinned smoke test of the new deployment and ``rollout.requests_per_step`` unpinned requests."""
    smoke = smoke or settings.smoke
    endpoint = backend.get_endpoint()
    if endpoint is None:
        raise RolloutFailed(f"endpoint {settings.endpoint.name!r} disappeared during the rollout")
    key = backend.scoring_key()
    name = getattr(backend, "name", settings.backend)
    pinned = smoke_endpoint(endpoint, key, smoke, name, deployment=new)
    prompts = [smoke.prompts[i % len(smoke.prompts)] for i in range(settings.rollout.requests_per_step)]
    unpinned = smoke_endpoint(endpoint, key, smoke, name, prompts=prompts)
    return pinned, unpinned


StepCheck = Callable[[Backend, Settings, str, int], tuple[SmokeReport, SmokeReport]]


@dataclass
class Rollback:
    """The endpoint and the alias as read back after the ``on_rollback`` hooks ran, not as the hooks meant them."""

    traffic: dict[str, int] | None  # live weights; None when the endpoint could not be read
    deployments: list[str]  # the endpoint's deployments after the rollback
    champion: str | None  # the version the champion alias points at (None: no champion)
    error: str | None = None  # why the state could not be read back


def read_rollback(backend: Backend) -> Rollback:
    """What a failed rollout left. Never raises: the flow must still fail with the rollout's reason."""
    try:
        endpoint = backend.get_endpoint()
        champion = backend.get_model_by_alias(CHAMPION)
    except Exception as exc:
        return Rollback(None, [], None, f"{type(exc).__name__}: {exc}")
    names = sorted(d.name for d in endpoint.deployments) if endpoint else []
    return Rollback(live_traffic(endpoint), names, champion.version if champion else None)


def _rollback_state(rollback: Rollback, deployment: str) -> str:
    """What the rollback left, as read back (not as the hooks meant it), for the failure's message."""
    if rollback.traffic is None:
        return f"the endpoint could not be read back: {rollback.error}"
    gone = "deleted" if deployment not in rollback.deployments else "STILL THERE"
    champion = f"v{rollback.champion}" if rollback.champion else "none"
    return f"traffic now {rollback.traffic or 'none'}, deployment {deployment} {gone}, champion {champion}"


@dataclass
class RolloutResult:
    version: str
    deployment: str
    skipped: bool
    traffic_before: dict[str, int]
    traffic_after: dict[str, int]
    reconcile: list[str] = field(default_factory=list)
    pinned_smoke: dict[str, Any] | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)
    previous_champion: str | None = None
    mirror: dict[str, Any] | None = None  # {"percent", "duration_s", "deployment"} when traffic was mirrored
    strategy: str | None = None  # rollout.strategy, with the plan it gave: "canary [10, 100]"
    live: dict[str, Any] | None = None  # {"samples": [...], "alarm": {...} | None, "picture": path} of the bakes
    rollback: Rollback | None = None  # set when the rollout failed and was rolled back

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------- approval (a human)
def check_approval_possible(settings: Settings) -> None:
    """Refuse ``rollout.require_approval`` without a Prefect server, before anything changes: Prefect's temporary
    local engine ends with the run, so nobody could open the paused run to resume it."""
    from prefect.settings import get_current_settings

    if settings.rollout.require_approval and get_current_settings().api.url is None:
        raise RolloutFailed(
            "rollout.require_approval pauses the flow run for a person to resume in the Prefect UI, which needs a "
            "Prefect server: run `prefect server start`, `export PREFECT_API_URL=http://127.0.0.1:4200/api` and run "
            "again (or set rollout.require_approval to false)"
        )


def _approval_poll_s(timeout_s: int) -> int:
    # pause_flow_run asks the server every poll interval whether the run was resumed: 10 s suits an hour's wait,
    # a short timeout needs a shorter poll or a resume would be seen only after it.
    return max(1, min(10, timeout_s // 20))


def _run_again_after_expired_pause(flow_run_id: Any) -> None:
    """Once a pause has expired the server lets the run out of Paused only into Failed, and a flow run that is not
    Running may start no task; forced back to Running, the rollback and the run summary still run, then the flow
    run fails with the reason."""
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Running(message="approval timed out: rolling back"), force=True)


def await_approval(name: str, settings: Settings) -> None:
    """Pause the flow run until a person resumes it (the UI's Resume button, or ``resume_flow_run``).

    Raises :class:`RolloutFailed` when nobody does within ``rollout.approval_timeout_s``; called inside the
    rollout's transaction, that rolls the new deployment back."""
    from prefect.context import FlowRunContext
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run
    from prefect.settings import PREFECT_UI_URL

    timeout = settings.rollout.approval_timeout_s
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        raise RolloutFailed("rollout.require_approval needs the rollout to run inside a Prefect flow run")
    run_id = context.flow_run.id
    get_run_logger().warning(
        "deployment %s is up and passed its smoke test; no traffic moves until a person approves. Resume flow run "
        "%s within %d s in the Prefect UI (%s/runs/flow-run/%s) or with: python -c \"from prefect.flow_runs import "
        "resume_flow_run; resume_flow_run('%s')\"",
        name, run_id, timeout, PREFECT_UI_URL.value(), run_id, run_id,
    )  # fmt: skip
    try:
        pause_flow_run(timeout=timeout, poll_interval=_approval_poll_s(timeout))
    except FlowPauseTimeout:
        _run_again_after_expired_pause(run_id)
        raise RolloutFailed(
            f"nobody approved deployment {name} within rollout.approval_timeout_s={timeout} s; no traffic moved"
        ) from None
    get_run_logger().info("deployment %s approved: shifting traffic", name)


# ---------------------------------------------------------------- Prefect tasks and their undo hooks
# The hooks find the backend and the weights to restore in the enclosing transaction (``txn.get``), set by
# :func:`run_rollout` before any side effect. A hook never raises: a raising hook would stop Prefect from running
# the remaining ones; what it cannot undo, the next run's reconcile step repairs.


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
    call_with_retry(backend.ensure_endpoint, policy=settings.retry, what="ensure endpoint")
    call_with_retry(backend.create_deployment, name, version, policy=settings.retry, what=f"create deployment {name}")
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
    info = backend.wait_deployment_ready(name, timeout_s)
    if info.state != "ready":
        raise DeploymentFailedError(f"deployment {name} is {info.state}: {info.error or 'no reason given'}")
    return info.state


def can_mirror(backend: Backend) -> bool:
    """Mirroring is not part of the Backend protocol: only Azure ML endpoints mirror traffic."""
    return callable(getattr(backend, "set_mirror_traffic", None))


@task(name="mirror-traffic", cache_policy=NO_CACHE, persist_result=False)
def mirror_task(
    backend: Backend, name: str, settings: Settings, sleep: Callable[[float], None] = time.sleep
) -> dict[str, int]:
    """Mirror ``rollout.mirror_percent`` of live traffic to ``name`` and hold it for ``rollout.mirror_duration_s``.

    Azure ML sends the copies and discards the new deployment's answers; we cannot read them, so the window's
    verdict is the pinned smoke test that follows (the deployment still answers, and answers well, after meeting
    real load) plus what the deployment's metrics in Azure Monitor show a person watching."""
    percent, hold = settings.rollout.mirror_percent, settings.rollout.mirror_duration_s
    mirrored = call_with_retry(
        backend.set_mirror_traffic, name, percent, policy=settings.retry, what=f"mirror traffic to {name}"
    )
    get_run_logger().info(
        "mirroring %d%% of live traffic to %s for %.0f s (its answers are discarded)", percent, name, hold
    )
    sleep(hold)
    return mirrored


@mirror_task.on_rollback
def _drop_mirror(txn: Transaction) -> None:
    backend: Backend = txn.get("backend")
    try:
        backend.set_mirror_traffic(None)  # type: ignore[attr-defined]
    except Exception as exc:  # deleting the deployment drops its mirror too (the next hook)
        _hook_logger(txn).error("could not stop mirroring traffic (%s); deleting the deployment stops it", exc)


@task(name="end-mirror", cache_policy=NO_CACHE, persist_result=False)
def end_mirror_task(backend: Backend, settings: Settings) -> dict[str, int]:
    """Stop mirroring before live traffic moves (Azure ML refuses live and mirrored traffic on one deployment)."""
    return call_with_retry(backend.set_mirror_traffic, None, policy=settings.retry, what="stop mirroring traffic")


@task(name="pinned-smoke-test", cache_policy=NO_CACHE, persist_result=False)
def pinned_smoke_task(backend: Backend, name: str, settings: Settings) -> dict[str, Any]:
    endpoint = call_with_retry(backend.get_endpoint, policy=settings.retry, what="get endpoint")
    if endpoint is None:
        raise RolloutFailed(f"endpoint {settings.endpoint.name!r} disappeared during the rollout")
    backend_name = getattr(backend, "name", settings.backend)
    report = smoke_endpoint(endpoint, backend.scoring_key(), settings.smoke, backend_name, deployment=name)
    get_run_logger().info(report.summary())
    if not report.passed:
        raise RolloutFailed(f"the new deployment failed its pinned smoke test; no traffic moved: {report.summary()}")
    return report.to_dict()


@task(name="shift-traffic", cache_policy=NO_CACHE, persist_result=False)
def shift_traffic_task(backend: Backend, name: str, percent: int, settings: Settings) -> dict[str, int]:
    previous: dict[str, int] = get_transaction().get("previous_traffic")
    endpoint = call_with_retry(backend.get_endpoint, policy=settings.retry, what="get endpoint")
    weights = split_traffic(previous, name, percent)
    call_with_retry(backend.set_traffic, full_traffic(endpoint, weights), policy=settings.retry, what="set traffic")
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
) -> dict[str, Any]:
    """Bake the step with live alarms (:mod:`tasks.guardrails`); the probes decide without a bake or traffic.
    With ``rollout.rescue`` the champion answers what the new deployment fails meanwhile (local backend)."""
    rescued = arm_rescue(backend, watch, settings, percent)
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
    call_with_retry(backend.set_alias, CHAMPION, version, policy=settings.retry, what="set champion alias")
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
    logger = get_run_logger()
    mirror = settings.rollout.mirror_percent
    if mirror and not can_mirror(backend):
        raise RolloutFailed(
            f"rollout.mirror_percent is {mirror} but the {getattr(backend, 'name', settings.backend)} backend cannot "
            "mirror traffic (only Azure ML endpoints can); set rollout.mirror_percent to 0"
        )
    check_approval_possible(settings)
    # Create the endpoint if missing (locally: start the server, which reloads its deployments); never delete it.
    call_with_retry(backend.ensure_endpoint, policy=settings.retry, what="ensure endpoint")
    champion = call_with_retry(backend.get_model_by_alias, CHAMPION, policy=settings.retry, what="get champion")
    actions = reconcile_task(backend, champion, settings)
    endpoint = call_with_retry(backend.get_endpoint, policy=settings.retry, what="get endpoint")
    before = live_traffic(endpoint)
    name = fresh_name(endpoint, version.version)
    result = RolloutResult(
        version.version, name, False, before, before, reconcile=actions,
        previous_champion=champion.version if champion else None,
    )  # fmt: skip
    if is_live(endpoint, version.version) and not force:
        name = next(iter(before))
        logger.info("model v%s is already live on %s with all traffic: nothing to roll out", version.version, name)
        if champion is None or champion.version != version.version:
            call_with_retry(backend.set_alias, CHAMPION, version, policy=settings.retry, what="set champion alias")
        result.skipped = True
        result.deployment = name
        return result

    # Steps below the 100% mark only make sense when there is a live deployment to share traffic with.
    steps = traffic_plan(settings.rollout) if before else [100]
    result.strategy = f"{settings.rollout.strategy} {steps}"
    # Bakes watch users' requests next to the champion's: a first rollout has neither, its probes decide.
    baking = bool(before) and (settings.rollout.bake_s > 0 or settings.rollout.final_bake_s > 0)
    watch = Watch(
        metrics_source_of(backend) if baking else None, name, max(before, key=before.__getitem__) if before else None
    )
    try:
        with transaction() as txn:
            txn.set("backend", backend)
            txn.set("new_deployment", name)
            txn.set("previous_traffic", before)
            txn.set("previous_champion", champion)
            create_deployment_task(backend, name, version, settings)
            wait_ready_task(backend, name, settings.rollout.ready_timeout_s)
            # Mirroring copies live traffic: on a first rollout there is none to copy.
            if mirror and before:
                mirror_task(backend, name, settings)
                result.mirror = {
                    "percent": mirror,
                    "duration_s": settings.rollout.mirror_duration_s,
                    "deployment": name,
                }
            elif mirror:
                logger.info(
                    "rollout.mirror_percent is set but no deployment takes live traffic yet: nothing to mirror"
                )
            result.pinned_smoke = pinned_smoke_task(backend, name, settings)
            if result.mirror:
                end_mirror_task(backend, settings)
            if settings.rollout.require_approval:
                await_approval(name, settings)
            for percent in steps:
                weights = shift_traffic_task(backend, name, percent, settings)
                check_step_task(backend, name, percent, weights, settings, check, watch)
                result.steps = watch.steps
            promote_task(backend, version, settings)
    except Exception as exc:
        disarm_rescue(backend)
        result.steps = watch.steps  # the failed step too: its numbers say why
        result.live = publish_rollout_picture(watch, result, settings)
        result.rollback = read_rollback(backend)
        failed = RolloutFailed(
            f"rollout of model v{version.version} rolled back ({_rollback_state(result.rollback, name)}): {exc}"
        )
        failed.rollout = result
        raise failed from exc
    disarm_rescue(backend)
    result.live = publish_rollout_picture(watch, result, settings)
    after = call_with_retry(backend.get_endpoint, policy=settings.retry, what="get endpoint")
    result.traffic_after = live_traffic(after)
    try:
        result.retired = retire_old(backend, name, settings.rollout.keep_previous, settings)
    except BackendError as exc:  # the rollout succeeded; an old deployment left over is not a failure
        logger.warning("could not retire old deployments (%s); they stay at 0 traffic", exc)
    return result


__all__ = [
    "CHAMPION",
    "Rollback",
    "RolloutFailed",
    "RolloutResult",
    "await_approval",
    "can_mirror",
    "check_approval_possible",
    "default_step_check",
    "deployment_name",
    "is_live",
    "reconcile",
    "retire_old",
    "run_rollout",
    "split_traffic",
    "version_of",
]
