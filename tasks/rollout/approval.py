"""A person's approval before traffic moves (``rollout.require_approval``): pause the flow run until resumed."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger

from tasks.config import Settings
from tasks.rollout.result import RolloutFailed


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


__all__ = ["await_approval", "check_approval_possible"]
