"""Submit a training job and wait for it, on any backend, as the flow's Prefect tasks.

The wait polls with exponential backoff and jitter, streams every new log line to Prefect's logger once
(:meth:`Backend.job_log_since`, by byte offset), and cancels the job on every way out that is not the job's own end
(timeout, Ctrl-C, a Prefect cancel or task timeout). A failed training raises :class:`JobFailedError` with the
last log lines and is never retried.
"""

from __future__ import annotations

import logging
from typing import cast

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.backends.base import Backend, JobFailedError, JobInfo, JobStatus, TrainingJobSpec
from tasks.config import Settings
from tasks.logs import run_logger
from tasks.polling import PollTimeout, PollTiming, backoff, poll_until
from tasks.retry import is_worth_another_try_later, poll_policy


def _poll_status(backend: Backend, job_id: str, log: logging.Logger | logging.LoggerAdapter) -> JobInfo | None:
    """The job's status, or None after a transient fault (also one that outlasted the backend's own retries): a
    missed poll, retried by the next one. The wait's deadline, not an outage, decides when to give up on a job."""
    try:
        return backend.get_job(job_id)
    except Exception as exc:
        if not is_worth_another_try_later(exc):
            raise
        log.warning("could not read the status of training job %s for now (%s: %s)", job_id, type(exc).__name__, exc)
        return None


def _stream_log(backend: Backend, job_id: str, offset: int, log: logging.Logger | logging.LoggerAdapter) -> int:
    """Hand every log line written since ``offset`` to ``log`` once; returns the new offset.

    A log that cannot be read this time is no failure of the job: the next poll reads from the same offset."""
    try:
        lines, offset = backend.job_log_since(job_id, offset)
    except Exception as exc:
        log.debug("could not read the log of training job %s (%s: %s)", job_id, type(exc).__name__, exc)
        return offset
    for line in lines:
        if line.strip():
            log.info("[%s] %s", job_id, line)
    return offset


def _poll_until_terminal(backend: Backend, job_id: str, settings: Settings, timing: PollTiming) -> JobInfo:
    """Poll until the job reaches a terminal status, streaming its log; raise :class:`JobFailedError` at
    ``training.timeout_s``.

    The interval grows from ``training.poll_interval_s`` to a cap with jitter (:func:`tasks.retry.poll_policy`),
    and starts again from the bottom when the status changes, so a job that just started running is looked at soon.
    """
    log = run_logger()
    offset = 0

    def read() -> JobInfo | None:
        nonlocal offset
        job = _poll_status(backend, job_id, log)
        offset = _stream_log(backend, job_id, offset, log)
        return job

    try:
        job = poll_until(
            read,
            lambda job: job is not None and job.status.is_terminal,
            timeout_s=settings.training.timeout_s,
            schedule=backoff(poll_policy(settings.training.poll_interval_s, settings.retry), timing),
            timing=timing,
            phase=lambda job: job.status if job is not None else None,
        )
    except PollTimeout:
        raise JobFailedError(
            f"training job {job_id} did not finish within training.timeout_s={settings.training.timeout_s:.0f} s "
            "and was canceled; raise the timeout or use a smaller recipe"
        ) from None
    return cast(JobInfo, job)  # done() accepts only a job


def _cancel_abandoned(backend: Backend, job_id: str, exc: BaseException) -> None:
    """Cancel a job nobody waits for any more: left running it keeps a GPU (and, on Azure ML, the bill) busy."""
    log = run_logger()
    why = "its wait timed out" if isinstance(exc, JobFailedError) else f"the wait stopped ({type(exc).__name__})"
    log.warning("training job %s: %s; canceling the job", job_id, why)
    try:
        backend.cancel_job(job_id)
    except Exception as cancel_exc:
        log.error(
            "could not cancel training job %s (%s: %s); cancel it by hand",
            job_id,
            type(cancel_exc).__name__,
            cancel_exc,
        )


def wait_for_job(backend: Backend, job_id: str, settings: Settings, timing: PollTiming | None = None) -> JobInfo:
    """Wait for the job to end, streaming its log; return it when it completed, raise :class:`JobFailedError` when
    it failed or was canceled.

    Every way out that is not the job's own end cancels it: ``training.timeout_s`` passing, Ctrl-C
    (``KeyboardInterrupt``), a Prefect cancel (``TerminationSignal``), a Prefect task timeout (a ``CancelledError``
    inside the task, a ``TimeoutError`` outside it), or a status poll that failed for good. Transient poll faults
    are only missed polls.
    """
    try:
        job = _poll_until_terminal(backend, job_id, settings, timing or PollTiming())
    except BaseException as exc:
        _cancel_abandoned(backend, job_id, exc)
        raise
    if job.status != JobStatus.COMPLETED:
        raise JobFailedError(f"training job {job_id} ended {job.status.value}: {job.error or 'no reason given'}")
    return job


@task(name="submit-training-job", cache_policy=NO_CACHE, persist_result=False)
def submit_training_job(backend: Backend, spec: TrainingJobSpec) -> JobInfo:
    """Submit the job (or find the one these inputs already have). No retries of its own: the flow's train step
    retries submit and wait together, on transient faults only."""
    info = backend.submit_training(spec)
    get_run_logger().info("training job %s submitted (%s)", info.job_id, info.url or "no URL")
    return info


@task(name="wait-for-training-job", cache_policy=NO_CACHE, persist_result=False)
def wait_for_training_job(
    backend: Backend, job_id: str, settings: Settings, timing: PollTiming | None = None
) -> JobInfo:
    """:func:`wait_for_job` as a task: the polling, the job's log lines and the cancel show under it in Prefect."""
    return wait_for_job(backend, job_id, settings, timing)


__all__ = ["PollTiming", "submit_training_job", "wait_for_job", "wait_for_training_job"]
