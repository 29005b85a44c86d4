"""The one polling loop every wait uses (training jobs, deployments, the local runner's cancel), and its clock.

:func:`poll_until` reads a value until it is done or the time is up; how long it sleeps between reads is the
``schedule`` (a fixed interval, or exponential backoff with jitter from a :class:`~tasks.config.RetryConfig`).
Time comes from a :class:`PollTiming`: tests pass a fake clock whose ``sleep`` advances it and records the delay.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from tasks.config import RetryConfig
from tasks.retry import backoff_delay

T = TypeVar("T")
Schedule = Callable[[int], float]  # seconds to sleep after read number ``attempt`` (0-based) of the current phase


@dataclass(frozen=True)
class PollTiming:
    """Where a wait takes its time from: tests pass a fake clock whose ``sleep`` advances it and records the delay."""

    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    rng: random.Random | None = None  # None: the ``random`` module


class PollTimeout(TimeoutError, Generic[T]):
    """The wait's time ran out; ``last`` is the last value read (for the caller's message)."""

    def __init__(self, last: T, timeout_s: float) -> None:
        super().__init__(f"not done within {timeout_s:.0f} s")
        self.last = last


def every(seconds: float) -> Schedule:
    """A fixed interval between reads."""
    return lambda attempt: seconds


def backoff(policy: RetryConfig, timing: PollTiming) -> Schedule:
    """Exponential backoff with jitter (:func:`tasks.retry.backoff_delay`), drawn from ``timing.rng``."""
    return lambda attempt: backoff_delay(attempt, policy, timing.rng)


def poll_until(
    read: Callable[[], T],
    done: Callable[[T], bool],
    *,
    timeout_s: float,
    schedule: Schedule,
    timing: PollTiming | None = None,
    phase: Callable[[T], Hashable | None] | None = None,
) -> T:
    """Call ``read`` until ``done`` says its value is final and return that value; raise :class:`PollTimeout` when
    ``timeout_s`` passes first (the last sleep is cut to the deadline).

    ``phase`` (optional) names the stage a value shows, ``None`` for none: when it changes the schedule starts again
    from its first interval, so a job that just started running is looked at soon.
    """
    timing = timing or PollTiming()
    deadline = timing.clock() + timeout_s
    attempt: int = 0
    current: Hashable | None = None
    while True:
        value = read()
        if done(value):
            return value
        stage = phase(value) if phase is not None else None
        if stage is not None and stage != current:
            attempt, current = 0, stage
        remaining = deadline - timing.clock()
        if remaining <= 0:
            raise PollTimeout(value, timeout_s)
        timing.sleep(min(remaining, schedule(attempt)))
        attempt += 1


__all__ = ["PollTimeout", "PollTiming", "Schedule", "backoff", "every", "poll_until"]
