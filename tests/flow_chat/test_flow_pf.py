"""The chat flow through Prompt flow itself: `pf flow test` (plain and --interactive), `pf flow serve`, a wrong key,
and a batch run that writes its metrics.

The endpoint is the project's endpoint server serving the tiny trained model (the session fixture
``trained_tiny_model``), with a recording proxy in front of it: the proxy is a real HTTP server that forwards every
request unchanged and keeps what it forwarded, so the tests assert on what the endpoint really received. Where that
fixture is not available, the endpoint serves a freshly built untrained tiny model (it answers, if not well).
Prompt flow starts slowly, so the module starts as few `pf` processes as it can (four, ~2 s each).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks.chat_connection import EndpointTarget, configure_promptflow, create_or_update_connection
from tasks.config import Settings
from tasks.jobs import stop_process_group
from tests.flow_chat.helpers import FLOW_DIR, PF_BIN, REPO_ROOT, free_port, pf_env, settings_for
from tests.flow_chat.recording_server import RecordingServer

pytestmark = pytest.mark.slow


@dataclass
class ChatEndpoint:
    settings: Settings
    recorder: RecordingServer  # what the flow's connection points at
    key: str
    real: bool  # True: the recorder proxies to the endpoint server serving the tiny model

    def connect(self, key: str | None = None) -> None:
        target = EndpointTarget(self.recorder.base_url, key or self.key, "local")
        create_or_update_connection(self.settings, target=target)


@contextlib.contextmanager
def _real_endpoint(settings: Settings, model_dir: Path) -> Iterator[str]:
    """The project's endpoint server on a free port with one deployment of ``model_dir`` at 100%. Yields its URL."""
    from deployments.client import EndpointAdminClient
    from deployments.keys import read_keys
    from deployments.service import start_server, stop_server
    from tasks.state import state_paths

    base = f"http://{settings.endpoint.host}:{settings.endpoint.port}"
    start_server(settings)
    try:
        admin = EndpointAdminClient(base, read_keys(state_paths(settings.state_dir).endpoint)["admin"])
        admin.create_deployment("blue", str(model_dir), "1")
        admin.wait_ready("blue", timeout_s=120)
        admin.set_traffic({"blue": 100})
        yield base
    finally:
        stop_server(settings)  # by the PID it recorded


def _model_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """The session's trained tiny model; else an untrained one (it still answers, until max_tokens); else None."""
    try:
        return Path(request.getfixturevalue("trained_tiny_model"))
    except pytest.FixtureLookupError:
        pass
    try:
        from training.tiny_model import build_tiny_model
    except ImportError:
        return None
    texts = [
        turn["content"]
        for line in (REPO_ROOT / "data" / "sample" / "chat_sample.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
        for turn in json.loads(line)["messages"]
    ]
    return build_tiny_model(tmp_path_factory.mktemp("untrained") / "model", texts)


@pytest.fixture(scope="module")
def chat_endpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatEndpoint]:
    from deployments.keys import read_keys
    from tasks.state import state_paths

    settings = settings_for(tmp_path_factory.mktemp("chat"), port=free_port())
    configure_promptflow(settings.state_dir)
    model_dir = _model_folder(request, tmp_path_factory)
    with contextlib.ExitStack() as stack:
        if model_dir is not None:
            upstream = stack.enter_context(_real_endpoint(settings, model_dir))
            recorder = stack.enter_context(RecordingServer(upstream=upstream))
            key = read_keys(state_paths(settings.state_dir).endpoint)["primary"]
        else:
            key = "stand-in-endpoint-key"
            recorder = stack.enter_context(RecordingServer(key=key))
        endpoint = ChatEndpoint(settings=settings, recorder=recorder, key=key, real=model_dir is not None)
        endpoint.connect()
        yield endpoint


def _pf(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PF_BIN, *args], input=stdin, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=pf_env()
    )


def _last_json_object(text: str) -> dict:
    return json.loads(text[text.rindex("\n{") + 1 :] if "\n{" in text else text[text.index("{") :])


def test_pf_flow_test_answers(chat_endpoint: ChatEndpoint) -> None:
    before = len(chat_endpoint.recorder.bodies())
    result = _pf("flow", "test", "--flow", "flow_chat", "--inputs", "question=What is a Prefect flow?")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    outputs = _last_json_object(result.stdout)
    assert isinstance(outputs["answer"], str) and outputs["finish_reason"] in ("stop", "length")
    (sent,) = chat_endpoint.recorder.bodies()[before:]
    assert sent["messages"] == [{"role": "user", "content": "What is a Prefect flow?"}]


def test_second_turn_carries_the_first_turn(chat_endpoint: ChatEndpoint) -> None:
    """Prompt flow's own interactive chat keeps the history; the endpoint receives it on the second turn."""
    recorder = chat_endpoint.recorder
    before = len(recorder.bodies())
    first, second = "What is a Prefect flow?", "How do I retry a task?"
    result = _pf("flow", "test", "--flow", "flow_chat", "--interactive", stdin=f"{first}\n{second}\n")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    turn1, turn2 = recorder.bodies()[before:]
    assert turn1["messages"] == [{"role": "user", "content": first}]
    if chat_endpoint.real:  # what the model answered on turn 1, as the endpoint sent it back
        first_answer = json.loads(recorder.responses[before]["body"])["choices"][0]["message"]["content"]
    else:
        first_answer = f"heard 1 turns; last: {first}"
    assert turn2["messages"] == [
        {"role": "user", "content": first},
        {"role": "assistant", "content": first_answer},
        {"role": "user", "content": second},
    ]
    assert result.stdout.count("Bot:") == 2


def test_pf_flow_serve_answers_a_post(chat_endpoint: ChatEndpoint, tmp_path: Path) -> None:
    port = free_port()
    command = [PF_BIN, "flow", "serve", "--source", str(FLOW_DIR), "--port", str(port), "--host", "127.0.0.1"]
    log = tmp_path / "serve.log"
    server = subprocess.Popen(
        [*command, "--skip-open-browser"],
        cwd=REPO_ROOT,
        env=pf_env(),
        stdout=log.open("wb"),  # a file, not a pipe: a full pipe would block the server
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stopped with everything it started
    )
    try:
        history = [{"inputs": {"question": "Hi"}, "outputs": {"answer": "Hello!"}}]
        body = json.dumps({"question": "What is MLflow?", "chat_history": history}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/score", data=body, headers={"Content-Type": "application/json"}
        )
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, log.read_text()[-2000:]
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    status, answer = response.status, json.loads(response.read())
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "pf flow serve did not answer within 90 s"
                time.sleep(0.3)
    finally:
        stop_process_group(server, grace_s=15)
    assert status == 200 and isinstance(answer["answer"], str) and "finish_reason" in answer
    assert chat_endpoint.recorder.bodies()[-1]["messages"][:2] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]


def test_score_route_sends_the_turns_to_the_endpoints_score(chat_endpoint: ChatEndpoint) -> None:
    """The tool on its own (no pf process) against the endpoint's /score, the sample's contract, with chat turns."""
    from promptflow.connections import OpenAIConnection

    from tests.flow_chat.helpers import load_tool_module

    tool = load_tool_module()
    connection = OpenAIConnection(api_key=chat_endpoint.key, base_url=chat_endpoint.recorder.base_url)
    history = [{"inputs": {"question": "Hi"}, "outputs": {"answer": "Hello!"}}]
    result = tool.chat(
        question="What is MLflow?", chat_history=history, connection=connection, route="score", max_tokens=16
    )
    (sent,) = chat_endpoint.recorder.bodies("/score")[-1:]
    assert sent["input_data"][0][-1] == {"role": "user", "content": "What is MLflow?"}
    assert len(sent["input_data"][0]) == 3
    assert isinstance(result["answer"], str) and result["finish_reason"] is None


def test_wrong_key_gives_the_clear_sentence(chat_endpoint: ChatEndpoint) -> None:
    wrong = "not-the-endpoint-key-42"
    chat_endpoint.connect(key=wrong)
    try:
        result = _pf("flow", "test", "--flow", "flow_chat", "--inputs", "question=Hello?")
    finally:
        chat_endpoint.connect()
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "refused the key (HTTP 401)" in output and "finetune-phi chat-connection" in output
    assert "Traceback" not in output  # the sentence, not a stack trace
    assert wrong not in output


def test_batch_run_writes_its_metrics(chat_endpoint: ChatEndpoint, tmp_path: Path) -> None:
    from tasks.batch_eval import evaluate_chat_flow

    test_file = REPO_ROOT / "data" / "sample" / "chat_sample.jsonl"
    before = len(chat_endpoint.recorder.bodies())
    metrics = evaluate_chat_flow(
        chat_endpoint.settings, test_file, out_dir=tmp_path, max_rows=6, refresh_connection=False
    )
    saved = json.loads((tmp_path / "metrics.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert saved["rows"] == 6 and saved["failed"] == 0 and len(rows) == 6
    assert len(chat_endpoint.recorder.bodies()) - before == 6
    assert 0.0 <= saved["token_f1"] <= 1.0 and 0.0 <= saved["ended_share"] <= 1.0
    assert saved["latency_p50_s"] is not None and saved["latency_p50_s"] <= saved["latency_max_s"]
    assert {k: metrics[k] for k in saved} == saved
    # Every row's history reached the endpoint: a row with n earlier exchanges is sent as 2n + 1 turns.
    prepared = [json.loads(line) for line in (tmp_path / "eval_input.jsonl").read_text().splitlines()]
    sent = chat_endpoint.recorder.bodies()[before:]
    assert sorted(len(b["messages"]) for b in sent) == sorted(2 * len(r["chat_history"]) + 1 for r in prepared)
