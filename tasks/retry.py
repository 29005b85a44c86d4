"""Retries for transient faults only, with exponential backoff and jitter that we compute ourselves.

Prefect's own ``retry_jitter_factor`` has been reported as ignored (PrefectHQ/prefect PR #22203), and jitter
matters against Azure's throttling (many clients retrying in lock-step). So:

- :func:`is_transient` decides what is worth retrying: connection errors, timeouts, HTTP 429 and 5xx, and
  :class:`~tasks.backends.base.TransientBackendError`. A failed training job or a bad request is final.
- :func:`backoff_delay` is ``min(max_delay, base * 2**attempt)`` scaled by a uniform factor in
  ``[1 - jitter, 1 + jitter]``.
- :func:`call_with_retry` is the loop a backend wraps around its own transport (the Azure ML client, the local
  endpoint's admin client): the one retry layer of a backend call; the flow and the rollout call backends directly.
- :func:`retry_condition_fn` and :func:`with_step_retries` retry a whole Prefect step on the same rule.
- :func:`poll_policy` is the same backoff for status polls: from the poll interval, doubling up to a cap.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from tasks.backends.base import RetriesExhaustedError, TransientBackendError
from tasks.config import RetryConfig

T = TypeVar("T")
_LOG = logging.getLogger("finetune_phi.retry")

# A status poll's interval grows from ``poll_interval_s`` to this many times it: a job that stays queued or runs for
# hours is asked less and less often, while the first polls after a change still come quickly.
POLL_BACKOFF_CAP = 4.0

# Status codes worth another try: throttling and server-side faults (Azure ML answers 429 when too many
# requests are pending, 503 while a deployment starts).
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})


def _status_code(exc: BaseException) -> int | None:
    """The HTTP status of an httpx/requests/azure error, if it carries one."""
    response = getattr(exc, "response", None)
    for holder in (response, exc):
        code = getattr(holder, "status_code", None)
        if isinstance(code, int):
            return code
    return None


def is_transient(exc: BaseException) -> bool:
    """True for faults that may pass on their own: retry these, nothing else."""
    if isinstance(exc, TransientBackendError):
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    try:
        import httpx

        if isinstance(exc, (httpx.TransportError, httpx.TimeoutException)):
            return True
    except ImportError:  # pragma: no cover - httpx is a dependency
        pass
    try:
        import requests

        if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
            return True
    except ImportError:  # pragma: no cover
        pass
    code = _status_code(exc)
    return code is not None and (code in TRANSIENT_STATUS or code >= 500)


def is_worth_another_try_later(exc: BaseException) -> bool:
    """A transient fault, or transient faults that outlasted one call's retries: a status poll counts it as a missed
    poll, and a task may be retried for it, while a caller's own immediate retry loop stops."""
    return is_transient(exc) or isinstance(exc, RetriesExhaustedError)


# Past this many doublings every delay is capped anyway; the bound keeps 2**attempt a finite float.
_MAX_DOUBLINGS = 60


def _capped_base(attempt: int, policy: RetryConfig) -> float:
    return min(policy.max_delay_s, policy.base_delay_s * (2 ** min(attempt, _MAX_DOUBLINGS)))


def backoff_delay(attempt: int, policy: RetryConfig, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): exponential, capped, with jitter."""
    rng = rng or random
    base = _capped_base(attempt, policy)
    factor = rng.uniform(1.0 - policy.jitter, 1.0 + policy.jitter)
    return max(0.0, base * factor)


def jitter_bounds(attempt: int, policy: RetryConfig) -> tuple[float, float]:
    """The interval :func:`backoff_delay` draws from, for tests and documentation."""
    base = _capped_base(attempt, policy)
    return base * (1.0 - policy.jitter), base * (1.0 + policy.jitter)


def call_with_retry(
    fn: Callable[..., T],
    *args: Any,
    policy: RetryConfig,
    what: str = "call",
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
    **kwargs: Any,
) -> T:
    """Call ``fn`` and retry transient faults up to ``policy.attempts`` times in all; re-raise anything else."""
    log = logger or _LOG
    for attempt in range(policy.attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not is_transient(exc) or attempt + 1 >= policy.attempts:
                raise
            delay = backoff_delay(attempt, policy, rng)
            log.warning(
                "%s failed with a transient fault (%s: %s); retry %d/%d in %.2f s",
                what,
                type(exc).__name__,
                exc,
                attempt + 1,
                policy.attempts - 1,
                delay,
            )
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def poll_policy(interval_s: float, policy: RetryConfig, cap: float = POLL_BACKOFF_CAP) -> RetryConfig:
    """The schedule of a status poll for :func:`backoff_delay`: ``interval_s``, doubling to ``cap * interval_s``,
    with the retry policy's jitter (polls of many flow runs spread out like their retries)."""
    return RetryConfig(attempts=1, base_delay_s=interval_s, max_delay_s=interval_s * cap, jitter=policy.jitter)


def retry_condition_fn(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a task only when it failed with a transient fault.

    A task that ran past its own ``timeout_seconds`` is not retried although Prefect's ``TaskRunTimeoutError`` is a
    ``TimeoutError``: it used up its time budget, and another attempt would spend it again."""
    from prefect.task_engine import TaskRunTimeoutError

    try:
        state.result(raise_on_failure=True)
    except TaskRunTimeoutError:
        return False
    except Exception as exc:
        return is_worth_another_try_later(exc)
    return False


def prefect_delays(policy: RetryConfig, rng: random.Random | None = None) -> list[float]:
    """Jittered delays for ``@task(retry_delay_seconds=...)``, drawn when the task is configured."""
    return [backoff_delay(n, policy, rng) for n in range(max(policy.attempts - 1, 0))]


def with_step_retries(step: Any, policy: RetryConfig, **options: Any) -> Any:
    """The Prefect task ``step`` retried as a whole step on transient faults only: ``policy.attempts`` runs in all,
    our own jittered delays between them. The one retry layer above a backend call (the backend retries its own
    transport faults only where it has a transport to retry)."""
    return step.with_options(
        retries=policy.attempts - 1,
        retry_delay_seconds=prefect_delays(policy),
        retry_condition_fn=retry_condition_fn,
        **options,
    )


__all__ = [
    "POLL_BACKOFF_CAP",
    "TRANSIENT_STATUS",
    "backoff_delay",
    "call_with_retry",
    "is_transient",
    "is_worth_another_try_later",
    "jitter_bounds",
    "poll_policy",
    "prefect_delays",
    "retry_condition_fn",
    "with_step_retries",
]
