"""The chat page (``GET /chat``) on a real local endpoint serving a tiny model, in real headless Chromium.

One endpoint server for the module (``python -m deployments.server``, one deployment ``blue`` at 100%): the page
loads without a key, streams a reply that grows before it ends, keeps the history across two turns, "new chat"
clears it, "stop" ends a long reply (and the endpoint stops generating it), a wrong key and then a stopped
endpoint each show their sentence, and the key is in no request URL
and in no line of the server's log. The last test stops the server.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from deployments.chat_page import SECURITY_HEADERS
from deployments.service import stop_server
from tests.browser.conftest import BrowserPage, save_screenshot
from tests.browser.pages import WATCH_GROWTH, ask, open_chat, replies, sent_messages, status, wait_idle
from tests.conftest import shared_temp_root
from tests.deployments.conftest import LiveEndpoint, wait_for

pytestmark = pytest.mark.slow


LONG_BUDGET = 900  # tokens: an untrained model rarely ends, so a reply this long is still streaming when stopped


@pytest.fixture(scope="module")
def endpoint(
    launch, trained_tiny_model: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> LiveEndpoint:
    """``blue``: the session's trained tiny model (trained once for the suite) at 100%, its replies read like the
    README's; ``untrained`` at 0% (reached by pinning it in the page), whose replies run to the token budget."""
    # Both models live in pytest's temporary folders, which the endpoint must be told it may load from.
    live = launch(max_new_tokens_cap=LONG_BUDGET, model_roots=[str(shared_temp_root(tmp_path_factory))])
    live.deploy(trained_tiny_model, {"blue": 100})
    live.admin.create_deployment("untrained", str(tiny_model_dir), "0")
    live.admin.wait_ready("untrained", 120)
    return live


def _generated_tokens(endpoint: LiveEndpoint, deployment: str) -> int:
    """Tokens the deployment generated so far, from the endpoint's /metrics."""
    prefix = f'finetune_phi_generated_tokens_total{{deployment="{deployment}"}} '
    text = httpx.get(f"{endpoint.url}/metrics", timeout=10).text
    return next((int(float(line[len(prefix) :])) for line in text.splitlines() if line.startswith(prefix)), 0)


def _assert_key_never_in_a_url(seen: BrowserPage, key: str) -> None:
    assert seen.requests and all(key not in r.url for r in seen.requests)


def test_page_loads_without_a_key_and_its_calls_need_one(endpoint: LiveEndpoint) -> None:
    page = httpx.get(f"{endpoint.url}/chat", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == SECURITY_HEADERS["Content-Security-Policy"]
    for asset in ("/chat/chat.js", "/chat/chat.css"):
        assert httpx.get(endpoint.url + asset, timeout=10).status_code == 200
    assert httpx.post(f"{endpoint.url}/v1/chat/completions", json={"messages": []}, timeout=10).status_code == 401


def test_two_turns_stream_with_history_and_new_chat_clears(
    browser_page: BrowserPage, endpoint: LiveEndpoint, tmp_path: Path
) -> None:
    page, key = browser_page.page, endpoint.keys["primary"]
    open_chat(page, endpoint.url, key)
    assert page.evaluate("() => Object.keys(sessionStorage)") == ["finetune-phi.endpoint-key"]
    page.locator("#max-tokens").fill("48")
    page.locator("#temperature").fill("0")  # greedy: the trained answers, the same on every run
    page.evaluate(WATCH_GROWTH)
    ask(page, "What is a Prefect flow?")
    growth = page.evaluate("() => window.__growth")
    # Text appeared in steps while the reply still streamed: at least two different non-empty lengths.
    assert len({n for n in growth if n > 0}) >= 2, growth
    first_q, first_a = replies(page)
    assert first_q == {"role": "user", "text": "What is a Prefect flow?", "meta": ""}
    assert first_a["text"] and first_a["meta"] in ("blue · finish: length", "blue · finish: stop")

    ask(page, "How do I run it every night?")
    messages = replies(page)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"] and messages[3]["text"]
    first, second = (sent_messages(r.body) for r in browser_page.posts("/v1/chat/completions"))
    assert first == [{"role": "user", "content": "What is a Prefect flow?"}]
    assert second == [
        {"role": "user", "content": "What is a Prefect flow?"},
        {"role": "assistant", "content": first_a["text"]},  # the reply as the page showed it
        {"role": "user", "content": "How do I run it every night?"},
    ]
    save_screenshot(page, "chat-page.png", tmp_path)

    page.locator("#new-chat").click()
    assert replies(page) == []
    ask(page, "Hello again")
    assert sent_messages(browser_page.posts("/v1/chat/completions")[-1].body) == [
        {"role": "user", "content": "Hello again"}
    ]
    posts = browser_page.posts("/v1/chat/completions")
    assert all(r.headers["authorization"] == f"Bearer {key}" for r in posts)
    _assert_key_never_in_a_url(browser_page, key)


def test_wrong_key_shows_its_sentence_and_asks_again(browser_page: BrowserPage, endpoint: LiveEndpoint) -> None:
    page = browser_page.page
    open_chat(page, endpoint.url, "not-the-endpoint-key-1234")
    ask(page, "Hello?")
    assert status(page) == (
        "The endpoint refused the key (HTTP 401): enter the current key; `finetune-phi endpoint keys` prints it."
    )
    assert page.locator("#key-form").is_visible() and page.evaluate("() => sessionStorage.length") == 0
    open_chat(page, endpoint.url, None)  # a reload: the right key once, and the question goes through
    page.locator("#key").fill(endpoint.keys["primary"])
    page.locator("#key-form button[type=submit]").click()
    ask(page, "Hello?")
    assert status(page) == "" and replies(page)[1]["meta"].startswith("blue · finish: ")
    _assert_key_never_in_a_url(browser_page, endpoint.keys["primary"])


def test_stop_ends_a_long_reply_and_the_endpoint_stops_generating(
    browser_page: BrowserPage, endpoint: LiveEndpoint
) -> None:
    page = browser_page.page
    open_chat(page, endpoint.url, endpoint.keys["primary"])
    page.locator("#deployment").fill("untrained")  # the pin box: header azureml-model-deployment
    page.locator("#max-tokens").fill(str(LONG_BUDGET))
    page.locator("#temperature").fill("0")
    before = _generated_tokens(endpoint, "untrained")
    ask(page, "Tell me everything about Prefect.", wait=False)
    page.wait_for_function("() => document.querySelector('#messages .msg.assistant .text').textContent.length > 0")
    # Clicked from the page at once: the engine streams the whole budget in under 2 s on an idle machine, and
    # Playwright's click would first wait for the growing reply's layout to settle.
    page.evaluate("() => document.querySelector('#stop').click()")
    wait_idle(page)
    _, reply = replies(page)
    assert reply["meta"] == "untrained · finish: stopped" and reply["text"] and status(page) == ""
    assert browser_page.posts("/v1/chat/completions")[-1].headers["azureml-model-deployment"] == "untrained"
    # The endpoint saw the client go and cancelled the generation: its slot is free, well short of the budget.
    wait_for(lambda: endpoint.in_flight("untrained") == 0, "the stopped request to leave the endpoint", 30)
    assert 0 < _generated_tokens(endpoint, "untrained") - before < LONG_BUDGET


def test_stopped_endpoint_shows_its_sentence_and_the_log_has_no_key(
    browser_page: BrowserPage, endpoint: LiveEndpoint
) -> None:
    page = browser_page.page
    open_chat(page, endpoint.url, endpoint.keys["primary"])
    keys = endpoint.keys
    assert stop_server(endpoint.settings)
    ask(page, "Are you there?")
    assert status(page) == (
        "The endpoint cannot be reached or is stopping: start it with `finetune-phi endpoint start`, then send again."
    )
    assert replies(page) == [] and page.locator("#question").input_value() == "Are you there?"
    log = endpoint.log_text
    assert "POST /v1/chat/completions" in log  # the log is the server's, with this module's requests in it
    assert all(value not in log for value in keys.values())
