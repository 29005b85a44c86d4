"""The sample's last step in a real browser: flow_chat/README.md's `pf flow serve` command, its chat page, two turns.

The flow's connection points at the recording server of tests/flow_chat (a real loopback HTTP server that answers
``heard N turns; last: <question>`` and keeps every body it got), so the test asserts on what the endpoint
received: the second request carries the first turn, question and answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.chat_connection import EndpointTarget, configure_promptflow, create_or_update_connection
from tests.browser.conftest import BrowserPage, save_screenshot
from tests.flow_chat.helpers import free_port, pf_flow_serve, settings_for
from tests.flow_chat.recording_server import RecordingServer

pytestmark = pytest.mark.slow

KEY = "pf-serve-page-key-51c2"


@pytest.fixture(scope="module")
def recorder() -> Iterator[RecordingServer]:
    with RecordingServer(key=KEY) as server:
        yield server


@pytest.fixture(scope="module")
def pf_serve(recorder: RecordingServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The README's `pf flow serve` command with the connection on the recorder. Yields the page's URL."""
    settings = settings_for(tmp_path_factory.mktemp("pf-serve-page"), port=free_port())
    configure_promptflow(settings.state_dir)
    create_or_update_connection(settings, target=EndpointTarget(recorder.base_url, KEY, "local"))
    with pf_flow_serve(tmp_path_factory.mktemp("pf-serve-log") / "serve.log") as port:
        yield f"http://127.0.0.1:{port}/"


def test_the_documented_command_serves_a_chat_that_keeps_the_history(
    browser_page: BrowserPage, pf_serve: str, recorder: RecordingServer, tmp_path: Path
) -> None:
    page = browser_page.page
    response = page.goto(pf_serve)
    assert response is not None and response.status == 200
    question_box = page.get_by_role("textbox").last
    before = len(recorder.bodies())
    first, second = "What is a Prefect flow?", "How do I run it every night?"
    question_box.fill(first)
    question_box.press("Enter")
    page.get_by_text(f"heard 1 turns; last: {first}", exact=True).wait_for()
    question_box.fill(second)
    question_box.press("Enter")
    page.get_by_text(f"heard 3 turns; last: {second}", exact=True).wait_for()

    # Each answer is a chat message of its own text: not a JSON block with other outputs around it.
    body_text = page.inner_text("body")
    assert "finish_reason" not in body_text and '"answer"' not in body_text
    for shown in (first, second, f"heard 1 turns; last: {first}", f"heard 3 turns; last: {second}"):
        assert page.get_by_text(shown, exact=True).count() >= 1, shown
    turn1, turn2 = recorder.bodies()[before:]
    assert turn1["messages"] == [{"role": "user", "content": first}]
    assert turn2["messages"] == [
        {"role": "user", "content": first},
        {"role": "assistant", "content": f"heard 1 turns; last: {first}"},
        {"role": "user", "content": second},
    ]
    # The page asked the serving app's own routes only; its web fonts from a CDN were blocked, nothing else left.
    scores = browser_page.posts("/score")
    assert len(scores) == 2 and all(r.url.startswith(pf_serve) for r in scores)
    page.set_viewport_size({"width": 960, "height": 800})  # both turns in view
    save_screenshot(page, "pf-flow-serve.png", tmp_path)
