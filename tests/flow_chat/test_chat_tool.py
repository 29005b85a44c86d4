"""The chat tool on its own, against a real HTTP server that records what it received (no Prompt flow run)."""

from __future__ import annotations

import sys

import pytest

from tests.flow_chat.helpers import free_port, load_tool_module
from tests.flow_chat.recording_server import RecordingServer

KEY = "tool-test-key-123"


@pytest.fixture(scope="module")
def tool():
    return load_tool_module()


def _connection(base_url: str, key: str = KEY):
    from promptflow.connections import OpenAIConnection

    return OpenAIConnection(api_key=key, base_url=base_url)


def test_history_in_prompt_flow_shape_becomes_alternating_turns(tool) -> None:
    history = [
        {"inputs": {"question": "What is Prefect?"}, "outputs": {"answer": "An orchestrator."}},
        {"inputs": {"question": "Is it free?"}, "outputs": {"answer": "Yes, open source."}},
    ]
    messages = tool.build_messages("How do I install it?", history)
    assert messages == [
        {"role": "user", "content": "What is Prefect?"},
        {"role": "assistant", "content": "An orchestrator."},
        {"role": "user", "content": "Is it free?"},
        {"role": "assistant", "content": "Yes, open source."},
        {"role": "user", "content": "How do I install it?"},
    ]
    # Turns already in chat shape pass through; a system prompt goes first.
    assert tool.build_messages("q", [{"role": "user", "content": "a"}], system_prompt="Be brief.")[:2] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a"},
    ]


def test_sends_history_and_question_and_returns_finish_reason(tool) -> None:
    history = [{"inputs": {"question": "first?"}, "outputs": {"answer": "one"}}]
    with RecordingServer(key=KEY) as server:
        result = tool.chat(
            question="second?", chat_history=history, connection=_connection(server.base_url), max_tokens=32
        )
        (body,) = server.bodies()
        (request,) = server.requests
    assert body["messages"] == [
        {"role": "user", "content": "first?"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "second?"},
    ]
    assert body["max_tokens"] == 32
    assert request["headers"]["authorization"] == f"Bearer {KEY}"
    assert result["answer"] == "heard 3 turns; last: second?"
    assert result["finish_reason"] == "stop"
    assert 0 <= result["latency_s"] < 5


def test_deployment_input_pins_with_the_azureml_header(tool) -> None:
    with RecordingServer(key=KEY) as server:
        tool.chat(question="hi", chat_history=[], connection=_connection(server.base_url), deployment="blue")
        (request,) = server.requests
    assert request["headers"]["azureml-model-deployment"] == "blue"


def test_wrong_key_is_one_sentence_without_the_key(tool) -> None:
    with RecordingServer(key="the-right-key") as server, pytest.raises(tool.ChatEndpointError) as caught:
        tool.chat(question="hi", chat_history=[], connection=_connection(server.base_url, key=KEY))
    message = str(caught.value)
    assert "refused the key (HTTP 401)" in message
    assert "finetune-phi chat-connection" in message
    assert KEY not in message and "the-right-key" not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_endpoint_down_is_one_sentence(tool) -> None:
    base_url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with pytest.raises(tool.ChatEndpointError, match="cannot be reached; start it with `finetune-phi endpoint start`"):
        tool.chat(question="hi", chat_history=[], connection=_connection(base_url))


def test_timeout_is_one_sentence(tool) -> None:
    with RecordingServer(key=KEY, delay_s=1.5) as server, pytest.raises(tool.ChatEndpointError) as caught:
        tool.chat(question="hi", chat_history=[], connection=_connection(server.base_url), timeout_s=0.3)
    assert "did not answer within 0.3 s" in str(caught.value)


def test_missing_base_url_names_the_command(tool) -> None:
    from promptflow.connections import OpenAIConnection

    with pytest.raises(tool.ChatEndpointError, match="finetune-phi chat-connection"):
        tool.chat(question="hi", chat_history=[], connection=OpenAIConnection(api_key=KEY))


def test_auto_route_falls_back_to_score_where_only_score_exists(tool) -> None:
    """Azure ML's no-code MLflow deployments serve only /score: the same turns go there, in the sample's body."""
    history = [{"inputs": {"question": "first?"}, "outputs": {"answer": "one"}}]
    with RecordingServer(key=KEY, chat_route=False) as server:
        result = tool.chat(question="second?", chat_history=history, connection=_connection(server.base_url))
        paths = [r["path"] for r in server.requests]
        (score_body,) = server.bodies("/score")
    assert paths == ["/v1/chat/completions", "/score"]
    assert score_body["input_data"] == [
        [
            {"role": "user", "content": "first?"},
            {"role": "assistant", "content": "one"},
            {"role": "user", "content": "second?"},
        ]
    ]
    assert score_body["params"]["max_new_tokens"] == 128 and score_body["params"]["return_full_text"] is False
    assert result["answer"] == "scored 3 turns" and result["finish_reason"] is None


def test_chat_route_only_reports_the_404(tool) -> None:
    with RecordingServer(key=KEY, chat_route=False) as server, pytest.raises(tool.ChatEndpointError) as caught:
        tool.chat(question="hi", chat_history=[], connection=_connection(server.base_url), route="chat")
    assert "answered HTTP 404" in str(caught.value) and len(server.requests) == 1


def test_log_filter_sits_on_prompt_flows_execution_logger(tool) -> None:
    """The pinned Prompt flow still keeps its execution logger where chat.py looks for it."""
    from promptflow._utils.logger_utils import logger as execution_logger

    assert tool._install_log_filter() is True
    assert [type(f).__name__ for f in execution_logger.filters].count("_SentenceOnly") == 1  # installed once


def test_a_moved_execution_logger_warns_and_errors_stay_sentences(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "promptflow._utils.logger_utils", None)  # the import now fails
    with pytest.warns(RuntimeWarning, match="cannot reach Prompt flow's execution logger"):
        moved = load_tool_module()
    base_url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with pytest.raises(moved.ChatEndpointError, match="cannot be reached") as caught:
        moved.chat(question="hi", chat_history=[], connection=_connection(base_url))
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
