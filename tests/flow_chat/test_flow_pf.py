"""The chat flow through Prompt flow itself: `pf flow test` (plain and --interactive), `pf flow serve`, the errors a
person sees (wrong key, endpoint down, timeout; from `pf flow test` and from `pf flow serve`), and a batch run over
the test split that writes its metrics.

The endpoint is the project's endpoint server serving the tiny trained model (the session fixture
``trained_tiny_model``), with a recording proxy in front of it: the proxy is a real HTTP server that forwards every
request unchanged and keeps what it forwarded, so the tests assert on what the endpoint really received. Where that
fixture is not available, the endpoint serves a freshly built untrained tiny model (it answers, if not well).
Prompt flow starts slowly, so the module starts as few `pf` processes as it can (one `pf flow serve` for the module,
five `pf flow test`, one batch run; ~2-5 s each).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks.chat_connection import EndpointTarget, configure_promptflow, create_or_update_connection
from tasks.config import Settings
from tests.flow_chat.helpers import (
    FLOW_DIR,
    PF_BIN,
    REPO_ROOT,
    free_port,
    pf_env,
    pf_flow_serve,
    settings_for,
)
from tests.flow_chat.recording_server import RecordingServer

pytestmark = pytest.mark.slow


@dataclass
class ChatEndpoint:
    settings: Settings
    recorder: RecordingServer  # what the flow's connection points at
    key: str
    real: bool  # True: the recorder proxies to the endpoint server serving the tiny model

    def connect(self, key: str | None = None, base_url: str | None = None) -> None:
        target = EndpointTarget(base_url or self.recorder.base_url, key or self.key, "local")
        create_or_update_connection(self.settings, target=target)

    @contextlib.contextmanager
    def connected_to(self, *, key: str | None = None, base_url: str | None = None) -> Iterator[None]:
        """The connection points elsewhere (or holds another key) for the block; the module's again after it."""
        self.connect(key=key, base_url=base_url)
        try:
            yield
        finally:
            self.connect()


@contextlib.contextmanager
def _real_endpoint(settings: Settings, model_dir: Path) -> Iterator[str]:
    """The project's endpoint server on a free port with one deployment of ``model_dir`` at 100%. Yields its URL."""
    from deployments.client import EndpointAdminClient
    from deployments.keys import read_keys
    from deployments.service import start_server, stop_server
    from tasks.state import state_paths

    base = f"http://{settings.endpoint.host}:{settings.endpoint.port}"
    # the session's model lives in pytest's temporary folders, outside the state folder: allow it explicitly
    settings.endpoint.model_roots = [model_dir]
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


def _chat_node_output_of_last_test() -> dict[str, Any]:
    """The chat node's output as the last `pf flow test` recorded it (flow_chat/.promptflow/flow.detail.json)."""
    detail = json.loads((FLOW_DIR / ".promptflow" / "flow.detail.json").read_text(encoding="utf-8"))
    (node,) = (run for run in detail["node_runs"] if run["node"] == "chat")
    return node["output"]


def _assert_sentence_only(result: subprocess.CompletedProcess[str], *phrases: str) -> None:
    """`pf flow test` failed with the tool's sentence and without a stack trace."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-2000:]
    for phrase in phrases:
        assert phrase in output, output[-2000:]
    assert "Traceback" not in output, output[-4000:]


def _post_json(url: str, payload: dict[str, Any], timeout: float = 60) -> tuple[int, bytes]:
    """POST ``payload``; the status and the raw body, for error answers (4xx/5xx) too."""
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def flow_server(chat_endpoint: ChatEndpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One `pf flow serve` for the module, started while the connection holds the right key. Yields its /score URL.

    It reads the connection once, at start: tests that change the connection later do not reach it.
    """
    with pf_flow_serve(tmp_path_factory.mktemp("serve") / "serve.log") as port:
        yield f"http://127.0.0.1:{port}/score"


def test_pf_flow_test_answers(chat_endpoint: ChatEndpoint) -> None:
    before = len(chat_endpoint.recorder.bodies())
    result = _pf("flow", "test", "--flow", "flow_chat", "--inputs", "question=What is a Prefect flow?")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    outputs = _last_json_object(result.stdout)
    # One flow output (pf flow serve's page shows it as a message); the node's finish reason stays in its output.
    assert set(outputs) == {"answer"} and isinstance(outputs["answer"], str)
    node = _chat_node_output_of_last_test()
    assert node["answer"] == outputs["answer"] and node["finish_reason"] in ("stop", "length")
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


def test_pf_flow_serve_answers_a_post(chat_endpoint: ChatEndpoint, flow_server: str) -> None:
    history = [{"inputs": {"question": "Hi"}, "outputs": {"answer": "Hello!"}}]
    status, raw = _post_json(flow_server, {"question": "What is MLflow?", "chat_history": history})
    answer = json.loads(raw)
    assert status == 200 and isinstance(answer["answer"], str) and set(answer) == {"answer"}
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
    with chat_endpoint.connected_to(key=wrong):
        result = _pf("flow", "test", "--flow", "flow_chat", "--inputs", "question=Hello?")
    _assert_sentence_only(result, "refused the key (HTTP 401)", "finetune-phi chat-connection")
    assert wrong not in result.stdout + result.stderr


def test_endpoint_down_gives_the_clear_sentence(chat_endpoint: ChatEndpoint) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}/v1"  # a loopback port nothing listens on
    with chat_endpoint.connected_to(base_url=nowhere):
        result = _pf("flow", "test", "--flow", "flow_chat", "--inputs", "question=Hello?")
    _assert_sentence_only(result, f"The endpoint at {nowhere} cannot be reached", "finetune-phi endpoint start")


def _flow_copy_with_timeout(folder: Path, timeout_s: float) -> Path:
    """flow_chat/ with the chat node's ``timeout_s`` changed: `pf flow test` sets flow inputs, not node inputs."""
    flow = folder / "flow_chat"
    shutil.copytree(FLOW_DIR, flow, ignore=shutil.ignore_patterns(".promptflow", "__pycache__"))
    dag = yaml.safe_load((flow / "flow.dag.yaml").read_text(encoding="utf-8"))
    (node,) = (n for n in dag["nodes"] if n["name"] == "chat")
    node["inputs"]["timeout_s"] = timeout_s
    (flow / "flow.dag.yaml").write_text(yaml.safe_dump(dag, sort_keys=False), encoding="utf-8")
    return flow


def test_timeout_gives_the_clear_sentence(chat_endpoint: ChatEndpoint, tmp_path: Path) -> None:
    flow = _flow_copy_with_timeout(tmp_path, timeout_s=1)
    with (
        RecordingServer(key="slow-key", delay_s=4) as slow,
        chat_endpoint.connected_to(key="slow-key", base_url=slow.base_url),
    ):
        result = _pf("flow", "test", "--flow", str(flow), "--inputs", "question=Hello?")
        assert len(slow.bodies()) == 1  # the request arrived: the slowness, not the address, failed it
    _assert_sentence_only(result, f"The endpoint at {slow.base_url} did not answer within 1 s", "'timeout_s'")


def test_pf_flow_serve_answers_a_wrong_key_with_the_sentence(chat_endpoint: ChatEndpoint, flow_server: str) -> None:
    """The key is regenerated while `pf flow serve` runs with the old one: the body README promises, no traceback."""
    recorder = chat_endpoint.recorder
    recorder.key_rotated = True
    try:
        status, raw = _post_json(flow_server, {"question": "Hello?", "chat_history": []})
    finally:
        recorder.key_rotated = False
    if chat_endpoint.real:  # the endpoint itself refused the stale key
        assert recorder.responses[-1]["status"] == 401
    text = raw.decode("utf-8")
    assert status == 400, text
    message = json.loads(text)["error"]["message"]
    assert "refused the key (HTTP 401)" in message and "restart `pf flow serve`" in message
    assert "Traceback" not in text and chat_endpoint.key not in text


def test_batch_run_writes_its_metrics(chat_endpoint: ChatEndpoint, sample_split, tmp_path: Path) -> None:
    from tasks.batch_eval import evaluate_chat_flow

    test_file = Path(sample_split.test_path)  # the split training held out, as the main flow evaluates
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
    assert {k: metrics[k] for k in saved} == saved and saved["test_file"] == str(test_file)
    # Every row's history reached the endpoint: a row with n earlier exchanges is sent as 2n + 1 turns.
    prepared = [json.loads(line) for line in (tmp_path / "eval_input.jsonl").read_text().splitlines()]
    held_out = {json.loads(line)["prompt_id"] for line in test_file.read_text().splitlines() if line.strip()}
    trained_on = {json.loads(line)["prompt_id"] for line in Path(sample_split.train_path).read_text().splitlines()}
    assert {r["prompt_id"] for r in prepared} <= held_out - trained_on
    sent = chat_endpoint.recorder.bodies()[before:]
    assert sorted(len(b["messages"]) for b in sent) == sorted(2 * len(r["chat_history"]) + 1 for r in prepared)
