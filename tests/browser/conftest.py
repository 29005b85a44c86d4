"""Real headless Chromium (Debian's ``chromium`` package) driven by Playwright for Python, for what a person sees.

One browser per test module; each test gets a fresh context (its own session storage and cookies). Pages reach
only loopback: every other request (web fonts a page asks for, anything else) is aborted, so nothing leaves the
machine. Screenshots go to a temporary folder; with ``FINETUNE_PHI_UPDATE_SCREENSHOTS=1`` they also replace the
README's images in ``docs/img/``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.deployments.conftest import launch, tiny_model_dir  # noqa: F401  (the endpoint tests' fixtures)

REPO_ROOT = Path(__file__).resolve().parents[2]
README_IMAGES = REPO_ROOT / "docs" / "img"
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser")
# Headless and quiet: no GPU, no background calls home (component updates, sync, field trials), no first-run UI.
# --no-sandbox: CI and containers run as root, where Chromium's sandbox refuses to start.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 960, "height": 640}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def chromium_path() -> str | None:
    """The system Chromium (``FINETUNE_PHI_CHROMIUM`` names another); None when there is none."""
    if os.environ.get("FINETUNE_PHI_CHROMIUM"):
        return os.environ["FINETUNE_PHI_CHROMIUM"]
    return next((found for name in CHROMIUM_CANDIDATES if (found := shutil.which(name))), None)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One Chromium per test module (a second or so to start): Playwright's event loop ends with the module, so
    it never outlives the browser tests into the rest of the suite."""
    executable = chromium_path()
    if executable is None:
        pytest.skip(
            "no Chromium on this machine: `python3 scripts/dev.py test` installs Debian's chromium with apt-get "
            "where it can (root, Debian/Ubuntu); elsewhere install it and rerun, or set FINETUNE_PHI_CHROMIUM"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: `pip install -c constraints.txt -e .[dev]`")
    # launch() gives every browser a fresh temporary profile (user data dir) and removes it on close.
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class SeenRequest:
    method: str
    url: str
    headers: dict[str, str]
    body: str | None


@dataclass
class BrowserPage:
    """A page in its own context, and every request it made (what left the browser, as the server got it)."""

    page: Any
    requests: list[SeenRequest] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)

    def posts(self, path: str) -> list[SeenRequest]:
        return [r for r in self.requests if r.method == "POST" and urlsplit(r.url).path == path]


@pytest.fixture
def browser_page(browser: Any) -> Iterator[BrowserPage]:
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    seen = BrowserPage(page)

    def only_loopback(route: Any) -> None:
        if urlsplit(route.request.url).hostname in LOOPBACK_HOSTS:
            route.continue_()
        else:
            seen.blocked.append(route.request.url)
            route.abort()

    context.route("**/*", only_loopback)
    page.on(
        "request",
        lambda r: seen.requests.append(SeenRequest(r.method, r.url, dict(r.headers), r.post_data)),
    )
    page.set_default_timeout(30_000)
    try:
        yield seen
    finally:
        context.close()


def save_screenshot(page: Any, name: str, tmp_path: Path, **options: Any) -> Path:
    """A PNG of the page under ``tmp_path`` (and over ``docs/img/<name>`` when screenshots are being updated)."""
    path = tmp_path / name
    page.screenshot(path=str(path), **options)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2_000, path
    if os.environ.get("FINETUNE_PHI_UPDATE_SCREENSHOTS") == "1":
        README_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, README_IMAGES / name)
    return path
