"""``GET /chat``: the endpoint's own chat page, three static files with no build step (``deployments/static/``).

The page needs no key to load; every call it makes (``POST /v1/chat/completions``, streamed) carries the key the
person typed, from the tab's session storage. It is served from the endpoint's own origin, so the browser needs
no CORS headers to call the API or to read the ``azureml-model-deployment`` response header. The security headers
keep the page to its own script and style (no inline code) and to calls on its own origin: even a reply that got
past the page's ``textContent`` rendering could not run code.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

CHAT_PATH = "/chat"
_FILES = {  # path under /chat -> (file in deployments/static/, media type)
    "": ("chat.html", "text/html; charset=utf-8"),
    "/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
    "/chat.css": ("chat.css", "text/css; charset=utf-8"),
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

router = APIRouter(tags=["chat page"])


@cache
def page_file(name: str) -> bytes:
    """One of the page's files as shipped in the package (``deployments/static/``)."""
    return resources.files("deployments").joinpath("static", name).read_bytes()


def _serve(suffix: str) -> Response:
    name, media_type = _FILES[suffix]
    return Response(page_file(name), media_type=media_type, headers=SECURITY_HEADERS)


@router.get(CHAT_PATH, include_in_schema=False)
async def chat_page() -> Response:
    """The chat page (no key needed to load it)."""
    return _serve("")


@router.get(CHAT_PATH + "/chat.js", include_in_schema=False)
async def chat_script() -> Response:
    return _serve("/chat.js")


@router.get(CHAT_PATH + "/chat.css", include_in_schema=False)
async def chat_style() -> Response:
    return _serve("/chat.css")


__all__ = ["CHAT_PATH", "SECURITY_HEADERS", "page_file", "router"]
