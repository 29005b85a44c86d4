"""The product end to end: the whole flow on the tiny recipe, the unchanged re-run, and the rollout's failure modes
(a model that fails to load, a smoke test failing at the 50% step, the new deployment's process killed, a
process killed mid-rollout), each against
the real endpoint server with requests flowing throughout."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
import yaml
from prefect import flow

from tasks.backends import get_backend
from tasks.backends.base import Backend, ModelVersion
from tasks.config import Settings, SmokeConfig
from tasks.rollout import CHAMPION, RolloutFailed, default_step_check, live_traffic, run_rollout
from tasks.smoke import SmokeReport
from tests.client_threads import ClientThreads
from tests.flows.conftest import free_port, kill_rollout_once_split, wait_for_paused_run

pytestmark = pytest.mark.slow
SAMPLE_BODY = {"input_data": ["What is a Prefect flow?"], "params": {"max_new_tokens": 16, "do_sample": False}}


class Traffic(ClientThreads):
    """Sends the sample's /score request in a loop from a thread, as users would during a rollout."""

    def __init__(self, backend: Backend, pin: str | None = None, clients: int = 1) -> None:
        endpoint = backend.get_endpoint()
        assert endpoint is not None
        self.url = endpoint.scoring_uri
        self.headers = {"Authorization": f"Bearer {backend.scoring_key()}"}
        if pin is not None:  # users of one deployment (the live one), whatever the traffic split
            self.headers["azureml-model-deployment"] = pin
        self.statuses: list[int | str] = []
        super().__init__(clients)

    def run(self, index: int) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.stopping.is_set():
                try:
                    response = client.post(self.url, json=SAMPLE_BODY, headers=self.headers)
                    ok = response.status_code == 200 and isinstance(response.json(), list) and response.json()[0]
                    self.statuses.append(200 if ok else response.status_code)
                except httpx.HTTPError as exc:
                    self.statuses.append(type(exc).__name__)
                time.sleep(0.05)


def _consistent(backend: Backend) -> dict[str, int]:
    """Traffic sums to 100 over ready deployments and every deployment is ready; returns the live weights."""
    endpoint = backend.get_endpoint()
    assert endpoint is not None
    states = {d.name: d.state for d in endpoint.deployments}
    traffic = live_traffic(endpoint)
    assert sum(traffic.values()) == 100, traffic
    assert all(states.get(name) == "ready" for name in traffic), (traffic, states)
    assert all(state == "ready" for state in states.values()), states
    return traffic


def _names(backend: Backend) -> set[str]:
    endpoint = backend.get_endpoint()
    return {d.name for d in endpoint.deployments} if endpoint else set()


def _image_bytes(url: str) -> bytes:
    """The bytes an image artifact's URL stands for: a data: URI's payload or a file:// URL's file."""
    if url.startswith("data:image/png;base64,"):
        return base64.b64decode(url.split(",", 1)[1], validate=True)
    assert url.startswith("file://"), url
    return Path(urllib.parse.urlparse(url).path).read_bytes()


def _task_states(flow_run_id: UUID, names: set[str], timeout_s: float = 60) -> dict[str, list[str]]:
    """The state names the Prefect API recorded for the flow run's task runs, by task name ("prepare-data").

    Task run states reach the server as events, written a moment later: wait until every named task shows a
    final state."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout_s
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        found: dict[str, list[str]] = {}
        for run in runs:
            task = run.name.rsplit("-", 1)[0]  # Prefect names task runs "<task name>-<3 characters>"
            if task in names and run.state is not None and run.state.is_final():
                found.setdefault(task, []).append(run.state.name)
        if set(found) == names or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


@flow(name="rollout-under-test")
def _rollout_flow(config_path: str, version: ModelVersion, fail_at: int | None, force: bool) -> dict[str, Any]:
    """The flow's rollout on its own; ``fail_at`` runs the step check at that step with a smoke configuration the
    model cannot pass (one new token: its replies cannot end), which is a real failed check, not a simulated one."""
    from tasks.config import load_config

    settings = load_config(config_path)
    backend = get_backend(settings)

    def check(backend: Backend, settings: Settings, name: str, percent: int) -> tuple[SmokeReport, SmokeReport]:
        strict = SmokeConfig(prompts=settings.smoke.prompts, max_new_tokens=1) if percent == fail_at else None
        return default_step_check(backend, settings, name, percent, strict)

    return run_rollout(backend, version, settings, check=check, force=force).to_dict()


@flow(name="rollout-killing-the-new-deployment")
def _rollout_killing_the_new_deployment(config_path: str, version: ModelVersion) -> dict[str, Any]:
    """The flow's rollout of a fresh deployment whose process is killed (SIGKILL) once the first traffic step has
    moved traffic to it, before that step's check."""
    from deployments.client import EndpointAdminClient
    from deployments.keys import read_admin_key
    from tasks.config import load_config
    from tasks.state import state_paths

    settings = load_config(config_path)
    backend = get_backend(settings)
    url = f"http://{settings.endpoint.host}:{settings.endpoint.port}"
    admin = EndpointAdminClient(url, read_admin_key(state_paths(settings.state_dir).endpoint))

    def check(backend: Backend, settings: Settings, name: str, percent: int) -> tuple[SmokeReport, SmokeReport]:
        if percent == settings.rollout.traffic_steps[0]:
            pid = admin.get_state()["deployments"][name]["instances"][0]["pid"]
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while admin.get_state()["deployments"][name]["state"] == "ready" and time.monotonic() < deadline:
                time.sleep(0.05)
        return default_step_check(backend, settings, name, percent)

    return run_rollout(backend, version, settings, check=check, force=True).to_dict()


@pytest.fixture()
def backend(first_run: dict[str, Any], flow_settings: Settings) -> Iterator[Backend]:
    backend = get_backend(flow_settings)
    yield backend
    _consistent(backend)  # every test leaves the endpoint consistent


def test_first_run_trains_gates_and_rolls_out_to_a_live_endpoint(first_run, backend, flow_settings) -> None:
    assert first_run["gate"]["promote"], first_run["gate"]
    assert first_run["candidate"]["loss"] > 0 and first_run["candidate"]["perplexity"] > 1
    rollout = first_run["rollout"]
    assert not rollout["skipped"] and rollout["traffic_before"] == {}
    assert rollout["traffic_after"] == {rollout["deployment"]: 100}
    assert first_run["smoke"]["passed"]
    champion = backend.get_model_by_alias(CHAMPION)
    assert champion is not None and champion.version == first_run["version"]

    # A request through the endpoint, with the sample's own body and its own client code.
    traffic = Traffic(backend)
    response = httpx.post(traffic.url, json=SAMPLE_BODY, headers=traffic.headers, timeout=60)
    assert response.status_code == 200
    answer = response.json()
    assert isinstance(answer, list) and len(answer) == 1 and answer[0].strip()

    from prefect.artifacts import Artifact

    summary = Artifact.get("finetune-run-summary")
    assert summary is not None and "PROMOTE" in summary.data and first_run["rollout"]["deployment"] in summary.data
    assert Artifact.get("smoke-test") is not None
    # The loss curve is an image artifact holding the PNG the training job drew (inline, or a file:// link).
    curve = Artifact.get("loss-curve")
    assert curve is not None and curve.type == "image", curve
    drawn = Path(first_run["training"]["output_dir"]) / "loss_curve.png"
    png = _image_bytes(curve.data)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png == drawn.read_bytes()
    # The summary tells how to chat by reading the key, never by showing it.
    from deployments.keys import read_keys
    from tasks.state import state_paths

    keys = read_keys(state_paths(flow_settings.state_dir).endpoint)
    assert keys and all(key not in summary.data for key in keys.values())
    assert "finetune-phi endpoint keys" in summary.data
    # ... and links the endpoint's chat page, which answers without a key (its calls need one).
    chat_page = backend.get_endpoint().chat_page_url
    assert chat_page == traffic.url.removesuffix("/score") + "/chat" and f"]({chat_page})" in summary.data
    assert httpx.get(chat_page, timeout=10).status_code == 200


def test_unchanged_rerun_skips_data_training_and_deployment(first_run, flow_config, backend) -> None:
    from flows.finetune_deploy import finetune_and_deploy

    again = finetune_and_deploy(str(flow_config))
    assert again["states"] == {"data": "Cached", "training": "Cached"}
    assert again["version"] == first_run["version"]
    assert again["rollout"]["skipped"]
    assert _consistent(backend) == first_run["rollout"]["traffic_after"]


def test_refresh_data_prepares_the_data_again_and_training_stays_cached(first_run, flow_config, backend) -> None:
    from flows.finetune_deploy import finetune_and_deploy

    state = finetune_and_deploy(str(flow_config), refresh=["data"], return_state=True)
    again = state.result()
    recorded = _task_states(state.state_details.flow_run_id, {"prepare-data", "train-model"})
    assert recorded == {"prepare-data": ["Completed"], "train-model": ["Cached"]}, recorded
    assert again["states"] == {"data": "Completed", "training": "Cached"}
    # The same source gives the same manifest, so training's key, and the live model, stay the same.
    assert again["dataset"]["sha256"] == first_run["dataset"]["sha256"]
    assert again["version"] == first_run["version"] and again["rollout"]["skipped"]


def test_a_model_that_fails_to_load_is_rolled_back_while_the_old_one_keeps_answering(
    first_run, flow_config, flow_settings, backend
) -> None:
    before = _consistent(backend)
    champion = backend.get_model_by_alias(CHAMPION)
    # under the state folder, where the endpoint accepts a model path: the load itself must fail
    broken = Path(flow_settings.state_dir) / "test-models" / "broken-model"
    shutil.copytree(backend.model_folder(champion), broken)
    (broken / "config.json").write_text('{"model_type": "phi3", "hidden_size": "not a number"', encoding="utf-8")
    version = ModelVersion(champion.name, "900", "no-job", "models:/broken/900", local_path=broken)

    with Traffic(backend) as users:
        state = _rollout_flow(str(flow_config), version, None, False, return_state=True)
    assert state.is_failed()
    with pytest.raises(RolloutFailed, match="rolled back"):
        state.result()
    assert _consistent(backend) == before
    assert "model-v900" not in _names(backend)
    assert backend.get_model_by_alias(CHAMPION).version == champion.version
    assert users.statuses and set(users.statuses) == {200}, users.statuses


def test_a_smoke_failure_at_50_percent_restores_traffic_and_deletes_the_new_deployment(
    first_run, flow_config, backend
) -> None:
    before = _consistent(backend)
    names_before = _names(backend)
    champion = backend.get_model_by_alias(CHAMPION)
    with Traffic(backend) as users:
        state = _rollout_flow(str(flow_config), champion, 50, True, return_state=True)
    assert state.is_failed()
    with pytest.raises(RolloutFailed, match="at 50%"):
        state.result()
    assert _consistent(backend) == before
    assert _names(backend) == names_before  # the new deployment is gone
    assert users.statuses and set(users.statuses) == {200}, users.statuses


def test_a_new_deployment_killed_mid_rollout_is_rolled_back_and_the_live_one_never_fails(
    first_run, flow_config, backend
) -> None:
    """Its own process per deployment: kill -9 of the new one takes nothing of the live one's down."""
    before = _consistent(backend)
    names_before = _names(backend)
    champion = backend.get_model_by_alias(CHAMPION)
    live = next(iter(before))
    with Traffic(backend, pin=live, clients=3) as users:  # 3: the live deployment's max_concurrent_requests
        state = _rollout_killing_the_new_deployment(str(flow_config), champion, return_state=True)
    assert state.is_failed()
    with pytest.raises(RolloutFailed, match="rolled back"):
        state.result()
    assert _consistent(backend) == before
    assert _names(backend) == names_before  # the killed deployment is deleted, its restarted process stopped
    assert backend.get_model_by_alias(CHAMPION).version == champion.version
    assert len(users.statuses) >= 3 and set(users.statuses) == {200}, users.statuses


def test_a_rollout_failing_in_the_flow_is_rolled_back_and_its_summary_says_so(first_run, flow_config, backend) -> None:
    """The whole flow with a forced redeploy whose smoke test cannot pass (one new token: replies cannot end)."""
    from prefect.artifacts import Artifact

    from flows.finetune_deploy import finetune_and_deploy

    before = _consistent(backend)
    names_before = _names(backend)
    champion = backend.get_model_by_alias(CHAMPION)
    with Traffic(backend) as users:
        state = finetune_and_deploy(
            str(flow_config), overrides={"smoke.max_new_tokens": 1}, refresh=["deploy"], return_state=True
        )
    assert state.is_failed()
    with pytest.raises(RolloutFailed, match="rolled back") as failed:
        state.result()
    assert _consistent(backend) == before and _names(backend) == names_before
    assert backend.get_model_by_alias(CHAMPION).version == champion.version
    assert users.statuses and set(users.statuses) == {200}, users.statuses

    summary = Artifact.get("finetune-run-summary")
    assert summary is not None and summary.flow_run_id == state.state_details.flow_run_id
    section = summary.data.split("## Rollout failed, rolled back\n", 1)[1].split("\n\n", 1)[0]
    assert f"- reason: {failed.value}" in section
    traffic = ", ".join(f"{name} {weight}%" for name, weight in sorted(before.items()))
    assert f"- traffic before the rollout: {traffic}" in section
    assert f"- traffic after the rollback: {traffic}" in section
    assert f"- champion unchanged: v{champion.version}" in section
    assert ": deleted" in section


def test_a_rollout_killed_mid_way_converges_on_the_next_run(
    first_run, prefect_harness, flow_config, backend, repo_root, tmp_path
) -> None:
    before = _consistent(backend)
    names_before = _names(backend)
    split = kill_rollout_once_split(backend, flow_config, "rollout-to-be-killed", prefect_harness, repo_root)
    orphans = set(split) - set(before)
    assert orphans <= _names(backend)  # the crash left a deployment nobody owns, with traffic on it

    from flows.finetune_deploy import finetune_and_deploy

    again = finetune_and_deploy(str(flow_config))
    assert any("deleted" in action for action in again["rollout"]["reconcile"]), again["rollout"]
    assert _consistent(backend) == before
    assert not orphans & _names(backend)
    assert _names(backend) == names_before


def test_with_require_approval_no_traffic_moves_until_a_person_resumes_the_run(
    first_run, flow_config, backend, tmp_path
) -> None:
    """Last in this file: the approved redeploy of the champion becomes the live deployment."""
    from prefect.flow_runs import resume_flow_run

    config = yaml.safe_load(flow_config.read_text(encoding="utf-8"))
    config["rollout"].update(require_approval=True, approval_timeout_s=120, traffic_steps=[100])
    approving = tmp_path / "approval.yaml"
    approving.write_text(yaml.safe_dump(config), encoding="utf-8")
    before = _consistent(backend)
    champion = backend.get_model_by_alias(CHAMPION)
    done: dict[str, Any] = {}

    def roll_out() -> None:
        done["state"] = _rollout_flow(str(approving), champion, None, True, return_state=True)

    runner = threading.Thread(target=roll_out)
    runner.start()
    try:
        run_id = wait_for_paused_run("rollout-under-test", timeout_s=240)
        # Paused after the new deployment is up and passed its pinned smoke test, before any traffic moved.
        new = _names(backend) - set(before)
        assert len(new) == 1 and "state" not in done
        assert live_traffic(backend.get_endpoint()) == before
        resume_flow_run(run_id)
    finally:
        runner.join(timeout=240)
    result = done["state"].result()
    assert result["deployment"] in new and result["traffic_after"] == {result["deployment"]: 100}
    assert _consistent(backend) == {result["deployment"]: 100}


def test_a_missing_recipe_is_stopped_by_preflight_before_any_work(prefect_harness, flow_config, tmp_path, capsys):
    """`finetune-phi run --set training.recipe=training/recipes/nope.yaml` used to prepare the data and start a job
    that exited 2, twice; preflight stops it first, with one sentence."""
    from flows.cli import main

    state = tmp_path / "state"  # a state folder of its own, so the session's endpoint server is not its own
    args = ["run", "--config", str(flow_config), "--set", "training.recipe=training/recipes/nope.yaml"]
    assert main([*args, "--set", f"state_dir={state}", "--set", f"endpoint.port={free_port()}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "finetune-phi run: error: preflight stopped the run before it spent anything: recipe: "
        "training/recipes/nope.yaml does not exist; set training.recipe to a file in training/recipes/"
    )
    assert not any((state / "data").iterdir()) and not any((state / "jobs").iterdir())  # no data, no job
