"""prefect.yaml deploys against a real, temporary Prefect server, and its scheduled deployment runs on a worker.

The server (``prefect server start`` on a free loopback port, PREFECT_HOME in tmp), the work pool, ``prefect
deploy --all``, ``prefect deployment run`` and a process worker polling once are the commands of the README;
the smoke-test deployment is run against the live endpoint of the session's flow run, and must complete. It runs
with ``smoke.route=score`` (a parameter override): the flow run itself smoke-tested the chat route, so this covers the
``/score`` route, the one Azure ML deployments serve, against the real local server and its ``x-finish-reason``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tasks.process_groups import stop_process_group
from tests.flows.conftest import free_port

pytestmark = pytest.mark.slow
PREFECT = [sys.executable, "-m", "prefect"]
POOL = "finetune-phi-process"


def test_prefect_yaml_shares_definitions_and_the_two_pipelines_differ_only_in_parameters(repo_root: Path) -> None:
    text = (repo_root / "prefect.yaml").read_text(encoding="utf-8")
    assert "definitions:" in text and "&process_pool" in text and "*process_pool" in text
    spec = yaml.safe_load(text)
    deployments = {d["name"]: d for d in spec["deployments"]}
    local, azure = deployments["finetune-and-deploy-local"], deployments["finetune-and-deploy-azureml"]
    differing = {k for k in set(local) | set(azure) if local.get(k) != azure.get(k)}
    assert differing <= {"name", "description", "parameters"}
    assert local["parameters"]["config_path"] == "configs/local.yaml"
    assert azure["parameters"]["config_path"] == "configs/azureml.yaml"
    assert deployments["smoke-test"]["schedules"][0]["cron"]
    assert all(d["work_pool"]["name"] == POOL for d in deployments.values())


@pytest.fixture()
def prefect_server(tmp_path: Path) -> Iterator[dict[str, str]]:
    """``prefect server start`` on a free port with its own home; stopped by PID (process group) afterwards."""
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
    }
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{env['PREFECT_API_URL']}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            time.sleep(0.5)
        else:
            pytest.fail("the temporary Prefect server did not become healthy in 90 s")
        yield env
    finally:
        stop_process_group(server, grace_s=20)
        log.close()


def _prefect(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> str:
    done = subprocess.run([*PREFECT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def test_deploy_all_and_run_the_smoke_deployment_on_a_process_worker(
    first_run, flow_config: Path, prefect_server: dict[str, str], repo_root: Path
) -> None:
    env = prefect_server
    _prefect(["work-pool", "create", POOL, "--type", "process"], env, repo_root)
    out = _prefect(["--no-prompt", "deploy", "--all"], env, repo_root)
    for name in ("finetune-and-deploy-local", "finetune-and-deploy-azureml", "smoke-test"):
        assert name in out

    params = json.dumps({"config_path": str(flow_config), "overrides": {"smoke.route": "score"}})
    out = _prefect(["deployment", "run", "smoke-test/smoke-test", "--params", params], env, repo_root)
    run_id = re.search(r"flow-run/([0-9a-f-]{36})", out)
    assert run_id, out
    _prefect(["worker", "start", "--pool", POOL, "--run-once"], env, repo_root, timeout=240)

    api = env["PREFECT_API_URL"]
    state = httpx.get(f"{api}/flow_runs/{run_id.group(1)}", timeout=10).json()["state"]
    assert state["type"] == "COMPLETED", state
    # The smoke table artifact of that run: /score, and every reply's end checked (the local server reports it).
    query = {"artifacts": {"flow_run_id": {"any_": [run_id.group(1)]}, "key": {"any_": ["smoke-test"]}}}
    artifacts = httpx.post(f"{api}/artifacts/filter", json=query, timeout=10).json()
    assert len(artifacts) == 1, artifacts
    assert "via /score" in artifacts[0]["description"] and "without an end check" not in artifacts[0]["description"]
    rows = artifacts[0]["data"] if isinstance(artifacts[0]["data"], list) else json.loads(artifacts[0]["data"])
    assert rows and all(row["finish_reason"] == "stop" and row["result"] == "ok" for row in rows), rows
