"""The chat page against a scripted OpenAI-compatible server (tests/browser/scripted_endpoint.py): the replies a
real tiny model cannot be made to give on cue. Markup in a reply shows as text, "stop" ends a long reply (and the
server sees the client go away), a 429, a 503 (stopping), a 408 and a timeout inside the stream each show their
one sentence."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.browser.conftest import BrowserPage
from tests.browser.pages import ask, open_chat, replies, status, wait_idle
from tests.browser.scripted_endpoint import DEPLOYMENT, LONG_WORD, MARKUP_REPLY, ScriptedEndpoint
from tests.deployments.conftest import wait_for

KEY = "scripted-endpoint-key-7f3a"


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedEndpoint]:
    with ScriptedEndpoint(KEY) as server:
        yield server


def test_markup_in_a_reply_shows_as_text(browser_page: BrowserPage, scripted: ScriptedEndpoint) -> None:
    page = browser_page.page
    open_chat(page, scripted.url, KEY)
    title = page.title()
    ask(page, "markup")
    _, reply = replies(page)
    assert reply["text"] == MARKUP_REPLY and reply["meta"] == f"{DEPLOYMENT} · finish: stop"
    # Nothing of it became an element or ran: no script or image in the messages, title unchanged, no handler fired.
    assert page.locator("#messages script, #messages img, #messages b").count() == 0
    assert page.title() == title and page.evaluate("() => window.pwned") is None


def test_stop_ends_a_long_reply(browser_page: BrowserPage, scripted: ScriptedEndpoint) -> None:
    page = browser_page.page
    open_chat(page, scripted.url, KEY)
    abandoned = scripted.long_replies_abandoned
    ask(page, "long", wait=False)
    page.wait_for_function("() => document.querySelector('#messages .msg.assistant .text').textContent.length > 40")
    page.locator("#stop").click()
    wait_idle(page)
    _, reply = replies(page)
    assert reply["meta"] == f"{DEPLOYMENT} · finish: stopped" and status(page) == ""
    stopped_at = len(reply["text"])
    assert 40 < stopped_at < 3000 * len(LONG_WORD)
    wait_for(lambda: scripted.long_replies_abandoned == abandoned + 1, "the server to see the client go away", 10)
    time.sleep(0.3)  # the reply would have grown by ~15 words by now if the stream still ran
    assert len(replies(page)[-1]["text"]) == stopped_at
    # The stopped exchange is history: the next question carries it.
    ask(page, "and now?")
    assert scripted.bodies[-1]["messages"][:2] == [
        {"role": "user", "content": "long"},
        {"role": "assistant", "content": reply["text"]},
    ]


def test_new_chat_during_a_reply_stops_it_and_starts_empty(
    browser_page: BrowserPage, scripted: ScriptedEndpoint
) -> None:
    page = browser_page.page
    open_chat(page, scripted.url, KEY)
    abandoned = scripted.long_replies_abandoned
    ask(page, "long", wait=False)
    page.wait_for_function("() => document.querySelector('#messages .msg.assistant .text').textContent.length > 10")
    page.locator("#new-chat").click()
    wait_idle(page)
    assert replies(page) == [] and status(page) == ""
    wait_for(lambda: scripted.long_replies_abandoned == abandoned + 1, "the server to see the client go away", 10)
    ask(page, "hello")
    assert scripted.bodies[-1]["messages"] == [{"role": "user", "content": "hello"}]
    assert [m["text"] for m in replies(page)] == ["hello", "heard 1 turns"]


@pytest.mark.parametrize(
    ("question", "sentence"),
    [
        ("busy", "The endpoint is busy (HTTP 429, too many requests in flight): wait a moment and send again."),
        (
            "stopping",
            "The endpoint cannot be reached or is stopping: start it with `finetune-phi endpoint start`, "
            "then send again.",
        ),
        (
            "too slow",
            "The reply took longer than the endpoint's request timeout (HTTP 408): ask for fewer max tokens "
            "or send again.",
        ),
    ],
)
def test_a_refused_request_shows_its_sentence(
    browser_page: BrowserPage, scripted: ScriptedEndpoint, question: str, sentence: str
) -> None:
    page = browser_page.page
    open_chat(page, scripted.url, KEY)
    ask(page, question)
    assert status(page) == sentence
    # Nothing came back: the exchange leaves the page and the question returns to the box, to send again.
    assert replies(page) == [] and page.locator("#question").input_value() == question


def test_timeout_shows_its_sentence(browser_page: BrowserPage, scripted: ScriptedEndpoint) -> None:
    page = browser_page.page
    open_chat(page, scripted.url, KEY)
    ask(page, "timeout")
    assert status(page).startswith("The reply took longer than the endpoint's request timeout (HTTP 408)")
    _, reply = replies(page)
    assert reply["text"] == "Thinking about it" and reply["meta"].endswith("finish: error")
    ask(page, "again")  # a failed exchange is not sent as history
    assert scripted.bodies[-1]["messages"] == [{"role": "user", "content": "again"}]
