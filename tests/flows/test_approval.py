"""``rollout.require_approval`` against the session's real Prefect server: the flow run pauses until a person
resumes it; with no resume in time the step fails with the reason and the run can still run tasks (the rollback
and the run summary); without a server the setting is refused before anything changes.

The rollout that waits for approval before its first traffic shift on the real endpoint is in
test_finetune_deploy.py; here the approval on its own, which needs no model."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.flow_runs import resume_flow_run

from tasks.config import DataConfig, RolloutConfig, Settings
from tasks.rollout import RolloutFailed, await_approval, check_approval_possible
from tests.flows.conftest import wait_for_paused_run

FLOW = "approval-under-test"


def _settings(timeout_s: int) -> Settings:
    rollout = RolloutConfig(require_approval=True, approval_timeout_s=timeout_s)
    return Settings(data=DataConfig(path=Path("data/sample")), rollout=rollout)


@task(cache_policy=NO_CACHE, persist_result=False)
def _a_task_after() -> str:
    return "a task ran"


@flow(name=FLOW)
def _approval_flow(settings: Settings) -> str:
    try:
        await_approval("model-v9", settings)
    except RolloutFailed as exc:
        # What run_rollout and the flow do next: roll back, then publish the summary, a task.
        return f"{_a_task_after()} after: {exc}"
    return _a_task_after() + " after the approval"


def test_the_run_waits_paused_until_a_person_resumes_it(prefect_harness: str) -> None:
    done: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: done.update(state=_approval_flow(_settings(30), return_state=True)))
    runner.start()
    try:
        run_id = wait_for_paused_run(FLOW)
        assert "state" not in done, "the flow went on without an approval"
        resume_flow_run(run_id)
    finally:
        runner.join(timeout=60)
    assert done["state"].is_completed() and done["state"].result() == "a task ran after the approval"


def test_no_approval_in_time_fails_the_step_and_the_run_can_still_run_tasks(prefect_harness: str) -> None:
    state = _approval_flow(_settings(2), return_state=True)
    assert state.is_completed(), state
    answer = state.result()
    assert answer.startswith("a task ran after: nobody approved deployment model-v9 within")
    assert "rollout.approval_timeout_s=2 s; no traffic moved" in answer


def test_approval_without_a_prefect_server_is_refused_up_front(prefect_harness: str) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    check_approval_possible(_settings(30))  # the harness is a server
    with temporary_settings(restore_defaults={PREFECT_API_URL}), pytest.raises(RolloutFailed, match="server"):
        check_approval_possible(_settings(30))
    check_approval_possible(Settings(data=DataConfig(path=Path("data/sample"))))  # not asked for: fine
