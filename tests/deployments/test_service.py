"""The server as a service: start/status/keys/logs commands, a clean stop with requests in flight, state kept
across a restart, keys never in the log."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from deployments.service import server_status, start_server, stop_server
from flows.cli import main as cli
from tests.deployments.conftest import LiveEndpoint, make_settings, wait_for, write_config

LONG = {"input_data": ["Tell me a long story."], "params": {"max_new_tokens": 480}}
SHORT = {"input_data": ["hi"], "params": {"max_new_tokens": 2}}


@pytest.mark.slow
def test_service_lifecycle(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = make_settings(tmp_path / "state", max_new_tokens_cap=480, stop_grace_s=20)
    config = write_config(settings, tmp_path)
    live = LiveEndpoint(settings, start_server(settings))
    try:
        assert start_server(settings) == live.pid  # already running: the same server
        live.deploy(tiny_model_dir, {"blue": 100})
        status = server_status(settings)
        assert status.running and status.healthy and status.ready and status.pid == live.pid

        # keys: 0600 on disk, regenerable while the server runs, printed only by `keys`
        key_file = live.endpoint_dir / "keys.json"
        assert key_file.stat().st_mode & 0o777 == 0o600
        old_secondary = live.keys["secondary"]
        assert cli(["endpoint", "status", "--config", str(config)]) == 0
        out = capsys.readouterr().out
        assert "blue: ready" in out and live.keys["primary"] not in out
        assert cli(["endpoint", "keys", "--config", str(config), "--regenerate", "secondary"]) == 0
        new_secondary = live.keys["secondary"]
        assert new_secondary != old_secondary and f"secondary: {new_secondary}" in capsys.readouterr().out
        url = f"{live.url}/score"
        old = httpx.post(url, json=SHORT, headers={"Authorization": f"Bearer {old_secondary}"}, timeout=30)
        assert old.status_code == 401
        assert httpx.post(url, json=SHORT, headers=live.headers("secondary"), timeout=30).status_code == 200
        for key in ("primary", "admin"):
            httpx.post(url, json=SHORT, headers=live.headers(key), timeout=30)
        httpx.get(f"{live.url}/admin/state", headers=live.headers("admin"), timeout=30)

        # clean stop: while requests are in flight the port stays open, a new request gets 503 and they finish
        with ThreadPoolExecutor(max_workers=3) as pool:
            in_flight = [pool.submit(httpx.post, url, json=LONG, headers=live.headers(), timeout=60) for _ in range(3)]
            wait_for(lambda: live.in_flight("blue") == 3, "3 requests in flight")
            stopper = threading.Thread(target=stop_server, args=(settings,))
            stopper.start()
            wait_for(lambda: httpx.get(f"{live.url}/health", timeout=10).json()["status"] == "stopping", "the stop")
            assert not any(f.done() for f in in_flight), "the requests ended before the stop: make LONG longer"
            late = httpx.post(url, json=SHORT, headers=live.headers(), timeout=10)
            stopper.join(timeout=60)
            finished = [f.result() for f in in_flight]
        assert late.status_code == 503, late.text
        assert late.json()["error"]["code"] == "ServiceUnavailable"
        assert [r.status_code for r in finished] == [200, 200, 200]
        assert all(r.headers["x-finish-reason"] in ("stop", "length") for r in finished)
        assert not stopper.is_alive()
        assert not psutil.pid_exists(live.pid) or psutil.Process(live.pid).status() == psutil.STATUS_ZOMBIE
        assert not server_status(settings).running
        assert cli(["endpoint", "status", "--config", str(config)]) == 1

        # the log has the requests but no key, in any form
        assert cli(["endpoint", "logs", "--config", str(config), "-n", "500"]) == 0
        logged = capsys.readouterr().out
        assert "POST /score" in logged and "Shutting down" in logged
        keys = live.keys
        for secret in (*keys.values(), old_secondary):
            assert secret not in live.log_text

        # restart: deployments and traffic come back from the state folder
        live = LiveEndpoint(settings, start_server(settings))
        live.admin.wait_ready("blue", 60)
        state = live.admin.get_state()
        assert state["traffic"] == {"blue": 100} and state["deployments"]["blue"]["model_path"] == str(tiny_model_dir)
        again = httpx.post(url, json=SHORT, headers=live.headers(), timeout=30)
        assert again.status_code == 200 and again.headers["azureml-model-deployment"] == "blue"
        assert live.keys == keys  # the same keys after a restart
    finally:
        stop_server(settings, grace_s=10)
    assert not (live.endpoint_dir / "server.pid").exists()


def test_start_fails_clearly_when_the_port_is_taken(tmp_path: Path) -> None:
    import socket

    from tasks.backends.base import BackendError

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        settings = make_settings(tmp_path / "state", port=sock.getsockname()[1])
        with pytest.raises(BackendError, match="already in use"):
            start_server(settings)
