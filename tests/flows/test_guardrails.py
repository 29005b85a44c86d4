"""Rollout guardrails on live traffic, against the real endpoint server under load from 8 clients: a canary that
fails 30% of requests, one 5x slower per token and one that stops ending its replies each fire their alarm during
the first bake and traffic returns to the champion (a model that never ends any reply is stopped earlier, by its
pinned smoke test; the one here ends its first two); with rescue on, users see none of the failures; a healthy
canary passes every bake and the final bake and the old deployment is retired; too little traffic makes the
synthetic probes decide; a flow killed mid-bake converges.

The faults come from the model server's test-engine switch: deployments ``model-v910`` to ``model-v913`` run
:class:`tests.faults.engine.FaultyRunner`, which honours a ``test_faults.json`` in a copy of the champion's model
folder; the server of the flow tests is restarted with the switch for this module. Bakes are seconds long (CI).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prefect import flow

from deployments.model_server import ENV_TEST_ENGINE
from tasks.backends import get_backend
from tasks.backends.base import Backend, ModelVersion
from tasks.config import Settings
from tasks.rollout import CHAMPION, RolloutFailed, live_traffic, run_rollout
from tests.client_threads import ClientThreads
from tests.faults import faulty_copy, faulty_engines
from tests.flows.conftest import kill_rollout_once_split

pytestmark = pytest.mark.slow
FAULTY_VERSIONS = ("910", "911", "912", "913")  # the versions given a faulty engine (deployments model-v910, ...)

GUARDED = {
    "strategy": "canary",
    "canary_percent": 25,
    "bake_s": 20,  # a bad canary ends it at its alarm; a slow one needs the time to answer min_requests
    "final_bake_s": 4,
    "keep_previous": 0,
    "alarms": {"min_requests": 8, "max_extension_s": 20, "check_interval_s": 0.5},
}


class Load(ClientThreads):
    """``clients`` threads sending chat requests in a loop through the endpoint (by traffic, never pinned)."""

    def __init__(self, backend: Backend, prompts: list[str], clients: int = 8, pause_s: float = 0.0) -> None:
        endpoint = backend.get_endpoint()
        assert endpoint is not None
        self.url = f"{endpoint.openai_base_url}/chat/completions"
        self.headers = {"Authorization": f"Bearer {backend.scoring_key()}"}
        self.prompts, self.pause_s = prompts, pause_s
        self.answers: list[tuple[int | str, str | None]] = []  # (status or exception name, deployment that answered)
        super().__init__(clients)

    def run(self, index: int) -> None:
        with httpx.Client(timeout=60) as client:
            n = index
            while not self.stopping.is_set():
                body = {
                    "messages": [{"role": "user", "content": self.prompts[n % len(self.prompts)]}],
                    "max_tokens": 48,
                    "temperature": 0,
                }
                n += 1
                try:
                    response = client.post(self.url, json=body, headers=self.headers)
                    self.answers.append((response.status_code, response.headers.get("azureml-model-deployment")))
                except httpx.HTTPError as exc:
                    self.answers.append((type(exc).__name__, None))
                time.sleep(self.pause_s)

    def failures(self) -> list[tuple[int | str, str | None]]:
        return [a for a in self.answers if a[0] != 200]


@pytest.fixture(scope="module")
def faulty_backend(first_run: dict[str, Any], flow_settings: Settings) -> Iterator[Backend]:
    """The flow tests' endpoint, restarted with the test-only faulty engine for the bad canaries, and room for the
    load's 8 clients to queue (no 429 for a full queue: every failure a client sees is then a deployment's)."""
    from deployments.service import stop_server

    stop_server(flow_settings)
    patch = pytest.MonkeyPatch()
    patch.setenv(ENV_TEST_ENGINE, faulty_engines([f"model-v{n}" for n in FAULTY_VERSIONS]))
    roomy = flow_settings.model_copy(
        update={"endpoint": flow_settings.endpoint.model_copy(update={"max_pending_requests": 64})}
    )
    backend = get_backend(roomy)
    backend.ensure_endpoint()  # starts the server, which reloads the champion's deployment
    patch.undo()
    yield backend


@pytest.fixture()
def guarded(flow_config: Path, tmp_path: Path) -> Any:
    """A config path with the flow tests' config and ``rollout`` fields replaced."""

    def write(**rollout: Any) -> str:
        config = yaml.safe_load(flow_config.read_text(encoding="utf-8"))
        config["rollout"].update({**GUARDED, **rollout})
        path = tmp_path / f"guarded-{len(list(tmp_path.glob('guarded-*')))}.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        return str(path)

    return write


@flow(name="guarded-rollout")
def _guarded_flow(config_path: str, version: ModelVersion, force: bool = False) -> dict[str, Any]:
    from tasks.config import load_config

    settings = load_config(config_path)
    return run_rollout(get_backend(settings), version, settings, force=force).to_dict()


def _faulty_version(backend: Backend, settings: Settings, number: str, **faults: Any) -> ModelVersion:
    """A copy of the champion with ``faults``, under the state folder (the endpoint serves no model from elsewhere)."""
    champion = backend.get_model_by_alias(CHAMPION)
    assert champion is not None
    folder = Path(settings.state_dir) / "test-models" / f"model-{number}"
    shutil.rmtree(folder, ignore_errors=True)
    copy = faulty_copy(backend.model_folder(champion), folder, **faults)
    return ModelVersion(champion.name, number, "no-job", f"models:/faulty/{number}", local_path=copy)


def _serving(backend: Backend) -> dict[str, int]:
    endpoint = backend.get_endpoint()
    assert endpoint is not None
    assert all(d.state == "ready" for d in endpoint.deployments), endpoint.deployments
    return live_traffic(endpoint)


def _failed_rollout(config: str, version: ModelVersion) -> dict[str, Any]:
    state = _guarded_flow(config, version, return_state=True)
    assert state.is_failed()
    with pytest.raises(RolloutFailed, match="rolled back") as failed:
        state.result()
    assert failed.value.rollout is not None
    return failed.value.rollout.to_dict()


def _router_errors(backend: Backend) -> dict[str, int]:
    """Server errors per deployment since the server started, as the router counts them."""
    return {name: counters.errors for name, counters in backend.live_metrics().mark().items()}


@pytest.mark.parametrize(
    ("faults", "alarm", "number"),
    [
        ({"fail_share": 0.3}, "error_rate", "910"),
        ({"slowdown": 5}, "latency", "912"),
        # Its first two replies end (the pinned smoke test passes), then none does: only users' requests show it.
        ({"never_end_after": 2}, "ended_share", "913"),
    ],
    ids=["30pct-failing", "5x-slower", "never-ending"],
)
def test_a_bad_canary_fires_its_alarm_during_the_first_bake_and_traffic_returns_to_the_champion(
    faulty_backend: Backend,
    flow_settings: Settings,
    guarded: Any,
    tmp_path: Path,
    faults: dict,
    alarm: str,
    number: str,
) -> None:
    before = _serving(faulty_backend)
    version = _faulty_version(faulty_backend, flow_settings, number, **faults)
    errors_before = _router_errors(faulty_backend)
    with Load(faulty_backend, flow_settings.smoke.prompts) as users:
        rollout = _failed_rollout(guarded(rescue=False), version)
    assert _serving(faulty_backend) == before
    first = rollout["steps"][0]
    assert first["percent"] == 25 and not first["passed"] and len(rollout["steps"]) == 1
    assert first["decided_by"] == "live" and first["verdict"]["alarm"] == alarm, first
    assert first["waited_s"] < GUARDED["bake_s"] + GUARDED["alarms"]["max_extension_s"]
    # The error-rate alarm may fire on the canary's first requests, before the champion has served one in the window;
    # the ratio alarms (latency, ended share) cannot decide without the champion's numbers.
    assert first["candidate"]["requests"] >= 1
    assert first["champion"]["requests"] >= (0 if alarm == "error_rate" else 1), first["champion"]
    assert rollout["live"]["alarm"]["alarm"] == alarm and Path(rollout["live"]["picture"]).is_file()
    # Users' failures are the bad canary's own, and only those: the champion failed nobody.
    errors_after = _router_errors(faulty_backend)
    champion = next(iter(before))
    assert errors_after.get(champion, 0) == errors_before.get(champion, 0)
    new_errors = errors_after.get(f"model-v{number}", 0)
    assert len(users.failures()) == new_errors, (users.failures(), new_errors)
    if alarm == "error_rate":
        assert new_errors >= 1


def test_with_rescue_on_users_see_no_failure_from_a_failing_canary_and_the_alarm_still_fires(
    faulty_backend: Backend, flow_settings: Settings, guarded: Any, tmp_path: Path
) -> None:
    before = _serving(faulty_backend)
    version = _faulty_version(faulty_backend, flow_settings, "911", fail_share=0.3)
    with Load(faulty_backend, flow_settings.smoke.prompts) as users:
        rollout = _failed_rollout(guarded(rescue=True), version)
    assert _serving(faulty_backend) == before
    first = rollout["steps"][0]
    assert first["rescue"] and first["decided_by"] == "live" and first["verdict"]["alarm"] == "error_rate", first
    assert first["candidate"]["errors"] >= 1 and first["candidate"]["rescued"] == first["candidate"]["errors"]
    assert users.answers and not users.failures(), users.failures()
    # Counted, not hidden: every failure of the canary is in the router's numbers, and the champion answered each
    # one. The router may count more than the step's window: a request between the traffic shift and the bake's
    # first reading, or after the alarm while the rollback restores traffic (rescue stays armed through both).
    router = faulty_backend.live_metrics().mark()["model-v911"]
    assert router.errors >= first["candidate"]["errors"] and router.rescued == router.errors, router


def test_too_little_traffic_extends_the_bake_then_the_probes_decide_and_the_summary_says_so(
    faulty_backend: Backend, flow_settings: Settings, guarded: Any
) -> None:
    from tasks.summary import render_summary

    before = _serving(faulty_backend)
    champion = faulty_backend.get_model_by_alias(CHAMPION)
    config = guarded(strategy="all_at_once", final_bake_s=2, alarms={**GUARDED["alarms"], "max_extension_s": 2})
    with Load(faulty_backend, flow_settings.smoke.prompts, clients=1, pause_s=1.0):
        rollout = _guarded_flow(config, champion, force=True)
    step = rollout["steps"][-1]
    assert step["passed"] and step["decided_by"] == "probes", step
    assert 2 + 2 <= step["waited_s"] < 20 and "the synthetic probes decided" in step["note"]
    assert _serving(faulty_backend) == {rollout["deployment"]: 100} and set(before) <= set(rollout["retired"])
    text = render_summary(
        dataset={}, training={}, candidate=None, champion=None, gate=None, version=champion.version,
        rollout=rollout, smoke=None, chat=None,
    )  # fmt: skip
    assert "the synthetic probes decided" in text
    row = next(line for line in text.splitlines() if line.startswith("| 100% |"))
    assert "| probes" in row and "passed" in row


def test_a_healthy_canary_passes_every_bake_and_the_final_bake_then_the_old_deployment_is_retired(
    faulty_backend: Backend, flow_settings: Settings, guarded: Any
) -> None:
    from prefect.artifacts import Artifact

    before = _serving(faulty_backend)
    champion = faulty_backend.get_model_by_alias(CHAMPION)
    with Load(faulty_backend, flow_settings.smoke.prompts) as users:
        rollout = _guarded_flow(guarded(bake_s=8), champion, force=True)
    assert [s["percent"] for s in rollout["steps"]] == [25, 100]
    assert all(s["passed"] and s["decided_by"] == "live" for s in rollout["steps"]), rollout["steps"]
    canary, final = rollout["steps"]
    assert canary["waited_s"] >= 8 and final["waited_s"] >= GUARDED["final_bake_s"]
    assert canary["champion"]["requests"] >= GUARDED["alarms"]["min_requests"]
    assert _serving(faulty_backend) == {rollout["deployment"]: 100}
    assert set(before) <= set(rollout["retired"])
    assert not users.failures(), users.failures()
    picture = Artifact.get("rollout-live-metrics")
    assert picture is not None and picture.type == "image"


def test_a_flow_killed_mid_bake_converges_on_the_next_run(
    faulty_backend: Backend, prefect_harness: str, guarded: Any, repo_root: Path
) -> None:
    before = _serving(faulty_backend)
    config = guarded(bake_s=60)
    flow_name = "guarded-rollout-to-be-killed"
    kill_rollout_once_split(faulty_backend, config, flow_name, prefect_harness, repo_root, linger_s=1.0)  # mid-bake
    champion = faulty_backend.get_model_by_alias(CHAMPION)
    again = _guarded_flow(config, champion)
    assert any("deleted" in action for action in again["reconcile"]), again
    assert again["skipped"] and _serving(faulty_backend) == before
