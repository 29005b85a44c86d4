"""Shared set-up for the Prompt flow tests (tests/flow_chat, tests/tasks/test_chat_connection.py, test_batch_eval.py).

Prompt flow reads ``PF_HOME_DIRECTORY`` once, at import, so one pytest process has one Prompt flow home: the first
call to ``tasks.chat_connection.configure_promptflow`` fixes it (unless the environment already names one), and
every later test follows ``os.environ`` like the ``pf`` subprocesses do.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from tasks.config import Settings, load_config
from tasks.process_groups import stop_process_group

REPO_ROOT = Path(__file__).resolve().parents[2]
FLOW_DIR = REPO_ROOT / "flow_chat"
PF_BIN = str(Path(sys.executable).with_name("pf"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(folder: Path, **endpoint: Any) -> Path:
    """configs/local.yaml with the state folder under ``folder`` and the given endpoint fields."""
    config = yaml.safe_load((REPO_ROOT / "configs" / "local.yaml").read_text(encoding="utf-8"))
    config["state_dir"] = str(folder / "state")
    config["data"]["path"] = str(REPO_ROOT / config["data"]["path"])
    config["endpoint"].update(endpoint)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def settings_for(folder: Path, **endpoint: Any) -> Settings:
    return load_config(write_config(folder, **endpoint))


def load_tool_module() -> ModuleType:
    """flow_chat/chat.py as a module (flow_chat/ is a Prompt flow folder, not a package)."""
    spec = importlib.util.spec_from_file_location("flow_chat_tool", FLOW_DIR / "chat.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pf_env() -> dict[str, str]:
    """The environment for a `pf` subprocess: this process's, which configure_promptflow has set."""
    assert os.environ.get("PF_HOME_DIRECTORY"), "call tasks.chat_connection.configure_promptflow first"
    return dict(os.environ)


def documented_serve_command(port: int) -> list[str]:
    """The `pf flow serve` line of flow_chat/README.md, as a person copies it, on ``port`` instead of 8080."""
    readme = (FLOW_DIR / "README.md").read_text(encoding="utf-8")
    line = next(line for line in readme.splitlines() if line.startswith("pf flow serve "))
    args = shlex.split(line.split("#")[0])
    assert args[args.index("--port") + 1] == "8080", line
    args[args.index("--port") + 1] = str(port)
    return [PF_BIN, *args[1:]]


def wait_until_healthy(
    server: subprocess.Popen[bytes], port: int, log: Path, timeout_s: float = 90, path: str = "/health"
) -> None:
    """Until the server on ``port`` (`pf flow serve`; `prefect server start` with ``path="/api/health"``) answers
    ``path``; fails with its log if it exits or takes longer than ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert server.poll() is None, log.read_text()[-2000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5):
                return
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline, f"{server.args[:4]} did not answer {path} within {timeout_s:g} s"
            time.sleep(0.3)


@contextlib.contextmanager
def pf_flow_serve(log: Path) -> Iterator[int]:
    """flow_chat/README.md's `pf flow serve` on a free port, its output in ``log``, until it answers /health. Yields
    the port; stops the server and all it started when the block ends."""
    port = free_port()
    with log.open("wb") as out:  # a file, not a pipe: a full pipe would block the server
        server = subprocess.Popen(
            documented_serve_command(port),
            cwd=REPO_ROOT,
            env=pf_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped with everything it started
        )
        try:
            wait_until_healthy(server, port, log)
            yield port
        finally:
            stop_process_group(server, grace_s=15)
