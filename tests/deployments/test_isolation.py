"""Each deployment in processes of its own behind the router: a deployment that cannot fit, crashes, hangs or is
deleted does not touch the others; names follow Azure's rule; a stopped endpoint leaves no process behind.

Real routers and real deployment processes on loopback, the tiny model; the module's endpoints run each deployment's
decoding loop in an engine process of its own (``endpoint.engine_process``), so the limits, scores, crashes and
freezes below are those of the two-process deployment too.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from deployments.memory import oom_score_adj, process_tree, tree_rss
from deployments.model_server import ENV_TEST_ENGINE
from deployments.names import name_problem
from deployments.service import start_server, stop_server
from flows.cli import main as cli
from tasks.backends.base import BackendError, DeploymentFailedError, ModelVersion
from tests.client_threads import ClientThreads
from tests.deployments.conftest import REPO_ROOT, LiveEndpoint, wait_for, write_config

SHORT = {"input_data": ["hi"], "params": {"max_new_tokens": 2}}
LONG = {"input_data": ["Tell me a long story."] * 4, "params": {"max_new_tokens": 480}}
PIN_BLUE = {"azureml-model-deployment": "blue"}
# Probes every second; three missed liveness probes in a row restart a process.
PROBES = {
    "liveness_probe": {"initial_delay": 0, "period": 1, "timeout": 2, "failure_threshold": 3},
    "readiness_probe": {"initial_delay": 0, "period": 1, "timeout": 2, "failure_threshold": 30},
    "engine_process": True,
}


@pytest.fixture(scope="module")
def live(launch, tiny_model_dir: Path) -> LiveEndpoint:
    endpoint = launch(
        max_concurrent_requests=8, max_pending_requests=32, max_new_tokens_cap=480, memory_limit_mb=4096, **PROBES
    )
    endpoint.deploy(tiny_model_dir, {"blue": 100})
    return endpoint


def instances(live: LiveEndpoint, name: str) -> list[dict]:
    return live.admin.get_state()["deployments"][name]["instances"]


class Load(ClientThreads):
    """``clients`` threads sending short requests pinned to blue in a loop, recording every status."""

    def __init__(self, live: LiveEndpoint, clients: int = 16) -> None:
        super().__init__(clients, join_timeout_s=60)
        self.live, self.statuses = live, Counter()

    def run(self, index: int) -> None:
        with httpx.Client(headers=self.live.headers(**PIN_BLUE), timeout=60) as client:
            while not self.stopping.is_set():
                try:
                    self.statuses[client.post(f"{self.live.url}/score", json=SHORT).status_code] += 1
                except httpx.HTTPError as exc:
                    self.statuses[type(exc).__name__] += 1


def _maps_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_the_router_loads_no_model_and_imports_no_torch(live: LiveEndpoint) -> None:
    state = live.admin.get_state()
    router = state["router"]
    assert router["pid"] == live.pid and router["torch_imported"] is False
    blue = state["deployments"]["blue"]["instances"][0]
    assert blue["pid"] != live.pid and psutil.Process(blue["pid"]).ppid() == live.pid
    assert os.getpgid(blue["pid"]) == blue["pid"] != os.getpgid(live.pid)  # its own process group
    assert Path(blue["log_file"]).is_file() and Path(blue["log_file"]).is_relative_to(live.endpoint_dir)
    # the model and torch live in the deployment's process: the router stays small
    assert router["own_rss_mb"] < blue["rss_mb"]
    # and within it in the engine process: the HTTP side renders prompts without torch (deployments.chat_tokenizer)
    (engine,) = psutil.Process(blue["pid"]).children()
    assert not _maps_torch(blue["pid"]) and _maps_torch(engine.pid)
    # the deployment's memory limit holds on its process as an address-space limit
    limits = Path(f"/proc/{blue['pid']}/limits").read_text()
    assert next(line for line in limits.splitlines() if line.startswith("Max address space")).split()[3] == str(
        4096 * 1024 * 1024
    )


def test_a_deployment_over_its_memory_limit_fails_to_create_while_blue_serves_16_clients(
    live: LiveEndpoint, tiny_model_dir: Path
) -> None:
    blue_pid = instances(live, "blue")[0]["pid"]
    with Load(live) as load:
        wait_for(lambda: sum(load.statuses.values()) >= 16, "blue to answer the first requests")
        live.admin.create_deployment("green", str(tiny_model_dir), "2", memory_limit_mb=1)
        with pytest.raises(DeploymentFailedError) as refused:
            live.admin.wait_ready("green", timeout_s=30)
        time.sleep(1.0)  # blue keeps serving after the refusal too
    message = str(refused.value)
    assert "memory limit is 1 MB" in message and "needs about" in message and "endpoint.memory_limit_mb" in message
    green = live.admin.get_state()["deployments"]["green"]
    assert green["state"] == "failed" and green["instances"] == []  # refused before any process started
    assert set(load.statuses) == {200} and load.statuses[200] >= 32, load.statuses
    blue = instances(live, "blue")[0]
    assert blue["pid"] == blue_pid and blue["restarts"] == 0 and blue["state"] == "ready"
    live.admin.delete_deployment("green")


def test_deleting_a_deployment_gives_its_memory_back(live: LiveEndpoint, tiny_model_dir: Path) -> None:
    before = tree_rss(live.pid)
    live.admin.create_deployment("green", str(tiny_model_dir), "2")
    live.admin.wait_ready("green", timeout_s=120)
    green = instances(live, "green")[0]
    blue = instances(live, "blue")[0]
    # green takes no traffic yet: under memory pressure the kernel's OOM killer picks it before blue
    assert green["oom_score_adj"] > blue["oom_score_adj"]
    # the score covers the model's own process (the engine process, a child) and follows a traffic change
    assert _tree_oom_scores(green["pid"]) == {green["oom_score_adj"]}
    live.admin.set_traffic({"blue": 90, "green": 10})
    assert _tree_oom_scores(green["pid"]) == {_tree_oom_scores(blue["pid"]).pop()}
    live.admin.set_traffic({"blue": 100})
    with_green = tree_rss(live.pid)
    assert with_green - before > 50 * 1024 * 1024, (before, with_green)  # a process with torch and a model
    live.admin.delete_deployment("green")  # answered once the process is gone
    after = tree_rss(live.pid)
    assert not _running(green["pid"])
    assert after - before < 0.2 * (with_green - before), (before, with_green, after)


def _tree_oom_scores(pid: int) -> set[int | None]:
    tree = process_tree(pid)
    assert len(tree) >= 2, "the deployment process has no engine process"
    return {oom_score_adj(process.pid) for process in tree}


def test_a_killed_deployment_answers_502_in_flight_and_restarts(live: LiveEndpoint, tmp_path: Path, capsys) -> None:
    old_pid = instances(live, "blue")[0]["pid"]
    url = f"{live.url}/score"
    # Greedy (chat completions sample at temperature 1 by default): the untrained model's greedy reply never ends, so
    # the stream is still running when the kill comes.
    stream_body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 480,
                   "temperature": 0, "stream": True}  # fmt: skip
    events: list[str] = []
    started = threading.Event()  # the stream's 200 and first event are out: the kill hits it mid-stream

    def stream() -> None:
        with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=stream_body, headers=live.headers(),
                          timeout=60) as response:  # fmt: skip
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    started.set()

    with ThreadPoolExecutor(max_workers=4) as pool:
        posts = [pool.submit(httpx.post, url, json=LONG, headers=live.headers(), timeout=60) for _ in range(3)]
        streamed = pool.submit(stream)
        wait_for(lambda: live.in_flight("blue") == 4 and started.is_set(), "4 requests in flight on blue")
        os.kill(old_pid, signal.SIGKILL)
        answers = [f.result() for f in posts]
        streamed.result()
    for answer in answers:
        assert answer.status_code == 502, answer.text
        assert answer.json()["error"]["code"] == "ModelContainerCrashed"
    error = json.loads(events[-2].removeprefix("data: "))["error"]  # then [DONE]
    assert error["code"] == "ModelContainerCrashed" and events[-1] == "data: [DONE]"

    live.admin.wait_ready("blue", timeout_s=90)  # 1 s of backoff, then the model loads again
    assert httpx.post(url, json=SHORT, headers=live.headers(), timeout=30).status_code == 200
    blue = instances(live, "blue")[0]
    assert blue["pid"] != old_pid and blue["restarts"] == 1
    assert cli(["endpoint", "status", "--config", str(write_config(live.settings, tmp_path))]) == 0
    assert "blue: ready" in (out := capsys.readouterr().out) and "1 restart(s)" in out, out
    assert 'finetune_phi_deployment_restarts_total{deployment="blue"} 1' in httpx.get(f"{live.url}/metrics").text
    metrics = httpx.get(f"{live.url}/admin/metrics", headers=live.headers("admin"), timeout=10).json()
    blue_metrics = metrics["deployments"]["blue"]
    assert blue_metrics["restarts"] == 1 and blue_metrics["requests_by_status"]["502"] >= 3
    assert blue_metrics["latency_per_token_seconds"]["count"] > 0 and blue_metrics["finish_reasons"]


def test_names_that_azure_refuses_are_refused_with_the_same_message_on_both_backends(live: LiveEndpoint) -> None:
    from azure.ai.ml.entities._endpoint._endpoint_helpers import validate_endpoint_or_deployment_name

    from tasks.backends.azureml import AzureMLBackend
    from tasks.config import Settings

    candidates = ["blue", "model-v3-1", "Ab1", "ab", "a" * 32, "a" * 33, "1abc", "-abc", "abc-", "a_b_c", "a b c",
                  "blåbær", "ünïcode", "abc.d", "", "x", "A-B", "ab--cd", "Zz9"]  # fmt: skip
    for name in candidates:
        try:
            validate_endpoint_or_deployment_name(name, is_deployment=True)
            azure_accepts = True
        except Exception:
            azure_accepts = False
        assert (name_problem(name, "deployment") is None) == azure_accepts, name
        assert (name_problem(name, "endpoint") is None) == azure_accepts, name

    azure = AzureMLBackend(
        Settings.model_validate(
            {
                "backend": "azureml",
                "data": {"path": "x.jsonl"},
                "azureml": {"subscription_id": "s", "resource_group": "g", "workspace": "w"},
            }
        )
    )  # fmt: skip; no client is built: the name is checked before any call
    version = ModelVersion("finetune-phi", "1", "job", "models:/finetune-phi/1")
    for bad in ("a b", "x", "blåbær", "a_b"):
        rule = name_problem(bad, "deployment")
        assert rule is not None
        with pytest.raises(BackendError) as local:
            live.admin.create_deployment(bad, str(live.settings.state_dir), "1")
        assert "422" in str(local.value) and rule in str(local.value)
        with pytest.raises(DeploymentFailedError) as remote:
            azure.create_deployment(bad, version)
        assert str(remote.value) == rule
    with pytest.raises(ValueError, match="not a valid name for an endpoint"):
        Settings.model_validate({"data": {"path": "x.jsonl"}, "endpoint": {"name": "my endpoint"}})


def test_a_model_path_outside_the_state_folder_and_the_registry_is_refused(live: LiveEndpoint) -> None:
    outside = REPO_ROOT / "data"
    live.admin.create_deployment("stray", str(outside), "1")
    with pytest.raises(DeploymentFailedError, match="neither a registered model's folder nor under the state"):
        live.admin.wait_ready("stray", timeout_s=10)
    live.admin.delete_deployment("stray")


def test_a_hung_deployment_times_out_without_delaying_the_other(
    launch, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engines = "tests.deployments.hanging_engine"
    monkeypatch.setenv(ENV_TEST_ENGINE, f"stuck={engines}:HangingRunner")
    endpoint = launch(request_timeout_ms=1500, **PROBES)
    endpoint.deploy(tiny_model_dir, {"blue": 100, "stuck": 0, "frozen": 0})
    url = f"{endpoint.url}/score"

    def stuck() -> tuple[int, float, str]:
        started = time.monotonic()
        pin = endpoint.headers(**{"azureml-model-deployment": "stuck"})
        response = httpx.post(url, json=SHORT, headers=pin, timeout=30)
        return response.status_code, time.monotonic() - started, response.json()["error"]["code"]

    with ThreadPoolExecutor(max_workers=2) as pool:
        hung = [pool.submit(stuck) for _ in range(2)]
        wait_for(lambda: endpoint.in_flight("stuck") == 2, "2 requests on the hung deployment")
        blue_times = []
        for _ in range(5):
            started = time.monotonic()
            response = httpx.post(url, json=SHORT, headers=endpoint.headers(**PIN_BLUE), timeout=30)
            blue_times.append(time.monotonic() - started)
            assert response.status_code == 200
        results = [f.result() for f in hung]
    assert max(blue_times) < 1.0, blue_times  # well inside the hung requests' 1.5 s
    for status, elapsed, code in results:
        assert status == 408 and code == "RequestTimeout"
        assert 1.4 <= elapsed < 4.0, elapsed  # at request_timeout_ms, not later

    # a process that stops answering altogether (stopped by SIGSTOP: not even its event loop runs): the router
    # answers 408 for it, then its liveness probe fails failure_threshold times and it is restarted
    frozen_pid = instances(endpoint, "frozen")[0]["pid"]
    os.kill(frozen_pid, signal.SIGSTOP)
    pin = endpoint.headers(**{"azureml-model-deployment": "frozen"})
    started = time.monotonic()
    response = httpx.post(url, json=SHORT, headers=pin, timeout=30)
    assert response.status_code == 408 and time.monotonic() - started < 4.0
    wait_for(lambda: instances(endpoint, "frozen")[0]["restarts"] == 1, "the frozen process's restart", 60)
    endpoint.admin.wait_ready("frozen", 90)
    assert instances(endpoint, "frozen")[0]["pid"] != frozen_pid and not _running(frozen_pid)
    assert httpx.post(url, json=SHORT, headers=endpoint.headers(**PIN_BLUE), timeout=30).status_code == 200


def test_a_restarted_router_finds_its_processes_and_a_stop_leaves_none(launch, tiny_model_dir: Path) -> None:
    endpoint = launch(max_concurrent_requests=2, max_new_tokens_cap=480, **PROBES)
    endpoint.admin.create_deployment("blue", str(tiny_model_dir), "1", instance_count=2)
    endpoint.admin.wait_ready("blue", 120)
    wait_for(lambda: all(i["state"] == "ready" for i in instances(endpoint, "blue")), "both instances ready", 120)
    endpoint.admin.set_traffic({"blue": 100})

    # the least loaded ready instance takes each request: 4 long requests land 2 and 2
    with ThreadPoolExecutor(max_workers=4) as pool:
        running = [pool.submit(httpx.post, f"{endpoint.url}/score", json=LONG, headers=endpoint.headers(),
                               timeout=60) for _ in range(4)]  # fmt: skip
        wait_for(lambda: endpoint.in_flight("blue") == 4, "4 requests in flight")
        assert sorted(i["in_flight"] for i in instances(endpoint, "blue")) == [2, 2]
        assert [f.result().status_code for f in running] == [200] * 4

    pids = [i["pid"] for i in instances(endpoint, "blue")]
    os.kill(endpoint.pid, signal.SIGKILL)  # the router dies; its deployment processes must not be lost
    os.waitpid(endpoint.pid, 0)
    assert all(psutil.pid_exists(pid) for pid in pids)
    router = start_server(endpoint.settings)
    again = LiveEndpoint(endpoint.settings, router)
    again.admin.wait_ready("blue", 60)
    assert sorted(i["pid"] for i in instances(again, "blue")) == sorted(pids)  # found, not started again
    assert httpx.post(f"{again.url}/score", json=SHORT, headers=again.headers(), timeout=30).status_code == 200

    stop_server(endpoint.settings, grace_s=20)
    for group in (router, *pids):
        assert not _group_running(group), f"process group {group} still has a running process"


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _group_running(pgid: int) -> bool:
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return False


def test_the_size_check_reads_the_safetensors_headers(tiny_model_dir: Path) -> None:
    from safetensors import safe_open

    from deployments.memory import MemoryCheckError, check_fits, model_size

    parameters = 0
    for path in tiny_model_dir.rglob("*.safetensors"):
        with safe_open(str(path), framework="np") as weights:
            names = weights.keys()  # a safetensors handle, not a dict
            parameters += sum(math.prod(weights.get_slice(name).get_shape()) for name in names)
    size = model_size(tiny_model_dir)
    assert size.files >= 1 and size.parameters == parameters
    assert size.bytes_as("float32") == 2 * size.bytes_as("bfloat16")  # every tensor of the tiny model is a float
    assert check_fits(tiny_model_dir, "float32", 4096, 1, "blue") == size
    with pytest.raises(MemoryCheckError, match="memory limit is 100 MB"):
        check_fits(tiny_model_dir, "float32", 100, 1, "blue")
    with pytest.raises(MemoryCheckError, match="available on this machine"):
        check_fits(tiny_model_dir, "float32", None, 10**6, "blue")  # a million instances: more than any machine
