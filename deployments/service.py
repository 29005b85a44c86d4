"""Run the endpoint server as a background service, and its ``finetune-phi endpoint`` commands.

    finetune-phi endpoint start  [--config configs/local.yaml] [--set endpoint.port=9000]
    finetune-phi endpoint status
    finetune-phi endpoint logs   [-n 50]
    finetune-phi endpoint stop
    finetune-phi endpoint keys   [--regenerate primary|secondary|admin]

The server (the router, ``python -m deployments.server``) runs in its own session, with ``server.pid`` and
``server.log`` in ``<state_dir>/endpoint/``; it starts each deployment's processes itself, with their logs in
``<state_dir>/endpoint/deployments/``. ``status`` lists each deployment's state, instances, restarts and memory.
``stop`` sends SIGTERM: new requests get 503 at once (the port stays open), in-flight ones finish, the router stops
its deployment processes, and it is killed if it is still there 5 s after ``endpoint.stop_grace_s`` (deployment
processes a killed router leaves behind are then stopped by their recorded PIDs). Keys are printed only by
``keys``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployments.instances import stop_recorded
from tasks.backends.base import BackendError
from tasks.config import Settings
from tasks.state import atomic_write_json, read_json, state_paths

PID_FILE = "server.pid"
LOG_FILE = "server.log"
CONFIG_FILE = "server-config.json"
REPO_ROOT = Path(__file__).resolve().parent.parent
SERVER_MODULE = "deployments.server"


@dataclass(frozen=True)
class ServerStatus:
    running: bool
    pid: int | None
    url: str
    healthy: bool
    ready: bool
    log_file: Path


def _endpoint_dir(settings: Settings) -> Path:
    folder = state_paths(settings.state_dir).endpoint
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def base_url(settings: Settings) -> str:
    return f"http://{settings.endpoint.host}:{settings.endpoint.port}"


def _is_our_server(pid: int) -> bool:
    """True when ``pid`` is alive and runs our server module (a recycled PID is not ours)."""
    import psutil

    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and SERVER_MODULE in " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _running_pid(settings: Settings) -> int | None:
    record = read_json(_endpoint_dir(settings) / PID_FILE, default=None)
    pid = record.get("pid") if isinstance(record, dict) else None
    return pid if isinstance(pid, int) and _is_our_server(pid) else None


def _probe(url: str, timeout: float = 2.0) -> int | None:
    import httpx

    try:
        return httpx.get(url, timeout=timeout).status_code
    except httpx.HTTPError:
        return None


def server_status(settings: Settings) -> ServerStatus:
    pid = _running_pid(settings)
    url = base_url(settings)
    healthy = pid is not None and _probe(f"{url}/health") == 200
    ready = healthy and _probe(f"{url}/ready") == 200
    return ServerStatus(pid is not None, pid, url, healthy, ready, _endpoint_dir(settings) / LOG_FILE)


def _port_taken(host: str, port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _child_environment(settings: Settings) -> dict[str, str]:
    paths = state_paths(settings.state_dir)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    for name, value in {
        "HF_HOME": str(paths.hf),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "warning",
    }.items():
        env.setdefault(name, value)
    return env


def start_server(settings: Settings) -> int:
    """Start the server in the background unless it already runs; wait for ``/health``. Returns its PID."""
    from deployments.keys import ensure_keys

    folder = _endpoint_dir(settings)
    pid = _running_pid(settings)
    if pid is not None:
        return pid
    config = settings.endpoint
    if _port_taken(config.host, config.port):
        raise BackendError(
            f"port {config.port} on {config.host} is already in use by another program; "
            "stop it or choose another port (--set endpoint.port=...)"
        )
    ensure_keys(folder)
    atomic_write_json(folder / CONFIG_FILE, config.model_dump(mode="json"))
    log_path = folder / LOG_FILE
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                SERVER_MODULE,
                "--state-dir",
                str(state_paths(settings.state_dir).root),
                "--endpoint-config",
                str(folder / CONFIG_FILE),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=_child_environment(settings),
            start_new_session=True,  # its own session: a Ctrl-C in the terminal that started it does not stop it
        )
    atomic_write_json(
        folder / PID_FILE, {"pid": process.pid, "host": config.host, "port": config.port, "started_at": time.time()}
    )
    deadline = time.monotonic() + config.startup_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            (folder / PID_FILE).unlink(missing_ok=True)
            tail = "\n".join(tail_logs(settings, 20))
            raise BackendError(
                f"the endpoint server exited at start-up (code {process.returncode}); log tail:\n{tail}"
            )
        if _probe(f"{base_url(settings)}/health", timeout=1.0) == 200:
            return process.pid
        time.sleep(0.2)
    _terminate(process.pid, grace_s=5.0)
    (folder / PID_FILE).unlink(missing_ok=True)
    raise BackendError(
        f"the endpoint server did not answer /health within {config.startup_timeout_s:.0f} s; "
        f"see {log_path} or raise endpoint.startup_timeout_s"
    )


def _terminate(pid: int, grace_s: float) -> bool:
    """SIGTERM, wait up to ``grace_s``, then SIGKILL. True when it had to kill."""
    import psutil

    try:
        process = psutil.Process(pid)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=grace_s)
        return False
    except psutil.NoSuchProcess:
        return False
    except psutil.TimeoutExpired:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
            process.wait(timeout=10)
        return True


def stop_server(settings: Settings, grace_s: float | None = None) -> bool:
    """Stop the server gracefully (in-flight requests finish; new ones get 503). False when none was running."""
    folder = _endpoint_dir(settings)
    pid = _running_pid(settings)
    if pid is None:
        (folder / PID_FILE).unlink(missing_ok=True)
        stop_recorded(folder)
        return False
    # uvicorn gives in-flight requests stop_grace_s; a few seconds more before the hard kill.
    _terminate(pid, settings.endpoint.stop_grace_s + 5.0 if grace_s is None else grace_s)
    (folder / PID_FILE).unlink(missing_ok=True)
    stop_recorded(folder)  # deployment processes of a router that had to be killed: none is left behind
    return True


def tail_logs(settings: Settings, lines: int = 50) -> list[str]:
    path = _endpoint_dir(settings) / LOG_FILE
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", errors="replace") as handle:
        return [line.rstrip("\n") for line in deque(handle, maxlen=lines)]


# ------------------------------------------------------------------------------------------------------------ CLI
def _settings(args: argparse.Namespace) -> Settings:
    from tasks.config import load_config

    return load_config(args.config, overrides=args.set)


def _cmd_start(args: argparse.Namespace) -> int:
    settings = _settings(args)
    pid = start_server(settings)
    print(f"endpoint {settings.endpoint.name} running at {base_url(settings)} (pid {pid})")
    print(
        f"  scoring: {base_url(settings)}/score   OpenAI: {base_url(settings)}/v1   keys: finetune-phi endpoint keys"
    )
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    settings = _settings(args)
    print("endpoint stopped" if stop_server(settings) else "endpoint was not running")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    status = server_status(settings)
    if not status.running:
        print(f"endpoint {settings.endpoint.name}: not running (start it with `finetune-phi endpoint start`)")
        return 1
    print(
        f"endpoint {settings.endpoint.name}: running, pid {status.pid}, {status.url}, "
        f"health {'ok' if status.healthy else 'failing'}, {'ready' if status.ready else 'no deployment ready'}"
    )
    if status.healthy:
        from deployments.client import EndpointAdminClient
        from deployments.keys import read_admin_key

        state: dict[str, Any] = EndpointAdminClient(status.url, read_admin_key(_endpoint_dir(settings))).get_state()
        for name, dep in state.get("deployments", {}).items():
            error = f" ({dep['error']})" if dep.get("error") else ""
            traffic = state.get("traffic", {}).get(name, 0)
            instances = dep.get("instances") or []
            rss = sum(i.get("rss_mb") or 0 for i in instances)
            print(
                f"  {name}: {dep['state']}{error}, model version {dep.get('model_version')}, traffic {traffic}%, "
                f"{len(instances)} instance(s), {dep.get('restarts', 0)} restart(s), {rss:.0f} MB"
            )
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    for line in tail_logs(_settings(args), args.lines):
        print(line)
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from deployments.keys import read_keys, regenerate_key

    folder = _endpoint_dir(_settings(args))
    if args.regenerate:
        regenerate_key(folder, args.regenerate)
        print(f"{args.regenerate} key regenerated (a running server uses it from its next request)")
    keys = read_keys(folder)
    for name in ("primary", "secondary", "admin"):
        print(f"{name}: {keys[name]}")
    return 0


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser("endpoint", help="run the local endpoint server: start, stop, status, logs, keys")
    commands = parser.add_subparsers(dest="endpoint_command", required=True, metavar="ACTION")

    def common(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--config", default="configs/local.yaml", help="run configuration (default: %(default)s)")
        sub.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a field")
        return sub

    common(commands.add_parser("start", help="start the server in the background")).set_defaults(handler=_cmd_start)
    common(commands.add_parser("stop", help="stop it (in-flight requests finish)")).set_defaults(handler=_cmd_stop)
    common(commands.add_parser("status", help="is it running; its deployments")).set_defaults(handler=_cmd_status)
    logs = common(commands.add_parser("logs", help="the end of the server's log"))
    logs.add_argument("-n", "--lines", type=int, default=50)
    logs.set_defaults(handler=_cmd_logs)
    keys = common(commands.add_parser("keys", help="print the endpoint's keys (explicitly: they are secrets)"))
    keys.add_argument("--regenerate", choices=("primary", "secondary", "admin"), help="replace this key first")
    keys.set_defaults(handler=_cmd_keys)
