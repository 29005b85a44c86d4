"""What the router and the deployment processes share: error shapes, request bodies, header names.

Nothing here imports torch: the router (:mod:`deployments.server`) parses and validates every request with these
models before it picks a deployment, and the deployment process (:mod:`deployments.model_server`) parses the same
body again to generate.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

PIN_HEADER = "azureml-model-deployment"
FINISH_HEADER = "x-finish-reason"
# Router -> deployment process: the instance's secret (the process listens on loopback; only the router knows it),
# the time left of the request's budget, and back: tokens generated for a non-streamed reply.
INSTANCE_TOKEN_HEADER = "x-finetune-phi-instance-token"
TIME_LEFT_HEADER = "x-finetune-phi-time-left-ms"
TOKENS_HEADER = "x-finetune-phi-completion-tokens"
# W3C Server Timing: a non-streamed reply says how long the deployment process spent on it ("deployment;dur=<ms>"),
# relayed by the router, so a client (the serve benchmark) can tell the deployment's time from the hops around it.
SERVER_TIMING_HEADER = "server-timing"
ENV_INSTANCE_TOKEN = "FINETUNE_PHI_INSTANCE_TOKEN"


def server_timing(started: float) -> str:
    """The Server-Timing value for a reply whose handling began at ``started`` (``time.monotonic()``)."""
    return f"deployment;dur={(time.monotonic() - started) * 1000:.2f}"


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with its HTTP status."""

    def __init__(
        self, status: int, code: str, message: str, *, param: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param, self.headers = status, code, message, param, headers or {}


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


def error_body(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"code": code, "message": message, "type": kind, "param": param}}


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(
        error_body(error.status, error.code, error.message, error.param),
        status_code=error.status,
        headers=error.headers,
    )


# ---------------------------------------------------------------------------------------------------------- bodies
class RequestBody(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ChatTurn(RequestBody):
    role: Literal["system", "user", "assistant"]
    content: str


class ScoreParams(RequestBody):
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_new_tokens: int | None = Field(None, ge=1)
    do_sample: bool | None = None
    return_full_text: bool = False
    return_finish_reason: bool = False  # ours: answer [{"text", "finish_reason"}] instead of plain strings


class ScoreRequest(RequestBody):
    input_data: list[str | Annotated[list[ChatTurn], Field(min_length=1)]] = Field(..., min_length=1)
    params: ScoreParams = Field(default_factory=ScoreParams)


class TextPart(RequestBody):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(RequestBody):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(RequestBody):
    include_usage: bool = False


class ChatCompletionRequest(RequestBody):
    model: str | None = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None


def field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


def invalid_body(errors: list[Any]) -> ApiError:
    """A body that failed its model's validation, as one error naming the first problem: 400 ``InvalidJson`` for
    bytes that are not JSON, else 422 ``InvalidField`` naming the field. ``errors``: pydantic's, from FastAPI's
    ``RequestValidationError`` (locations under ``body``) or from ``Model.model_validate_json`` (no ``body``)."""
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "value_error"}
    name = field_name(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        reason = str(first.get("msg", "")).removeprefix("Invalid JSON: ")
        return ApiError(400, "InvalidJson", f"the body is not valid JSON: {reason}", param="body")
    message = f"field '{name}': {first.get('msg', 'invalid value')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return ApiError(422, "InvalidField", message, param=name)


def install_error_handlers(app: FastAPI) -> None:
    """Answer :class:`ApiError` and validation errors in the shared ``{"error": {...}}`` shape (422 naming the
    field, 400 for malformed JSON)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(invalid_body(list(exc.errors())))
