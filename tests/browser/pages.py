"""What a person does on the endpoint's chat page (``GET /chat``), as Playwright steps, and what they see."""

from __future__ import annotations

import json
from typing import Any

# Records, from inside the page, each length the streaming reply's text reached while the reply was still
# streaming: the proof that text grows as it is generated rather than arriving whole.
WATCH_GROWTH = """() => {
  window.__growth = [];
  new MutationObserver(() => {
    const reply = [...document.querySelectorAll("#messages .msg.assistant")].pop();
    if (reply && reply.classList.contains("streaming")) {
      window.__growth.push(reply.querySelector(".text").textContent.length);
    }
  }).observe(document.getElementById("messages"), {subtree: true, childList: true, characterData: true});
}"""


def open_chat(page: Any, base_url: str, key: str | None) -> None:
    """Load the page and, when ``key`` is given, type it into the key form (the page asks once per tab)."""
    response = page.goto(f"{base_url}/chat")
    assert response is not None and response.status == 200
    if key is not None:
        page.locator("#key").fill(key)
        page.locator("#key-form button[type=submit]").click()
        page.locator("#key-form").wait_for(state="hidden")


def ask(page: Any, question: str, *, wait: bool = True) -> None:
    """Type ``question`` and press Enter; with ``wait``, until the page is ready for the next one."""
    page.locator("#question").fill(question)
    page.locator("#question").press("Enter")
    if wait:
        wait_idle(page)


def wait_idle(page: Any) -> None:
    page.wait_for_function("() => !document.getElementById('send').disabled")


def replies(page: Any) -> list[dict[str, str]]:
    """Every message on the page, oldest first: role, text (as shown) and the line under it."""
    return page.eval_on_selector_all(
        "#messages .msg",
        """els => els.map(el => ({
             role: el.classList.contains("user") ? "user" : "assistant",
             text: el.querySelector(".text").textContent,
             meta: el.querySelector(".meta").textContent}))""",
    )


def status(page: Any) -> str:
    return page.locator("#status").text_content() or ""


def sent_messages(request_body: str | None) -> list[dict[str, str]]:
    """The chat turns a request to /v1/chat/completions carried."""
    return json.loads(request_body or "{}")["messages"]
