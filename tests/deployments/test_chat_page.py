"""deployments/chat_page.py: the chat page's files ship with the package and are served with their headers."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

from fastapi import FastAPI
from fastapi.testclient import TestClient

from deployments import chat_page

REPO_ROOT = Path(__file__).resolve().parents[2]
STATIC = REPO_ROOT / "deployments" / "static"


def test_every_page_file_is_package_data() -> None:
    """A wheel or a non-editable install carries deployments/static/ only if pyproject names its files."""
    patterns = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = patterns["deployments"]
    files = sorted(p.relative_to(STATIC.parent).as_posix() for p in STATIC.iterdir() if p.is_file())
    assert files == ["static/chat.css", "static/chat.html", "static/chat.js"]
    assert all(any(fnmatch.fnmatch(f, pattern) for pattern in shipped) for f in files)


def test_the_page_and_its_assets_are_served_with_the_security_headers() -> None:
    app = FastAPI()
    app.include_router(chat_page.router)
    client = TestClient(app)
    for path, media_type, name in (
        ("/chat", "text/html", "chat.html"),
        ("/chat/chat.js", "text/javascript", "chat.js"),
        ("/chat/chat.css", "text/css", "chat.css"),
    ):
        response = client.get(path)
        assert response.status_code == 200 and response.headers["content-type"].startswith(media_type)
        assert response.content == (STATIC / name).read_bytes()
        for header, value in chat_page.SECURITY_HEADERS.items():
            assert response.headers[header] == value
    # The page loads its own script and style only: no inline code for the policy to allow.
    html = (STATIC / "chat.html").read_text(encoding="utf-8")
    assert '<script src="/chat/chat.js"' in html and "<script>" not in html and "<style" not in html
    assert "innerHTML" not in (STATIC / "chat.js").read_text(encoding="utf-8")
