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
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from deployments.engines import chat_request_for


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


async def stream_chat(http: Any, url: str, body: dict[str, Any], model_name: str) -> AsyncIterator[bytes]:
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


__all__ = ["ChatReply", "ExternalEngineError", "chat_once", "score_via_chat", "stream_chat"]
