"""The Prompt flow connection ``finetune_phi_endpoint``, made from the endpoint's state: no key copied by hand.

    finetune-phi chat-connection --config configs/local.yaml
    source .finetune-phi/promptflow/env.sh
    pf flow test --flow flow_chat --inputs question="What is a Prefect flow?"

The connection is an OpenAI-type connection (``base_url`` = the endpoint's ``/v1``, ``api_key`` = its primary key):
Prompt flow 1.18 passes both to the tool, and the same pair works with any OpenAI client. (Custom connections fail
against some endpoints, microsoft/promptflow#1672; the OpenAI route is the one suggested in #3785.)

Prompt flow keeps its home, its connections database and its config in the state folder (``PF_HOME_DIRECTORY``),
with telemetry off and traces nowhere (``telemetry.enabled: false``, ``trace.destination: none`` in its
``pf.yaml``), no call home (Azure Monitor's control plane off, the PyPI version check marked done), and the
connections' encryption key in a plain-text keyring file (``keyrings.alt``) so it works on a machine with no
desktop keyring. ``env.sh`` beside it sets the same variables for a shell that runs ``pf``.
"""

from __future__ import annotations

import argparse
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tasks.backends.base import BackendError
from tasks.config import Settings, load_config
from tasks.state import StatePaths, atomic_write_json, atomic_write_text, configure_environment, read_json

CONNECTION_NAME = "finetune_phi_endpoint"  # flow_chat/flow.dag.yaml names it
KEY_ENV = "FINETUNE_PHI_ENDPOINT_KEY"
ENV_FILE = "env.sh"
# Prompt flow builds its Application Insights log exporter even with telemetry off, and the exporter's "control
# plane" asks settings.sdk.monitor.azure.com for configuration at start-up; this variable switches that off.
NO_CONTROL_PLANE = {"APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED": "true"}
# Variables a shell needs so `pf` finds the connection and stays quiet (most set by tasks.state.configure_environment).
PF_ENV_VARS = (
    "PF_HOME_DIRECTORY",
    "PF_DISABLE_TRACING",
    "PYTHON_KEYRING_BACKEND",
    "XDG_DATA_HOME",
    *NO_CONTROL_PLANE,
)
# Prompt flow's own settings (`pf config set ...`), kept in <PF_HOME_DIRECTORY>/pf.yaml.
PF_CONFIG = {"telemetry": {"enabled": False}, "trace": {"destination": "none"}}
# Prompt flow asks PyPI for a newer release on `pf flow test` and batch runs, whatever the telemetry setting, at most
# weekly after the time in this file (promptflow/_sdk/_version_hint_utils.py). The version is pinned on purpose and
# Prompt flow is retiring: a check dated far ahead means nothing leaves the machine.
PF_VERSION_CHECK = ("pf_version_check.json", "last_check_time", "9999-01-01 00:00:00.000000")


@dataclass(frozen=True)
class EndpointTarget:
    """Where the chat flow sends its requests. The key is never shown (``repr=False``)."""

    base_url: str  # the OpenAI-compatible base, ending in /v1
    key: str = field(repr=False)
    backend: str


def configure_promptflow(state_dir: str | Path) -> StatePaths:
    """Point Prompt flow at the state folder, turn its telemetry and trace export off, write ``env.sh``.

    Call before the first ``import promptflow`` in a process: Prompt flow reads ``PF_HOME_DIRECTORY`` once, at import.
    """
    paths = configure_environment(state_dir)
    for name, value in NO_CONTROL_PLANE.items():
        os.environ.setdefault(name, value)
    home = Path(os.environ["PF_HOME_DIRECTORY"])
    home.mkdir(parents=True, exist_ok=True)
    config_file = home / "pf.yaml"
    current = (yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file.is_file() else None) or {}
    merged = {**current, **{k: {**(current.get(k) or {}), **v} for k, v in PF_CONFIG.items()}}
    if merged != current:
        # Prompt flow writes this file 0600 (it may hold an installation id); keep it so.
        atomic_write_text(config_file, yaml.safe_dump(merged, sort_keys=True), permissions=0o600)
    check_file, check_key, far_ahead = PF_VERSION_CHECK
    checks = read_json(home / check_file, default=None)
    checks = checks if isinstance(checks, dict) else {}
    if checks.get(check_key) != far_ahead:
        atomic_write_json(home / check_file, {**checks, check_key: far_ahead}, permissions=0o600)
    lines = [f"export {name}={shlex.quote(os.environ[name])}" for name in PF_ENV_VARS if os.environ.get(name)]
    atomic_write_text(
        paths.promptflow / ENV_FILE,
        "# Written by `finetune-phi chat-connection`: lets `pf` find the project's Prompt flow connections.\n"
        + "\n".join(lines)
        + "\n",
    )
    return paths


def _check_promptflow_home() -> None:
    """Prompt flow fixed its home at import; a different PF_HOME_DIRECTORY now would write the connection elsewhere."""
    from promptflow._sdk._constants import HOME_PROMPT_FLOW_DIR

    wanted = Path(os.environ["PF_HOME_DIRECTORY"]).resolve()
    if Path(HOME_PROMPT_FLOW_DIR).resolve() != wanted:
        raise BackendError(
            f"Prompt flow was imported with its home at {HOME_PROMPT_FLOW_DIR}, not {wanted}; "
            "call tasks.chat_connection.configure_promptflow before importing promptflow"
        )


def endpoint_target(settings: Settings, backend: Any = None) -> EndpointTarget:
    """The endpoint's OpenAI base URL and primary key, from the config and the backend's key store.

    local: ``http://host:port/v1`` from the config, the key from ``FINETUNE_PHI_ENDPOINT_KEY`` or
    ``<state_dir>/endpoint/keys.json``. azureml: the endpoint's ``openai_base_url`` and ``scoring_key()``.
    """
    if settings.backend == "local" and backend is None:
        base_url = f"http://{settings.endpoint.host}:{settings.endpoint.port}/v1"
        key = os.environ.get(KEY_ENV) or _local_key(settings)
        return EndpointTarget(base_url=base_url, key=key, backend="local")
    if backend is None:
        from tasks.backends import get_backend

        backend = get_backend(settings)
    info = backend.get_endpoint()
    if info is None:
        raise BackendError(
            f"endpoint {settings.endpoint.name} does not exist yet on the {settings.backend} backend; "
            "deploy a model first with `finetune-phi run --config <your config>`"
        )
    if not info.openai_base_url:
        raise BackendError(f"endpoint {info.name} has no scoring URI yet; wait for its deployment and run this again")
    key = os.environ.get(KEY_ENV) or backend.scoring_key()
    return EndpointTarget(base_url=info.openai_base_url.rstrip("/"), key=key, backend=backend.name)


def _local_key(settings: Settings) -> str:
    try:
        from deployments.keys import read_keys
    except ImportError as exc:
        raise BackendError(f"the local endpoint's key store cannot be loaded ({exc}); set {KEY_ENV} instead") from exc
    paths = configure_environment(settings.state_dir)
    key = read_keys(paths.endpoint).get("primary")
    if not key:
        raise BackendError(f"no primary key in {paths.endpoint}; run `finetune-phi endpoint start` or set {KEY_ENV}")
    return key


def create_or_update_connection(
    settings: Settings, target: EndpointTarget | None = None, name: str = CONNECTION_NAME
) -> dict[str, str]:
    """Create or update the OpenAI-type connection ``name``. Returns its name, base URL and backend (no key)."""
    configure_promptflow(settings.state_dir)
    target = target or endpoint_target(settings)
    from promptflow.client import PFClient
    from promptflow.entities import OpenAIConnection

    _check_promptflow_home()
    connection = OpenAIConnection(name=name, api_key=target.key, base_url=target.base_url)
    try:
        PFClient().connections.create_or_update(connection)
    except Exception as exc:  # the message is Prompt flow's, with the key scrubbed should it ever appear
        detail = str(exc).replace(target.key, "***")[:500]
        hint = (
            "; on a machine without a desktop keyring set PYTHON_KEYRING_BACKEND=keyrings.alt.file.PlaintextKeyring"
            if "keyring" in f"{type(exc).__name__} {detail}".lower() or "encryption" in detail.lower()
            else ""
        )
        raise BackendError(
            f"Prompt flow could not store connection {name!r} in {os.environ['PF_HOME_DIRECTORY']} "
            f"({type(exc).__name__}: {detail}){hint}"
        ) from None
    return {"name": name, "base_url": target.base_url, "backend": target.backend}


# ---------------------------------------------------------------------------------------------------- CLI
def _handle(args: argparse.Namespace) -> int:
    settings = load_config(args.config, overrides=args.overrides)
    paths = configure_promptflow(settings.state_dir)
    env_file = paths.promptflow / ENV_FILE
    if args.print_env:
        print(env_file.read_text(encoding="utf-8"), end="")
        return 0
    made = create_or_update_connection(settings, name=args.name)
    relative = os.path.relpath(env_file)
    shown_env = str(env_file) if relative.startswith("..") else relative
    print(f"Prompt flow connection {made['name']!r} -> {made['base_url']} ({made['backend']} endpoint; key not shown)")
    print(f"Use it from a shell:  source {shown_env}")
    print('Then:                 pf flow test --flow flow_chat --inputs question="What is a Prefect flow?"')
    print("A running `pf flow serve` reads connections only at start: restart it.")
    return 0


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "chat-connection",
        help="create or update the Prompt flow connection for flow_chat/ from the endpoint's state",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--config", default="configs/local.yaml", help="run configuration (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--name", default=CONNECTION_NAME, help="connection name (default: %(default)s)")
    parser.add_argument(
        "--print-env", action="store_true", help='print the shell exports for `pf` (eval "$(...)") and exit'
    )
    parser.set_defaults(handler=_handle)


__all__ = [
    "CONNECTION_NAME",
    "EndpointTarget",
    "add_commands",
    "configure_promptflow",
    "create_or_update_connection",
    "endpoint_target",
]
