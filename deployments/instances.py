"""Deployment instances: the model-server processes the router starts, probes, restarts and stops.

Each instance is ``python -m deployments.model_server`` in its own process group (its own session), on a free
loopback port, with a secret token only the router knows, its log in ``<state>/endpoint/deployments/``. Its record
(PID, port, token; file 0600) lets a restarted router find it again instead of leaving it orphaned.

Probes follow Azure ML's settings (``initial_delay``, ``period``, ``timeout``, ``failure_threshold``,
``success_threshold``): readiness decides when the instance takes requests; liveness, once it is ready, counts
consecutive failed ``/health`` calls and restarts a hung process past the threshold. A process that exits is
restarted at once after a backoff (1 s, 2 s, 4 s... at most ``RESTART_BACKOFF_MAX_S``, reset once it has served
for a while), as Kubernetes restarts a crashed container; a model that fails to load is not retried: the
deployment fails, as on Azure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from deployments.engines import MODEL_SERVER_MODULE, EngineLaunch, engine_command
from deployments.memory import oom_score_adj, set_oom_score_adj, tree_rss
from deployments.protocol import ENV_INSTANCE_TOKEN
from tasks import process_groups
from tasks.config import AzureProbeConfig
from tasks.state import read_json

log = logging.getLogger("deployments.instances")

EXTERNAL_SERVERS = ("transformers", "vllm")  # the `X serve` command lines of deployments/engines.py
EXTERNAL_CACHE_TOKENS_PER_ROW = 4096
REPO_ROOT = Path(__file__).resolve().parent.parent
INSTANCES_FILE = "instances.json"
RESTART_BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 30.0  # an instance that served this long after a restart starts its backoff again from 1 s
STOP_GRACE_S = 10.0
WATCH_S = 0.1  # how often a process is checked for having exited, where the kernel has no pidfds


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def is_model_server(pid: int, create_time: float | None = None) -> bool:
    """True when ``pid`` is alive and runs our model server (a recycled PID is not ours)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        if create_time is not None and abs(process.create_time() - create_time) > 1.0:
            return False
        command = " ".join(process.cmdline())
        return MODEL_SERVER_MODULE in command or any(f"{engine} serve " in command for engine in EXTERNAL_SERVERS)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def stop_group(pid: int, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the process group led by ``pid``, SIGKILL what is left after ``grace_s``; reaps our own child."""
    process_groups.stop_group(pid, grace_s, reap=lambda: os.waitpid(pid, os.WNOHANG))


def read_records(endpoint_dir: Path) -> dict[str, list[dict[str, Any]]]:
    return read_json(endpoint_dir / INSTANCES_FILE, default={}) or {}


def stop_recorded(endpoint_dir: Path) -> int:
    """Stop every model server recorded in the state folder that still runs (after a router that was killed).
    Returns how many were stopped."""
    stopped = 0
    for records in read_records(endpoint_dir).values():
        for record in records:
            pid = record.get("pid")
            if isinstance(pid, int) and is_model_server(pid, record.get("create_time")):
                stop_group(pid, grace_s=2.0)
                stopped += 1
    (endpoint_dir / INSTANCES_FILE).unlink(missing_ok=True)
    return stopped


@dataclass
class InstanceSpec:
    deployment: str
    model_path: str
    memory_limit_mb: int | None
    config_file: Path
    log_dir: Path
    liveness: AzureProbeConfig
    readiness: AzureProbeConfig
    device: str = "auto"  # deployments.device.resolve_placement's choices, passed to the model server
    dtype: str = "auto"
    engine: str = "builtin"  # deployments.engines: builtin (the model server) or an external engine's server
    max_batch_size: int = 16
    torch_threads: int = 1

    @property
    def ready_path(self) -> str:
        return "/ready" if self.engine == "builtin" else "/health"


@dataclass
class Instance:
    """One process of a deployment, and what the router knows about it."""

    spec: InstanceSpec
    index: int
    max_concurrent: int
    port: int = 0
    token: str = ""
    pid: int | None = None
    create_time: float | None = None
    state: str = "starting"  # starting, ready, restarting, failed, stopped
    error: str | None = None
    restarts: int = 0
    in_flight: int = 0
    ever_ready: bool = False
    ready_since: float | None = None
    process: subprocess.Popen[bytes] | None = None
    semaphore: asyncio.Semaphore = field(init=False)
    task: asyncio.Task[None] | None = None
    stopping: bool = False

    def __post_init__(self) -> None:
        self.semaphore = asyncio.Semaphore(self.max_concurrent)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.spec.log_dir / f"{self.spec.deployment}-{self.index}.log"

    def record(self) -> dict[str, Any]:
        return {"pid": self.pid, "port": self.port, "token": self.token, "create_time": self.create_time}

    def describe(self) -> dict[str, Any]:
        alive = self.pid is not None and self.exited() is False
        return {
            "index": self.index,
            "pid": self.pid,
            "state": self.state,
            "error": self.error,
            "restarts": self.restarts,
            "in_flight": self.in_flight,
            "rss_mb": round(tree_rss(self.pid) / 1024 / 1024, 1) if alive and self.pid else 0.0,
            "oom_score_adj": oom_score_adj(self.pid) if alive and self.pid else None,
            "log_file": str(self.log_file),
        }

    # ------------------------------------------------------------------ process
    def spawn(self, oom_adj: int) -> None:
        self.port, self.token = free_port(), secrets.token_urlsafe(24)
        self.spec.log_dir.mkdir(parents=True, exist_ok=True)
        builtin_args = ["--endpoint-config", str(self.spec.config_file)]
        if self.spec.memory_limit_mb:
            builtin_args += ["--memory-limit-mb", str(self.spec.memory_limit_mb)]
        builtin_args += ["--device", self.spec.device, "--dtype", self.spec.dtype]
        launch = EngineLaunch(
            self.spec.engine,
            self.spec.deployment,
            Path(self.spec.model_path),
            self.port,
            device=self.spec.device,
            dtype=self.spec.dtype,
            max_batch_size=self.spec.max_batch_size,
            torch_threads=self.spec.torch_threads,
            # an external engine's KV cache: every slot a full context, not most of the machine's RAM
            cache_tokens=self.spec.max_batch_size * EXTERNAL_CACHE_TOKENS_PER_ROW,
            builtin_args=builtin_args,
        )
        engine = engine_command(launch)
        # Few malloc arenas: each thread's arena reserves 64 MB of address space, which counts against RLIMIT_AS.
        env = {**os.environ, **engine.env, ENV_INSTANCE_TOKEN: self.token, "MALLOC_ARENA_MAX": "2"}
        command = engine.argv
        with open(self.log_file, "ab") as log_handle:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_handle,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                env=env,
                start_new_session=True,  # its own process group: stopped (and killed) as a whole
            )
        self.pid = self.process.pid
        with contextlib.suppress(psutil.NoSuchProcess):
            self.create_time = psutil.Process(self.pid).create_time()
        set_oom_score_adj(self.pid, oom_adj)
        log.info("deployment %s instance %d: started pid %d on port %d", self.spec.deployment, self.index,
                 self.pid, self.port)  # fmt: skip

    def adopt(self, record: dict[str, Any]) -> bool:
        """Take over a process recorded by an earlier router, if it still runs. True when adopted."""
        pid = record.get("pid")
        if not isinstance(pid, int) or not is_model_server(pid, record.get("create_time")):
            return False
        self.pid, self.port, self.token = pid, int(record["port"]), str(record["token"])
        self.create_time, self.process = record.get("create_time"), None
        log.info("deployment %s instance %d: found pid %d still running", self.spec.deployment, self.index, pid)
        return True

    def exited(self) -> bool:
        if self.pid is None:
            return True
        if self.process is not None:
            return self.process.poll() is not None
        return not is_model_server(self.pid, self.create_time)

    async def kill(self, grace_s: float) -> None:
        pid, self.pid = self.pid, None
        if pid is not None:
            await asyncio.to_thread(stop_group, pid, grace_s)
            if self.process is not None:
                with contextlib.suppress(Exception):
                    self.process.wait(timeout=1)
        self.process = None

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_file, encoding="utf-8", errors="replace") as handle:
                return "".join(deque(handle, maxlen=lines)).strip()
        except OSError:
            return ""


async def _probe(client: httpx.AsyncClient, url: str, timeout_s: float) -> httpx.Response | None:
    try:
        return await client.get(url, timeout=timeout_s)
    except httpx.HTTPError:
        return None


async def _sleep_watching(instance: Instance, seconds: float) -> bool:
    """Sleep ``seconds``; True as soon as the process exits (or the instance stops)."""
    if instance.stopping or instance.exited():
        return True
    exit_fd = _exit_fd(instance.pid)
    if exit_fd is None:
        return await _sleep_polling(instance, seconds)
    # The kernel wakes this loop when the process exits (a pidfd turns readable), so an idle router does not
    # wake up ten times a second per instance to ask; a stop always ends in a kill, which ends the wait too.
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()
    loop.add_reader(exit_fd, lambda: exited.done() or exited.set_result(None))
    try:
        await asyncio.wait_for(exited, timeout=seconds)
        return True
    except TimeoutError:
        return instance.stopping or instance.exited()
    finally:
        loop.remove_reader(exit_fd)
        os.close(exit_fd)


def _exit_fd(pid: int | None) -> int | None:
    """A pidfd of ``pid`` (Linux 5.3 and newer), readable once the process has exited; None where there is none."""
    if pid is None or not hasattr(os, "pidfd_open"):
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:  # gone already, or a kernel without pidfds
        return None


async def _sleep_polling(instance: Instance, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        if instance.stopping or instance.exited():
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        await asyncio.sleep(min(WATCH_S, left))


async def until_ready(instance: Instance, client: httpx.AsyncClient) -> str:
    """Readiness probing: ``ready``, ``failed`` (the model did not load), ``exited`` or ``stopped``."""
    probe = instance.spec.readiness
    if await _sleep_watching(instance, probe.initial_delay):
        return "stopped" if instance.stopping else "exited"
    successes = 0
    while True:
        response = await _probe(client, f"{instance.url}{instance.spec.ready_path}", probe.timeout)
        if response is not None and response.status_code == 200:
            successes += 1
            if successes >= probe.success_threshold:
                return "ready"
        else:
            successes = 0
            if response is not None and response.status_code == 503:
                body = response.json() if "json" in response.headers.get("content-type", "") else {}
                if body.get("state") == "failed":
                    instance.error = body.get("error") or "the model failed to load"
                    return "failed"
        if await _sleep_watching(instance, probe.period):
            return "stopped" if instance.stopping else "exited"


async def while_live(instance: Instance, client: httpx.AsyncClient) -> str:
    """Liveness probing of a ready instance: ``exited``, ``hung`` (failure_threshold missed probes) or
    ``stopped``."""
    probe = instance.spec.liveness
    if await _sleep_watching(instance, probe.initial_delay):
        return "stopped" if instance.stopping else "exited"
    failures = 0
    while True:
        response = await _probe(client, f"{instance.url}/health", probe.timeout)
        failures = 0 if response is not None and response.status_code == 200 else failures + 1
        if failures >= probe.failure_threshold:
            return "hung"
        if await _sleep_watching(instance, probe.period):
            return "stopped" if instance.stopping else "exited"


async def supervise(instance: Instance, client: httpx.AsyncClient, oom_adj: Any, on_change: Any) -> None:
    """Run ``instance`` until it is stopped: start (or keep an adopted process), probe, restart after a crash or
    a hang with backoff. ``oom_adj()`` gives the oom_score_adj for a new process; ``on_change()`` persists."""
    backoff = 1.0
    while not instance.stopping:
        if instance.pid is None:
            instance.spawn(oom_adj())
            on_change()
        outcome = await until_ready(instance, client)
        if outcome == "ready":
            instance.state, instance.ever_ready, instance.ready_since = "ready", True, time.monotonic()
            instance.error = None
            on_change()
            outcome = await while_live(instance, client)
            if instance.ready_since is not None and time.monotonic() - instance.ready_since > STABLE_AFTER_S:
                backoff = 1.0
        if outcome == "stopped" or instance.stopping:
            break
        if outcome == "failed" or (outcome == "exited" and not instance.ever_ready):
            if outcome == "exited":
                tail = instance.log_tail()
                instance.error = "the deployment process exited while loading the model" + (
                    f"; its log ends with:\n{tail}" if tail else ""
                )
            log.warning("deployment %s instance %d failed: %s", instance.spec.deployment, instance.index,
                        instance.error)  # fmt: skip
            instance.state = "failed"
            await instance.kill(grace_s=2.0)
            on_change()
            return
        # a crash or a hang of a serving instance: restart it, as Azure restarts a failed container
        what = "was unresponsive (liveness probe)" if outcome == "hung" else "exited"
        log.warning("deployment %s instance %d (pid %s) %s; restarting in %.0f s", instance.spec.deployment,
                    instance.index, instance.pid, what, backoff)  # fmt: skip
        instance.state, instance.ready_since = "restarting", None
        instance.error = f"the deployment process {what}; restarting"
        instance.restarts += 1
        await instance.kill(grace_s=0.5)
        on_change()
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, RESTART_BACKOFF_MAX_S)
    instance.state = "stopped"
