"""Shared set-up for the endpoint tests: a tiny model folder and real servers on free loopback ports.

Each server is a real ``python -m deployments.server`` process started with :func:`deployments.service.start_server`
and stopped by PID at the end of its module (few servers: they are shared by every test of a module).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from deployments.client import EndpointAdminClient
from deployments.keys import read_keys
from deployments.service import start_server, stop_server
from tasks.config import Settings
from tasks.state import state_paths
from tests.conftest import shared_temp_root

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE = REPO_ROOT / "data" / "sample" / "chat_sample.jsonl"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sample_texts() -> list[str]:
    texts = []
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            texts.extend(m["content"] for m in row.get("messages", []))
    return texts


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0, poll_s: float = 0.02) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def build_model(folder: Path) -> Path:
    """An untrained tiny Phi-3 folder (smaller than the recipe's: serving tests only need tokens, bounded by
    max_new_tokens). Its replies rarely end; tests that need an ending use ``trained_tiny_model``."""
    from training.tiny_model import build_tiny_model

    return Path(
        build_tiny_model(folder, sample_texts(), hidden_size=64, num_layers=2, intermediate_size=128, vocab_size=1024)
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture(scope="session")
def context_sensitive_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose greedy replies depend on every token of the context (weights ~ N(0, 0.3))."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = build_model(tmp_path_factory.mktemp("varied") / "model")
    model = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(0)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    return folder


@dataclass
class LiveEndpoint:
    """A running server: its settings, URL, keys and an admin client."""

    settings: Settings
    pid: int

    @property
    def url(self) -> str:
        return f"http://{self.settings.endpoint.host}:{self.settings.endpoint.port}"

    @property
    def endpoint_dir(self) -> Path:
        return state_paths(self.settings.state_dir).endpoint

    @property
    def keys(self) -> dict[str, str]:
        return read_keys(self.endpoint_dir)

    def headers(self, key: str = "primary", **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[key]}", **extra}

    @property
    def admin(self) -> EndpointAdminClient:
        return EndpointAdminClient(self.url, self.keys["admin"])

    def deploy(self, model_dir: Path, traffic: dict[str, int], timeout_s: float = 120.0) -> None:
        for name in traffic:
            self.admin.create_deployment(name, str(model_dir), "1")
        for name in traffic:
            self.admin.wait_ready(name, timeout_s)
        self.admin.set_traffic(traffic)

    def in_flight(self, deployment: str) -> int:
        """Requests admitted or waiting on ``deployment``, from /metrics (a probe: it answers while stopping too)."""
        prefix = f'finetune_phi_in_flight_requests{{deployment="{deployment}"}} '
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return next((int(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)), 0)

    @property
    def log_text(self) -> str:
        return (self.endpoint_dir / "server.log").read_text(encoding="utf-8", errors="replace")


_BASETEMP: list[Path] = []  # pytest's temporary folder for this run (every worker's), which holds every fixture's


@pytest.fixture(scope="session", autouse=True)
def _pytest_basetemp(tmp_path_factory: pytest.TempPathFactory) -> None:
    _BASETEMP[:] = [shared_temp_root(tmp_path_factory)]


def make_settings(state_dir: Path, **endpoint: Any) -> Settings:
    return Settings.model_validate(
        {
            "state_dir": str(state_dir),
            "data": {"path": str(SAMPLE)},
            # the session's tiny models live in pytest's own temporary folders, beside the state folders
            "endpoint": {
                "port": free_port(),
                "startup_timeout_s": 60,
                "stop_grace_s": 10,
                "model_roots": [str(p) for p in _BASETEMP],
                **endpoint,
            },
        }
    )


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., LiveEndpoint]]:
    """Start servers for a module (``launch(**endpoint_fields)``); every one is stopped by PID afterwards."""
    started: list[Settings] = []

    def _launch(**endpoint: Any) -> LiveEndpoint:
        settings = make_settings(tmp_path_factory.mktemp("state"), **endpoint)
        pid = start_server(settings)
        started.append(settings)
        return LiveEndpoint(settings, pid)

    yield _launch
    for settings in started:
        stop_server(settings, grace_s=10)


def write_config(settings: Settings, folder: Path) -> Path:
    """A config file for the CLI (``--config``) describing ``settings``."""
    path = folder / "endpoint.yaml"
    data = {
        "state_dir": str(settings.state_dir),
        "data": {"path": str(settings.data.path)},
        "endpoint": settings.endpoint.model_dump(mode="json"),
    }
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path
