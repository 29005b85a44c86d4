"""The endpoint's API against one real server with two deployments of the tiny model (blue 70 %, green 30 %)."""

from __future__ import annotations

import json
import secrets
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from deployments.keys import ENV_SECONDARY
from deployments.service import stop_server
from tasks.backends.base import BackendError
from tests.deployments.conftest import LiveEndpoint

CAP = 64  # endpoint.max_new_tokens_cap on this server: keeps generations short, long enough for an answer
BODY_LIMIT = 64_000
SAMPLE_BODY = {  # the sample's own request (Prompt flow node)
    "input_data": ["What is a Prefect flow?"],
    "params": {"temperature": 0.7, "max_new_tokens": 128, "do_sample": True, "return_full_text": True},
}


@pytest.fixture(scope="module")
def live(launch, tiny_model_dir: Path) -> LiveEndpoint:
    endpoint = launch(max_new_tokens_cap=CAP, default_max_new_tokens=8, max_body_bytes=BODY_LIMIT)
    endpoint.deploy(tiny_model_dir, {"blue": 70, "green": 30})
    return endpoint


def post(live: LiveEndpoint, path: str, body: object, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        f"{live.url}{path}", json=body, headers=live.headers() if headers is None else headers, timeout=60
    )


def test_sample_body_gets_a_list_of_one_text(live: LiveEndpoint) -> None:
    started = time.perf_counter()
    response = post(live, "/score", SAMPLE_BODY)
    latency_ms = (time.perf_counter() - started) * 1000
    assert response.status_code == 200
    # the deployment process's own time, relayed by the router: within what the client waited
    name, _, duration = response.headers["server-timing"].partition(";dur=")
    assert name == "deployment" and 0 < float(duration) < latency_ms
    replies = response.json()
    assert isinstance(replies, list) and len(replies) == 1 and isinstance(replies[0], str)
    # return_full_text: the question comes back in front of the reply, as from the sample's pipeline
    assert replies[0].startswith("What is a Prefect flow?\n")
    assert response.headers["x-finish-reason"] in ("stop", "length")
    assert response.headers["azureml-model-deployment"] in ("blue", "green")


def test_chat_turns_and_strings_in_one_request(live: LiveEndpoint) -> None:
    turns = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "What is MLflow?"},
    ]
    body = {"input_data": [turns, "Hello"], "params": {"max_new_tokens": 5, "return_finish_reason": True}}
    response = post(live, "/score", body)
    assert response.status_code == 200
    replies = response.json()
    assert len(replies) == 2
    for reply in replies:
        assert set(reply) == {"text", "finish_reason"} and reply["finish_reason"] in ("stop", "length")
    assert len(response.headers["x-finish-reason"].split(",")) == 2
    # greedy by default: the same input gives the same reply
    again = post(live, "/score", {"input_data": [turns], "params": {"max_new_tokens": 5}}).json()
    assert again == [replies[0]["text"]]


@pytest.mark.slow
def test_trained_model_replies_end(live: LiveEndpoint, trained_tiny_model: Path, sample_split) -> None:
    """The tiny recipe's model, trained once per session, answers training questions and stops at <|end|>."""
    rows = [json.loads(line) for line in Path(sample_split.train_path).read_text(encoding="utf-8").splitlines()]
    questions = [next(m["content"] for m in row["messages"] if m["role"] == "user") for row in rows[:6]]
    live.admin.create_deployment("trained", str(trained_tiny_model / "model"), "trained")
    live.admin.wait_ready("trained", 120)
    pin = live.headers(**{"azureml-model-deployment": "trained"})
    body = {"input_data": questions, "params": {"max_new_tokens": CAP, "return_finish_reason": True}}
    response = post(live, "/score", body, pin)
    assert response.status_code == 200
    replies = response.json()
    ended = [r for r in replies if r["finish_reason"] == "stop"]
    assert len(ended) >= len(questions) // 2, replies
    assert all(r["text"].strip() and "<|end|>" not in r["text"] for r in ended)
    chat = post(live, "/v1/chat/completions", {"messages": [{"role": "user", "content": questions[0]}],
                                               "temperature": 0, "max_tokens": CAP}, pin)  # fmt: skip
    assert chat.json()["choices"][0]["finish_reason"] == replies[0]["finish_reason"]
    live.admin.delete_deployment("trained")


def test_openai_client_chat_and_streaming(live: LiveEndpoint) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{live.url}/v1", api_key=live.keys["primary"], max_retries=0)
    models = {m.id for m in client.models.list().data}
    assert {"blue", "green"} <= models
    messages = [{"role": "user", "content": "What is a Prefect flow?"}]
    completion = client.chat.completions.create(model="green", messages=messages, max_tokens=6, temperature=0)
    choice = completion.choices[0]
    assert choice.finish_reason in ("stop", "length") and completion.usage.completion_tokens <= 6
    assert "<|end|>" not in (choice.message.content or "")
    raw = client.chat.completions.with_raw_response.create(model="green", messages=messages, max_tokens=3)
    assert raw.headers["azureml-model-deployment"] == "green"  # `model` naming a deployment pins it

    stream = client.chat.completions.create(
        model="green",
        messages=messages,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]
    assert text == choice.message.content  # streaming and not streaming agree (greedy, same deployment)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == completion.usage.completion_tokens


def test_wrong_or_missing_key_is_401(live: LiveEndpoint) -> None:
    for headers in ({}, {"Authorization": "Bearer not-the-key"}, {"Authorization": live.keys["primary"]}):
        response = post(live, "/score", SAMPLE_BODY, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "Unauthorized"
    assert post(live, "/score", SAMPLE_BODY, headers=live.headers("secondary")).status_code == 200
    assert post(live, "/score", SAMPLE_BODY, headers=live.headers("admin")).status_code == 401  # admin is not scoring
    assert httpx.get(f"{live.url}/admin/state", headers=live.headers("primary")).status_code == 401
    chat = post(live, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, headers={})
    assert chat.status_code == 401 and chat.json()["error"]["type"] == "authentication_error"


def test_the_key_is_checked_before_the_body_and_the_schema_keeps_both_scoring_bodies(live: LiveEndpoint) -> None:
    # The router answers the scoring routes ahead of FastAPI's routing (deployments.server._ScoringDispatch): the
    # order of its checks and the OpenAPI schema (what the fuzzer and clients read) stay those of the routes.
    headers = {"content-type": "application/json"}
    no_key = httpx.post(f"{live.url}/score", content=b"{nope", headers=headers)
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "Unauthorized"
    wrong_type = post(live, "/score", ["not", "an", "object"])
    assert wrong_type.status_code == 422 and wrong_type.json()["error"]["code"] == "InvalidField"
    paths = httpx.get(f"{live.url}/openapi.json").json()["paths"]
    for path, model in (("/score", "ScoreRequest"), ("/v1/chat/completions", "ChatCompletionRequest")):
        schema = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert schema["$ref"].endswith(f"/{model}")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"input_data": "not a list"}, "input_data"),
        ({"input_data": []}, "input_data"),
        ({"input_data": ["hi"], "params": {"temperature": "hot"}}, "params.temperature"),
        ({"input_data": ["hi"], "params": {"max_new_tokens": 0}}, "params.max_new_tokens"),
        ({"input_data": [[{"role": "robot", "content": "x"}]]}, "input_data.0"),
        ({"params": {}}, "input_data"),
    ],
)
def test_bad_fields_are_422_naming_the_field(live: LiveEndpoint, body: dict, field: str) -> None:
    response = post(live, "/score", body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"].startswith(field) and field in error["message"]


def test_malformed_json_is_400(live: LiveEndpoint) -> None:
    headers = {**live.headers(), "content-type": "application/json"}
    response = httpx.post(f"{live.url}/score", content=b'{"input_data": [', headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "InvalidJson"
    chat = httpx.post(f"{live.url}/v1/chat/completions", content=b"{nope", headers=headers)
    assert chat.status_code == 400 and chat.json()["error"]["type"] == "invalid_request_error"


def test_body_over_the_limit_is_413(live: LiveEndpoint) -> None:
    response = post(live, "/score", {"input_data": ["x" * (BODY_LIMIT + 10)]})
    assert response.status_code == 413
    assert str(BODY_LIMIT) in response.json()["error"]["message"]


def test_input_over_the_context_is_400_with_the_limit(live: LiveEndpoint) -> None:
    import transformers

    context = transformers.AutoConfig.from_pretrained(live.admin.get_state()["deployments"]["blue"]["model_path"])
    limit = context.max_position_embeddings
    words = " ".join(f"w{i}" for i in range(limit * 2))  # well over the context in tokens, under the body limit
    assert len(words) < BODY_LIMIT
    response = post(live, "/score", {"input_data": [words]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "InputTooLong" and str(limit) in error["message"]


def test_max_new_tokens_is_capped(live: LiveEndpoint) -> None:
    body = {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 10_000, "temperature": 0}
    response = post(live, "/v1/chat/completions", body)
    assert response.status_code == 200
    assert 0 < response.json()["usage"]["completion_tokens"] <= CAP


def test_header_pins_a_deployment_and_unknown_is_404(live: LiveEndpoint) -> None:
    body = {"input_data": ["hi"], "params": {"max_new_tokens": 1}}
    served = {post(live, "/score", body, live.headers(**{"azureml-model-deployment": "green"})).headers[
        "azureml-model-deployment"] for _ in range(20)}  # fmt: skip
    assert served == {"green"}
    missing = post(live, "/score", body, live.headers(**{"azureml-model-deployment": "purple"}))
    assert missing.status_code == 404 and "purple" in missing.json()["error"]["message"]


def test_traffic_split_over_1000_requests(live: LiveEndpoint) -> None:
    body = {"input_data": ["hi"], "params": {"max_new_tokens": 1}}
    with httpx.Client(headers=live.headers(), timeout=60) as client:

        def one(_: int) -> str:
            response = client.post(f"{live.url}/score", json=body)
            assert response.status_code == 200
            return response.headers["azureml-model-deployment"]

        with ThreadPoolExecutor(max_workers=3) as pool:  # within max_concurrent_requests: nothing is refused
            counts = Counter(pool.map(one, range(1000)))
    # green ~ Binomial(1000, 0.3): mean 300, sd 14.5; +/- 5 sd fails by chance less than once in a million runs
    assert counts["blue"] + counts["green"] == 1000
    assert 227 <= counts["green"] <= 373


def test_metrics_per_deployment(live: LiveEndpoint) -> None:
    post(live, "/score", {"input_data": ["hi"], "params": {"max_new_tokens": 2}}, live.headers(**{
        "azureml-model-deployment": "blue"}))  # fmt: skip
    text = httpx.get(f"{live.url}/metrics").text
    assert 'finetune_phi_requests_total{deployment="blue",route="/score",code="200"}' in text
    assert 'finetune_phi_request_errors_total{deployment="none",route="/score",code="401"}' in text
    tokens = [
        line for line in text.splitlines() if line.startswith('finetune_phi_generated_tokens_total{deployment="blue"}')
    ]
    assert tokens and float(tokens[0].split()[-1]) > 0
    assert "finetune_phi_request_latency_seconds_bucket" in text


def test_admin_metrics_route_counts_statuses_finish_reasons_and_seconds_per_token(live: LiveEndpoint) -> None:
    from tasks.guardrails.metrics import counters_from_json

    before = counters_from_json(live.admin.get_metrics()["deployments"].get("green", {}))
    pin = {"azureml-model-deployment": "green"}
    post(live, "/score", {"input_data": ["hi", "ho"], "params": {"max_new_tokens": 3}}, live.headers(**pin))
    post(live, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                        "stream": True}, live.headers(**pin))  # fmt: skip
    too_long = " ".join(f"w{i}" for i in range(5000))
    assert post(live, "/score", {"input_data": [too_long]}, live.headers(**pin)).status_code == 400  # the client's
    payload = live.admin.get_metrics()
    window = counters_from_json(payload["deployments"]["green"]).minus(before)
    assert window.statuses == {200: 2, 400: 1}
    assert window.errors == 0  # a client's 4xx is no server error
    assert sum(window.finish_reasons.values()) == 3  # two /score replies, one streamed chat reply
    assert sum(window.latency_counts) == 2 and window.stats().p95_s_per_token is not None
    assert payload["deployments"]["green"]["rescued"] == 0  # no rollout runs: nothing is rescued
    with pytest.raises(BackendError, match="401"):
        type(live.admin)(live.url, live.keys["primary"]).get_metrics()  # a scoring key is no admin key


def test_admin_api_states_and_refusals(live: LiveEndpoint, tmp_path: Path) -> None:
    admin = live.admin
    admin.create_deployment("broken", str(tmp_path / "no-model-here"), "9")
    with pytest.raises(BackendError, match="failed to load"):
        admin.wait_ready("broken", timeout_s=30)
    state = admin.get_state()["deployments"]["broken"]
    assert state["state"] == "failed" and "no-model-here" in state["error"]
    pinned = post(live, "/score", SAMPLE_BODY, live.headers(**{"azureml-model-deployment": "broken"}))
    assert pinned.status_code == 503
    with pytest.raises(BackendError, match="sum to 100"):
        admin.set_traffic({"blue": 50, "green": 40})
    with pytest.raises(BackendError, match="traffic"):
        admin.delete_deployment("blue")  # it still receives traffic
    admin.delete_deployment("broken")
    assert "broken" not in admin.get_state()["deployments"]
    saved = json.loads((live.endpoint_dir / "state.json").read_text())
    assert saved["traffic"] == {"blue": 70, "green": 30} and set(saved["deployments"]) == {"blue", "green"}


def test_a_deployment_names_its_device_and_an_impossible_one_is_refused(
    live: LiveEndpoint, tiny_model_dir: Path
) -> None:
    import torch

    admin = live.admin
    state = admin.get_state()["deployments"]["blue"]
    assert (state["device"], state["dtype"], state["engine"]) == ("auto", "auto", "builtin")
    refusals = {
        "cpu/float16": ({"device": "cpu", "dtype": "float16"}, "dtype 'float16' is not supported on the CPU"),
        "vllm": ({"engine": "vllm", "device": "cpu"}, "engine 'vllm'"),
    }
    if not torch.cuda.is_available():
        refusals["cuda"] = ({"device": "cuda"}, "needs a CUDA GPU but torch sees none")
    for name, (fields, message) in refusals.items():  # refused before any process starts, saying why
        created = admin.create_deployment(name.replace("/", "-"), str(tiny_model_dir), "1", **fields)
        assert created["state"] == "failed" and message in created["error"], created
        assert all(i["pid"] is None for i in created["instances"])
        admin.delete_deployment(name.replace("/", "-"))
    assert set(admin.get_state()["deployments"]) == {"blue", "green"}
    admin.create_deployment("cpu32", str(tiny_model_dir), "1", device="cpu", dtype="float32")
    admin.wait_ready("cpu32", 60)
    assert admin.get_state()["deployments"]["cpu32"]["device"] == "cpu"
    pinned = post(live, "/score", SAMPLE_BODY, live.headers(**{"azureml-model-deployment": "cpu32"}))
    assert pinned.status_code == 200 and isinstance(pinned.json()[0], str)
    admin.delete_deployment("cpu32")


def test_fuzzed_requests_never_get_a_5xx(live: LiveEndpoint) -> None:
    """schemathesis cases from the server's own OpenAPI schema, 25 per operation: never a 5xx, errors in our shape.

    The scoring key goes with every operation, so admin routes answer 401 and the fuzzer cannot change this
    server's deployments.
    """
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /score", "POST /v1/chat/completions", "GET /v1/models"}
    seen: Counter[int] = Counter()
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None
        )
        def check(case) -> None:
            response = case.call(base_url=live.url, headers=live.headers(), timeout=60)
            seen[response.status_code] += 1
            assert response.status_code < 500, (
                f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"
            )
            if response.status_code >= 400:
                assert "error" in response.json()

        check()
    assert seen[200] > 0 and sum(seen.values()) >= 25


def test_secondary_key_from_the_environment(launch, monkeypatch: pytest.MonkeyPatch) -> None:
    """A secondary key in the server's environment replaces the file's, and stays out of the log and the file."""
    env_key = f"from-a-secret-store-{secrets.token_urlsafe(16)}"
    monkeypatch.setenv(ENV_SECONDARY, env_key)
    endpoint = launch()  # its own server, started with the variable; /v1/models checks the key without a model
    models = f"{endpoint.url}/v1/models"
    assert httpx.get(models, headers={"Authorization": f"Bearer {env_key}"}, timeout=30).status_code == 200
    assert httpx.get(models, headers={"api-key": env_key}, timeout=30).status_code == 200
    assert httpx.get(models, headers=endpoint.headers("primary"), timeout=30).status_code == 200  # from the file
    stored = json.loads((endpoint.endpoint_dir / "keys.json").read_text(encoding="utf-8"))
    for wrong in ("not-the-key", stored["secondary"]):  # the file's secondary no longer works
        response = httpx.get(models, headers={"Authorization": f"Bearer {wrong}"}, timeout=30)
        assert response.status_code == 401 and response.json()["error"]["code"] == "Unauthorized"
    assert env_key not in json.dumps(stored)
    stop_server(endpoint.settings, grace_s=10)  # the whole log, shutdown included
    assert "GET /v1/models" in endpoint.log_text and env_key not in endpoint.log_text
