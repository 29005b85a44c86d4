"""The endpoint's contract over an external engine's OpenAI API (``transformers serve``, ``vllm serve``).

A deployment served by an external engine speaks only OpenAI chat completions. The router keeps its own contract
on top: ``/score`` with the sample's body becomes one chat completion per input (sent together, so the engine
batches them), each reply's text and finish reason read back; a streaming chat completion is passed through
chunk by chunk with the deployment's name as ``model``, ending with OpenAI's ``data: [DONE]`` whether or not the
engine sends one. Generation settings map as for the builtin engine
(:func:`deployments.engines.chat_request_for`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from deployments.engines import END_OF_TURN, chat_request_for


class ExternalEngineError(RuntimeError):
    """The engine answered with an error (or not at all)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ChatReply:
    text: str
    finish_reason: str  # "stop" or "length", as the engine says
    completion_tokens: int | None


def _error_text(response: Any) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(body.get("detail") if isinstance(body, dict) and "detail" in body else body)[:300]


async def chat_once(http: Any, url: str, body: dict[str, Any]) -> ChatReply:
    """One non-streaming chat completion from the engine at ``url`` (its ``/v1/chat/completions``)."""
    response = await http.post(url, json={**body, "stream": False})
    if response.status_code != 200:
        raise ExternalEngineError(
            response.status_code, f"the engine answered {response.status_code}: {_error_text(response)}"
        )
    payload = response.json()
    choice = payload["choices"][0]
    usage = payload.get("usage") or {}
    return ChatReply(
        text=choice["message"].get("content") or "",
        finish_reason=choice.get("finish_reason") or "stop",
        completion_tokens=usage.get("completion_tokens"),
    )


async def score_via_chat(
    http: Any,
    url: str,
    model: str | None,
    conversations: list[list[dict[str, str]]],
    *,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float | None,
    top_p: float | None,
) -> list[ChatReply]:
    """The replies to ``/score``'s inputs, one chat completion each, all in flight at once."""
    bodies = [
        chat_request_for(
            messages,
            model=model,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
        )
        for messages in conversations
    ]
    return list(await asyncio.gather(*(chat_once(http, url, body) for body in bodies)))


def score_budget(requested: int | None, default_max_new_tokens: int, max_new_tokens_cap: int) -> int:
    """``max_new_tokens`` as the builtin server caps it (the engine itself refuses a prompt over its context)."""
    wanted = requested if requested is not None else default_max_new_tokens
    return max(1, min(wanted, max_new_tokens_cap))


async def score_response(
    http: Any,
    url: str,
    model: str | None,
    body: dict[str, Any],
    *,
    default_max_new_tokens: int,
    max_new_tokens_cap: int,
) -> tuple[list[Any], list[ChatReply]]:
    """``/score``'s answer for the sample's body (``input_data``, ``params``), from an external engine: one text
    per input (``return_full_text`` puts a string input before it, ``return_finish_reason`` answers
    ``{"text", "finish_reason"}``), as the builtin server answers; and the engine's replies (for metrics)."""
    params = body.get("params") or {}
    temperature = params.get("temperature")
    do_sample = bool(params.get("do_sample")) and (temperature is None or temperature > 0)
    items = body["input_data"]
    conversations = [[{"role": "user", "content": i}] if isinstance(i, str) else list(i) for i in items]
    replies = await score_via_chat(
        http,
        url,
        model,
        conversations,
        max_new_tokens=score_budget(params.get("max_new_tokens"), default_max_new_tokens, max_new_tokens_cap),
        do_sample=do_sample,
        temperature=temperature,
        top_p=params.get("top_p"),
    )
    answers: list[Any] = []
    for item, reply in zip(items, replies, strict=True):
        text = f"{item}\n{reply.text}" if params.get("return_full_text") and isinstance(item, str) else reply.text
        answers.append(
            {"text": text, "finish_reason": reply.finish_reason} if params.get("return_finish_reason") else text
        )
    return answers, replies


def engine_chat_body(
    body: dict[str, Any], *, model: str | None, default_max_new_tokens: int, max_new_tokens_cap: int
) -> dict[str, Any]:
    """An OpenAI chat completion body as the router received it, made what the builtin engine would honour: the
    budget capped, OpenAI's default temperature (1) spelled out, ``<|end|>`` added to the stops, ``model`` the name
    the engine serves (None: left out), usage asked for in a stream."""
    out = {k: v for k, v in body.items() if k not in ("model", "max_completion_tokens")}
    requested = body.get("max_completion_tokens") or body.get("max_tokens")
    out["max_tokens"] = score_budget(requested, default_max_new_tokens, max_new_tokens_cap)
    out["temperature"] = 1.0 if body.get("temperature") is None else body["temperature"]
    stops = body.get("stop")
    out["stop"] = [*([stops] if isinstance(stops, str) else [s for s in (stops or []) if s]), END_OF_TURN][-4:]
    if model is not None:
        out["model"] = model
    if body.get("stream"):
        out["stream_options"] = {"include_usage": True}
    return out


async def chat_completion(http: Any, url: str, body: dict[str, Any], model_name: str) -> dict[str, Any]:
    """A non-streaming chat completion from the engine, ``model`` renamed to the deployment's."""
    response = await http.post(url, json={**body, "stream": False})
    if response.status_code != 200:
        raise ExternalEngineError(
            response.status_code, f"the engine answered {response.status_code}: {_error_text(response)}"
        )
    payload = response.json()
    payload["model"] = model_name
    return payload


async def stream_chat(http: Any, url: str, body: dict[str, Any], model_name: str) -> AsyncGenerator[bytes, None]:
    """The engine's server-sent events for a streaming chat completion, ``model`` renamed to the deployment's."""
    async with http.stream("POST", url, json={**body, "stream": True}) as response:
        if response.status_code != 200:
            await response.aread()
            raise ExternalEngineError(
                response.status_code, f"the engine answered {response.status_code}: {_error_text(response)}"
            )
        done = False
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            done = data.strip() == "[DONE]"
            if not done:
                chunk = json.loads(data)
                chunk["model"] = model_name
                data = json.dumps(chunk)
            yield f"data: {data}\n\n".encode()
        if not done:  # transformers serve ends the stream without OpenAI's terminator; clients wait for it
            yield b"data: [DONE]\n\n"


__all__ = [
    "ChatReply",
    "ExternalEngineError",
    "chat_completion",
    "chat_once",
    "engine_chat_body",
    "score_budget",
    "score_response",
    "score_via_chat",
    "stream_chat",
]
