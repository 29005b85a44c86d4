"""Every run ends with the champion verified as serving, tried as a new user would: the local endpoint stopped (a
reboot does the same) and a candidate the gate rejects; then the same with the champion's model files gone."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from deployments.service import server_status, stop_server
from tasks.backends import get_backend
from tasks.config import Settings
from tasks.registry import TAG_MODEL_DIR
from tasks.rollout import CHAMPION, live_traffic
from tasks.serving import ChampionNotServing, ensure_champion_serving
from tasks.state import state_paths

pytestmark = pytest.mark.slow
# A much shorter training than the champion's: its loss is worse, so the gate rejects it.
WORSE = {"training.overrides.max_steps": 4}


def test_endpoint_stopped_and_candidate_rejected_the_run_brings_the_champion_back_and_smoke_tests_it(
    first_run: dict[str, Any], flow_config: Path, flow_settings: Settings
) -> None:
    from prefect.artifacts import Artifact

    from flows.finetune_deploy import finetune_and_deploy

    champion = get_backend(flow_settings).get_model_by_alias(CHAMPION)
    stop_server(flow_settings)
    assert not server_status(flow_settings).healthy
    result = finetune_and_deploy(str(flow_config), overrides=WORSE)
    assert not result["gate"]["promote"], result["gate"]
    serving = result["serving"]
    assert serving["champion"] == champion.version
    assert serving["checked"][0] == "endpoint was down: started it"
    assert serving["checked"][-1].startswith("unpinned smoke test passed")
    assert result["smoke"]["passed"] and server_status(flow_settings).healthy
    assert live_traffic(get_backend(flow_settings).get_endpoint()) == {serving["deployment"]: 100}
    summary = Artifact.get("finetune-run-summary")
    assert summary is not None and "## Serving (checked at the end of the run)" in summary.data
    assert "- endpoint was down: started it" in summary.data and "REJECT" in summary.data


def test_with_the_champions_model_files_gone_the_run_fails_with_one_sentence_saying_so(
    first_run: dict[str, Any], flow_config: Path, flow_settings: Settings, tmp_path: Path
) -> None:
    from flows.finetune_deploy import finetune_and_deploy

    backend = get_backend(flow_settings)
    champion = backend.get_model_by_alias(CHAMPION)
    paths = state_paths(flow_settings.state_dir)
    # Where the champion's model can come from: the job's folder, the registry's artifacts and its downloads.
    gone = [Path(champion.tags.get(TAG_MODEL_DIR, "")), paths.mlflow_artifacts, paths.mlflow / "downloads"]
    moved = [(path, tmp_path / f"gone-{i}") for i, path in enumerate(gone) if str(path) != "." and path.exists()]
    assert len(moved) >= 2, moved
    stop_server(flow_settings)
    for path, aside in moved:
        shutil.move(path, aside)
    try:
        state = finetune_and_deploy(str(flow_config), overrides=WORSE, return_state=True)
        assert state.is_failed()
        with pytest.raises(ChampionNotServing) as failed:
            state.result()
        message = str(failed.value)
        assert message.startswith(f"champion v{champion.version} cannot be served again: deploying it as ")
        assert "model files are gone or broken" in message and "\n" not in message
    finally:
        stop_server(flow_settings)
        for path, aside in moved:
            shutil.rmtree(path, ignore_errors=True)  # what the failed run wrote there meanwhile
            shutil.move(aside, path)
    report = ensure_champion_serving(get_backend(flow_settings), flow_settings)  # the files are back: it serves
    assert report.deployment is not None and server_status(flow_settings).healthy
