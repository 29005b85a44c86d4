"""The run summary as a person reads it: the markdown artifact in the Prefect UI of a real `prefect server start`.

A flow run publishes the summary through ``publish_summary_task`` (what the main flow calls), with the numbers of
a first run on the sample data; Chromium opens the artifact's page. It checks that the UI renders the dataset and
training tables (not raw dicts), readable numbers and the chat page link, and takes the README's screenshot.
Slow (the server's first start migrates its database: ~10-40 s on 2 cores), so one server and one page.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.process_groups import stop_process_group
from tasks.summary import SUMMARY_KEY, how_to_chat, render_summary
from tests.browser.conftest import BrowserPage, save_screenshot
from tests.flow_chat.helpers import REPO_ROOT, free_port, wait_until_healthy

pytestmark = pytest.mark.slow

CHAT_PAGE = "http://127.0.0.1:8765/chat"


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`prefect server start` on a free port with its own PREFECT_HOME. Yields the API URL."""
    port = free_port()
    home = tmp_path_factory.mktemp("prefect-ui")
    api = f"http://127.0.0.1:{port}/api"
    # The UI's JavaScript calls the API at PREFECT_UI_API_URL, which defaults to port 4200, not the one given here.
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_API_URL=api)
    env.pop("PREFECT_API_URL", None)
    log = home / "server.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until_healthy(server, port, log, timeout_s=180, path="/api/health")
        yield api
    finally:
        stop_process_group(server, grace_s=15)


def _first_run_summary() -> str:
    """The summary of a first run on the shipped sample data (numbers as the README reports them)."""
    return render_summary(
        dataset={
            "sha256": "7343f8decb99e93b0c5d",
            "counts": {
                "input": 311,
                "invalid": 0,
                "valid": 311,
                "duplicates": 0,
                "unique": 311,
                "train": 249,
                "test": 62,
            },
            "rejected": {},
        },
        training={
            "job_id": "train-20261201-163201",
            "metrics": {
                "train_loss": 0.6123,
                "eval_loss": 0.47213,
                "eval_perplexity": 1.6034,
                "tokens_per_second": 3192.6,
                "steps": 300,
                "wall_time_s": 88.41,
            },
        },
        candidate={
            "label": "candidate v1",
            "loss": 0.47213,
            "perplexity": 1.6034,
            "ended_share": 0.9,
            "mean_latency_s": 0.21,
        },
        champion=None,
        gate={
            "promote": True,
            "reason": "no champion yet: the candidate (eval_loss 0.4721) becomes the first",
            "metric": "eval_loss",
            "candidate_value": 0.47213,
            "champion_value": None,
            "tolerance": 0.02,
        },
        version="1",
        rollout={
            "deployment": "model-v1",
            "skipped": False,
            "traffic_before": {},
            "traffic_after": {"model-v1": 100},
            "steps": [{"percent": p, "passed": True, "reason": "", "error_rate": 0.0} for p in (10, 50, 100)],
        },
        smoke={
            "cases": [
                {
                    "prompt": "What is a Prefect flow?",
                    "reply": "A Prefect flow is a Python function decorated with @flow.",
                    "finish_reason": "stop",
                    "latency_s": 0.3121,
                    "problem": None,
                }
            ]
        },
        chat=how_to_chat("http://127.0.0.1:8765/v1", "http://127.0.0.1:8765/score", chat_page_url=CHAT_PAGE),
        chat_page_url=CHAT_PAGE,
    )


# Run in a child process: a flow run against another server inside pytest would leave this process's Prefect
# clients (the events worker above all) pointed at a server that is gone when the module ends.
PUBLISH = """
import sys
from prefect import flow
from tasks.summary import publish_summary_task

@flow(name="finetune-and-deploy")
def publish(markdown: str) -> None:
    publish_summary_task(markdown, None)

publish(sys.stdin.read())
"""


def _publish(api: str, markdown: str) -> str:
    """Publish ``markdown`` as the main flow does, in a flow run on the server at ``api``; its artifact id."""
    env = dict(os.environ, PREFECT_API_URL=api, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), *sys.path]))
    done = subprocess.run(
        [sys.executable, "-c", PUBLISH], input=markdown, env=env, cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    query = json.dumps({"artifacts": {"key": {"any_": [SUMMARY_KEY]}}}).encode()
    request = urllib.request.Request(
        f"{api}/artifacts/filter", data=query, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        (artifact,) = json.load(response)
    return artifact["id"]


def test_the_run_summary_reads_well_in_the_prefect_ui(
    browser_page: BrowserPage, prefect_server: str, tmp_path: Path
) -> None:
    markdown = _first_run_summary()
    artifact_id = _publish(prefect_server, markdown)
    page = browser_page.page
    page.set_viewport_size({"width": 1100, "height": 900})
    page.goto(prefect_server.removesuffix("/api") + f"/artifacts/artifact/{artifact_id}")
    page.get_by_role("table").first.wait_for(timeout=90_000)  # the UI renders the markdown once its data is in

    shown = page.inner_text("main") if page.locator("main").count() else page.inner_text("body")
    assert "rows read" in shown and "duplicates removed" in shown and "tokens per second" in shown
    assert "3,193" in shown and "88.4 s" in shown and "3192.6000" not in shown and "{'input'" not in shown
    link = page.locator(f"a[href='{CHAT_PAGE}']")
    assert link.count() >= 1 and link.first.is_visible()
    save_screenshot(page, "prefect-run-summary.png", tmp_path, full_page=True)
