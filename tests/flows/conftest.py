"""Shared, expensive set-up of the flow tests: one run of the whole flow (on the suite's Prefect harness) on the tiny
recipe (real training subprocess, MLflow on SQLite in tmp, the real endpoint server on a free loopback port).

Every test in this folder reuses that run's trained model and live endpoint; tests that change the endpoint put
it back (that is what they test). The endpoint server is stopped by PID at the end of the session.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml

from tasks.backends.base import Backend
from tasks.config import Settings, load_config
from tasks.rollout import live_traffic

# Few steps keep CI fast; the smoke test's prompts are training questions, so the tiny model answers and stops.
TRAINING_OVERRIDES: dict[str, Any] = {"max_steps": 120}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_flow_config(repo_root: Path, folder: Path) -> Path:
    """configs/local.yaml with the state folder in tmp, a free endpoint port and a short training."""
    config = yaml.safe_load((repo_root / "configs" / "local.yaml").read_text(encoding="utf-8"))
    config["state_dir"] = str(folder / "state")
    config["data"]["path"] = str(repo_root / config["data"]["path"])
    config["training"]["recipe"] = str(repo_root / config["training"]["recipe"])
    config["training"]["overrides"] = dict(TRAINING_OVERRIDES)
    config["training"]["poll_interval_s"] = 0.5
    config["evaluation"] = {"num_prompts": 2, "max_new_tokens": 48}
    config["endpoint"]["port"] = free_port()
    config["rollout"]["requests_per_step"] = 2
    # The failure-mode tests step through 10/50/100 and judge by the probes; tests/flows/test_guardrails.py bakes.
    config["rollout"].update(strategy="traffic_steps", traffic_steps=[10, 50, 100], bake_s=0, final_bake_s=0)
    config["smoke"]["max_new_tokens"] = 48
    path = folder / "flow.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def flow_config(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_flow_config(repo_root, tmp_path_factory.mktemp("flow"))


@pytest.fixture(scope="session")
def flow_settings(flow_config: Path) -> Settings:
    return load_config(flow_config)


@pytest.fixture(scope="session")
def first_run(prefect_harness: str, flow_config: Path, flow_settings: Settings) -> Iterator[dict[str, Any]]:
    """The whole flow once, from nothing to a live endpoint. The endpoint server is stopped afterwards."""
    from deployments.service import stop_server
    from flows.finetune_deploy import finetune_and_deploy

    try:
        yield finetune_and_deploy(str(flow_config))
    finally:
        stop_server(flow_settings)


def wait_for_paused_run(flow_name: str, timeout_s: float = 60) -> UUID:
    """The id of the flow run of ``flow_name`` that the Prefect API shows Paused, once it does."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    paused = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])), flow_run_filter=paused
            )
        if runs:
            return runs[0].id
        time.sleep(0.2)
    raise AssertionError(f"no flow run of {flow_name!r} paused within {timeout_s} s")


# A forced rollout of the champion in a flow process of its own, to be killed mid-way (argv: config path, flow name).
KILL_SCRIPT = """
import sys
from prefect import flow
from tasks.backends import get_backend
from tasks.config import load_config
from tasks.rollout import CHAMPION, run_rollout

@flow(name=sys.argv[2])
def go(config_path):
    settings = load_config(config_path)
    backend = get_backend(settings)
    run_rollout(backend, backend.get_model_by_alias(CHAMPION), settings, force=True)

go(sys.argv[1])
"""


def kill_rollout_once_split(
    backend: Backend, config: str | Path, flow_name: str, prefect_api_url: str, repo_root: Path, linger_s: float = 0.0
) -> dict[str, int]:
    """Starts :data:`KILL_SCRIPT` as flow ``flow_name`` and kills its process group (SIGKILL) ``linger_s`` after the
    endpoint's traffic is split between two deployments (the old and the new). Returns the split it saw."""
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url, "PYTHONPATH": str(repo_root)}
    process = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(config), flow_name], cwd=repo_root, env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        split: dict[str, int] = {}
        while time.monotonic() < deadline and process.poll() is None:
            split = live_traffic(backend.get_endpoint())
            if len(split) == 2:  # the first step (or canary bake) has moved traffic to the new deployment
                break
            time.sleep(0.05)
        assert len(split) == 2, f"the rollout never split traffic (exit {process.poll()})"
        time.sleep(linger_s)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    return split
