"""Shared, expensive set-up of the flow tests: one run of the whole flow (on the suite's Prefect harness) on the tiny
recipe (real training subprocess, MLflow on SQLite in tmp, the real endpoint server on a free loopback port).

Every test in this folder reuses that run's trained model and live endpoint; tests that change the endpoint put
it back (that is what they test). The endpoint server is stopped by PID at the end of the session.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml

from tasks.config import Settings, load_config

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
