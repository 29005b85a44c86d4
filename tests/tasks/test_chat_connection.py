"""`finetune-phi chat-connection`: the Prompt flow connection made from the endpoint's state, headless, key unseen."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from tasks.backends.base import BackendError
from tasks.chat_connection import (
    CONNECTION_NAME,
    configure_promptflow,
    create_or_update_connection,
    endpoint_target,
)
from tasks.config import load_config
from tests.flow_chat.helpers import REPO_ROOT, free_port, settings_for, write_config


def _stored(name: str = CONNECTION_NAME) -> tuple[str, str]:
    from promptflow.client import PFClient

    connection = PFClient().connections.get(name, with_secrets=True)
    return connection.base_url, connection.api_key


def test_command_makes_the_connection_from_the_keys_file_without_printing_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FINETUNE_PHI_ENDPOINT_KEY", raising=False)
    port = free_port()
    config = write_config(tmp_path, port=port)

    assert main(["chat-connection", "--config", str(config)]) == 0

    printed = capsys.readouterr().out
    keys = json.loads((tmp_path / "state" / "endpoint" / "keys.json").read_text())
    assert _stored() == (f"http://127.0.0.1:{port}/v1", keys["primary"])
    assert keys["primary"] not in printed and keys["admin"] not in printed
    assert f"http://127.0.0.1:{port}/v1" in printed and "source " in printed


def test_environment_key_wins_and_a_new_port_updates_the_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FINETUNE_PHI_ENDPOINT_KEY", "key-from-a-secret-store")
    first, second = free_port(), free_port()
    create_or_update_connection(settings_for(tmp_path, port=first))
    assert _stored() == (f"http://127.0.0.1:{first}/v1", "key-from-a-secret-store")
    create_or_update_connection(settings_for(tmp_path, port=second))
    assert _stored() == (f"http://127.0.0.1:{second}/v1", "key-from-a-secret-store")


def test_prompt_flow_is_headless_quiet_and_self_contained(tmp_path: Path) -> None:
    paths = configure_promptflow(settings_for(tmp_path).state_dir)
    home = Path(os.environ["PF_HOME_DIRECTORY"])
    config = yaml.safe_load((home / "pf.yaml").read_text())
    assert config["telemetry"]["enabled"] is False
    assert config["trace"]["destination"] == "none"
    assert stat.S_IMODE((home / "pf.yaml").stat().st_mode) == 0o600
    # The plain-text keyring, so connections work without a desktop keyring.
    assert os.environ["PYTHON_KEYRING_BACKEND"] == "keyrings.alt.file.PlaintextKeyring"
    # No call home: Azure Monitor's control plane is off and the PyPI version check is marked as done.
    assert os.environ["APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED"] == "true"
    assert json.loads((home / "pf_version_check.json").read_text())["last_check_time"].startswith("9999")
    env_sh = (paths.promptflow / "env.sh").read_text()
    for name in (
        "PF_HOME_DIRECTORY",
        "PYTHON_KEYRING_BACKEND",
        "XDG_DATA_HOME",
        "PF_DISABLE_TRACING",
        "APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED",
    ):
        assert f"export {name}=" in env_sh


def test_print_env_prints_the_exports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chat-connection", "--config", str(write_config(tmp_path)), "--print-env"]) == 0
    out = capsys.readouterr().out
    assert f"export PF_HOME_DIRECTORY={os.environ['PF_HOME_DIRECTORY']}" in out


def test_azureml_endpoint_gives_its_openai_base_url_and_scoring_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real azureml backend over the fake MLClient of the backend tests (Azure cannot be reached from here)."""
    from tasks.backends.azureml import AzureMLBackend
    from tests.tasks.backends.fake_azure import FakeMLClient

    monkeypatch.delenv("FINETUNE_PHI_ENDPOINT_KEY", raising=False)
    settings = load_config(REPO_ROOT / "configs" / "azureml.yaml", {"state_dir": str(tmp_path / "state")}, environ={})
    fake = FakeMLClient()
    backend = AzureMLBackend(settings, ml_client=fake, sleep=lambda s: None, secret_store=None)
    with pytest.raises(BackendError, match="does not exist yet"):
        endpoint_target(settings, backend=backend)

    backend.ensure_endpoint()
    target = endpoint_target(settings, backend=backend)
    assert target.base_url == f"https://{settings.endpoint.name}.eastus2.inference.ml.azure.com/v1"
    assert (target.key, target.backend) == (fake.endpoint_key, "azureml")
    assert fake.endpoint_key not in repr(target)


def test_without_a_usable_keyring_the_command_says_how_to_fix_it(tmp_path: Path) -> None:
    """The failure users hit on a headless machine (StoreConnectionEncryptionKeyError), as one sentence."""
    env = {k: v for k, v in os.environ.items() if k not in ("PF_HOME_DIRECTORY", "XDG_DATA_HOME")}
    env["PYTHON_KEYRING_BACKEND"] = "keyring.backends.fail.Keyring"  # keyring's own "no backend" stand-in
    config = write_config(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "chat-connection", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=120,
    )
    key = json.loads((tmp_path / "state" / "endpoint" / "keys.json").read_text())["primary"]
    assert result.returncode == 2
    assert "StoreConnectionEncryptionKeyError" in result.stderr
    assert "PYTHON_KEYRING_BACKEND=keyrings.alt.file.PlaintextKeyring" in result.stderr
    assert "Traceback" not in result.stderr and key not in result.stderr + result.stdout
