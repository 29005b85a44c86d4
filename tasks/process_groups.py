"""Process groups: is one still alive, and stop one (SIGTERM, then SIGKILL after a grace period).

Training jobs, deployment processes, and the servers tests and benchmarks start all lead their own process group
(``start_new_session=True``), so that stopping one reaches the children it started (tokenizer workers, a shell's
child) and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable

import psutil

from tasks.polling import PollTimeout, every, poll_until

KILL_WAIT_S = 5.0  # after SIGKILL, how long to wait for the kernel to take the group down


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone: it has exited and only waits to be reaped)."""
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def group_alive(pgid: int) -> bool:
    """True while a process of group ``pgid`` is alive (a zombie leader does not count; psutil, so macOS too)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg still finds a zombie leader: look at the members' states
    for process in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return False


def stop_group(pgid: int, grace_s: float, reap: Callable[[], object] | None = None) -> bool:
    """SIGTERM group ``pgid``, SIGKILL what is left after ``grace_s``; True when it stopped before the SIGKILL.

    ``reap`` collects our own child's exit status between looks (a zombie child would keep its group alive).
    """

    def alive() -> bool:
        if reap is not None:
            with contextlib.suppress(ChildProcessError, OSError):
                reap()
        return group_alive(pgid)

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    try:
        poll_until(alive, lambda up: not up, timeout_s=grace_s, schedule=every(0.05))
        return True
    except PollTimeout:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(PollTimeout):
        poll_until(alive, lambda up: not up, timeout_s=KILL_WAIT_S, schedule=every(0.05))
    return False


def stop_process_group(process: subprocess.Popen, grace_s: float) -> None:
    """Stop the group that ``process`` leads (started with ``start_new_session=True``) and reap it. For servers and
    tools run beside a job (tests, benchmarks)."""
    stop_group(process.pid, grace_s, reap=process.poll)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=KILL_WAIT_S)


__all__ = ["group_alive", "pid_alive", "stop_group", "stop_process_group"]
