"""The chat flow's one tool: send the conversation so far and the new question to the fine-tuned model.

It talks to the endpoint's OpenAI-compatible ``POST {base_url}/chat/completions`` through an OpenAI-type Prompt
flow connection (``api_key`` + ``base_url``), the route Prompt flow supports for OpenAI-compatible servers
(microsoft/promptflow#3785; custom connections fail against some endpoints, #1672). Where a deployment serves only
the sample's ``POST /score`` (Azure ML's no-code MLflow deployments), the same chat turns go there instead.

Failures reach the person as one sentence (:class:`ChatEndpointError`): endpoint down, wrong key, timeout,
no deployment, overload. ``finish_reason`` and the latency come back beside the answer so the batch evaluation
can tell a reply that ended ("stop") from one cut at ``max_tokens`` ("length").
"""

# No `from __future__ import annotations`: Prompt flow reads the tool's parameter types at run time, and a string
# annotation turns the connection into a plain string.
import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import openai
from promptflow.connections import OpenAIConnection
from promptflow.core import tool

# Header that pins a deployment on Azure ML and on the local endpoint (blue/green checks).
PIN_HEADER = "azureml-model-deployment"


class ChatEndpointError(Exception):
    """The endpoint did not answer; the message says why and what to do. Prompt flow shows it to the user."""


def _caused_by_endpoint_error(exc: BaseException | None) -> bool:
    # By name: Prompt flow loads this file as module `__pf_main__`, so the class object differs between loads.
    while exc is not None:
        if type(exc).__name__ == ChatEndpointError.__name__:
            return True
        exc = exc.__cause__
    return False


class _SentenceOnly(logging.Filter):
    """Drop the traceback Prompt flow logs for a failed node when the failure is an endpoint error we explained.

    The record's message already holds the sentence; forty lines of executor frames would only bury it.
    Other failures (a bug in this file) keep their traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and _caused_by_endpoint_error(record.exc_info[1]):
            record.exc_info = None
            record.exc_text = None
        return True


def _install_log_filter() -> bool:
    """Hide the executor's traceback for explained failures. False (and a warning) where Prompt flow moved it."""
    # Prompt flow's executor logs node failures on its own "execution" logger, a `logging.Logger` built outside the
    # logging registry (promptflow/_utils/logger_utils.py), so it is reachable only through that private module.
    try:
        from promptflow._utils.logger_utils import logger as execution_logger
    except ImportError as exc:
        # Said out loud rather than skipped: the person then knows why a traceback shows. The error stays readable:
        # the sentence is still the exception's message, which Prompt flow prints last (and serve returns alone).
        warnings.warn(
            f"flow_chat/chat.py cannot reach Prompt flow's execution logger ({exc}); endpoint errors will be logged "
            "with a traceback above their one-sentence message. Prompt flow is pinned in flow_chat/requirements.txt.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    if not any(type(f).__name__ == _SentenceOnly.__name__ for f in execution_logger.filters):
        execution_logger.addFilter(_SentenceOnly())
    return True


_install_log_filter()


def history_to_messages(chat_history: Sequence[Any] | None) -> list[dict[str, str]]:
    """Turn Prompt flow's chat history into chat turns, oldest first.

    Prompt flow passes ``[{"inputs": {"question": q}, "outputs": {"answer": a}}, ...]``; rows that are already
    ``{"role", "content"}`` turns (as some callers write them) are kept as they are.
    """
    messages: list[dict[str, str]] = []
    for item in chat_history or []:
        if not isinstance(item, Mapping):
            continue
        if "role" in item and "content" in item:
            messages.append({"role": str(item["role"]), "content": str(item["content"])})
            continue
        question = (item.get("inputs") or {}).get("question")
        answer = (item.get("outputs") or {}).get("answer")
        if question is not None:
            messages.append({"role": "user", "content": str(question)})
        if answer is not None:
            messages.append({"role": "assistant", "content": str(answer)})
    return messages


def build_messages(question: str, chat_history: Sequence[Any] | None, system_prompt: str = "") -> list[dict[str, str]]:
    """The chat turns sent to the model: optional system prompt, the history, then the new question."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*messages, *history_to_messages(chat_history), {"role": "user", "content": question}]


def _explain(exc: Exception, base_url: str, timeout_s: float) -> str:
    """One sentence naming the cause and the fix; never the key."""
    if isinstance(exc, openai.APITimeoutError):
        return (
            f"The endpoint at {base_url} did not answer within {timeout_s:g} s; the model may still be loading or "
            "overloaded: try again, or raise the node input 'timeout_s' in flow_chat/flow.dag.yaml."
        )
    if isinstance(exc, openai.APIConnectionError):
        return (
            f"The endpoint at {base_url} cannot be reached; start it with `finetune-phi endpoint start` (local) or "
            "check the endpoint in Azure ML, then run `finetune-phi chat-connection` if its address changed."
        )
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return (
            f"The endpoint at {base_url} refused the key (HTTP {exc.status_code}); the Prompt flow connection holds "
            "an old or wrong key: run `finetune-phi chat-connection --config <your config>` to refresh it "
            "(and restart `pf flow serve`, which reads connections only at start)."
        )
    if isinstance(exc, openai.APIStatusError):
        hints = {
            404: "no deployment takes traffic (or the base URL is wrong): check `finetune-phi endpoint status`",
            408: "the request ran past the endpoint's request timeout: ask for fewer tokens or try again",
            424: "the model server behind the endpoint failed: see `finetune-phi endpoint logs`",
            429: "too many requests are in flight: wait a moment and try again",
        }
        hint = hints.get(exc.status_code, "see `finetune-phi endpoint logs` for the cause")
        return f"The endpoint at {base_url} answered HTTP {exc.status_code}: {hint}."
    return f"The call to the endpoint at {base_url} failed ({type(exc).__name__}): {exc}"


def _chat_completions(
    client: openai.OpenAI, model: str, messages: list[dict[str, str]], max_tokens: int, temperature: float
) -> tuple[str, str | None]:
    response = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=temperature
    )
    if not response.choices:
        raise ChatEndpointError(f"The endpoint at {client.base_url} answered with no choices; see its logs.")
    choice = response.choices[0]
    return choice.message.content or "", choice.finish_reason


def _score(
    client: openai.OpenAI, messages: list[dict[str, str]], max_tokens: int, temperature: float
) -> tuple[str, str | None]:
    """The sample's ``/score`` contract, with the chat turns as the one input. It does not say why a reply ended."""
    body = {
        "input_data": [messages],
        "params": {
            "max_new_tokens": max_tokens,
            "temperature": temperature,
            "do_sample": temperature > 0,
            "return_full_text": False,
        },
    }
    result = client.post("/score", cast_to=object, body=body)
    first = result[0] if isinstance(result, list) and result else result
    if isinstance(first, dict):  # MLflow's text-generation output: {"generated_text": ...}
        first = first.get("generated_text", first.get("answer"))
    if not isinstance(first, str):
        raise ChatEndpointError(f"The endpoint's /score answered {str(result)[:200]!r}, not a list of texts.")
    return first, None


def _root(base_url: str) -> str:
    """The endpoint's root: ``https://host/v1`` -> ``https://host`` (where ``/score`` lives)."""
    return base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url


@tool
def chat(
    question: str,
    chat_history: list,
    connection: OpenAIConnection,
    model: str = "default",
    max_tokens: int = 128,
    temperature: float = 0.7,
    system_prompt: str = "",
    deployment: str = "",
    timeout_s: float = 120.0,
    route: str = "auto",
) -> dict:
    """Ask the model; return ``{"answer", "finish_reason", "latency_s"}`` or raise :class:`ChatEndpointError`.

    ``route``: ``chat`` (``{base_url}/chat/completions``), ``score`` (``/score`` beside ``/v1``: Azure ML's no-code
    MLflow deployments serve only that), or ``auto``: chat, and ``/score`` when the chat route is not there (404).
    """
    base_url = (connection.base_url or "").rstrip("/")
    if not base_url:
        raise ChatEndpointError(
            "The Prompt flow connection has no base_url; create it with `finetune-phi chat-connection`."
        )
    if route not in ("auto", "chat", "score"):
        raise ChatEndpointError(f"The node input 'route' is {route!r}; use auto, chat or score.")
    options: dict[str, Any] = {
        "api_key": connection.api_key,
        "timeout": timeout_s,
        "max_retries": 0,  # a person is waiting: one clear error beats minutes of silent retries
        "default_headers": {PIN_HEADER: deployment} if deployment else None,
    }
    messages = build_messages(question, chat_history, system_prompt)
    started = time.perf_counter()
    where = base_url
    try:
        if route != "score":
            try:
                with openai.OpenAI(base_url=base_url, **options) as client:
                    answer, finish_reason = _chat_completions(client, model, messages, max_tokens, temperature)
            except openai.NotFoundError:
                if route == "chat":
                    raise
                route = "score"
        if route == "score":
            where = _root(base_url) + "/score"
            started = time.perf_counter()
            with openai.OpenAI(base_url=_root(base_url), **options) as client:
                answer, finish_reason = _score(client, messages, max_tokens, temperature)
    except openai.OpenAIError as exc:
        # `from None`: Prompt flow prints the chain; the sentence is the whole story.
        raise ChatEndpointError(_explain(exc, where, timeout_s)) from None
    return {"answer": answer, "finish_reason": finish_reason, "latency_s": round(time.perf_counter() - started, 4)}
