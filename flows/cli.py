"""The ``finetune-phi`` command line. Each area adds its own sub-commands through ``add_commands(subparsers)``.

    finetune-phi run [--config configs/local.yaml] [--set section.field=value ...]
    finetune-phi prepare-data --config configs/local.yaml
    finetune-phi endpoint start|stop|status|logs|keys
    finetune-phi smoke --config configs/local.yaml
    finetune-phi chat-connection --config configs/local.yaml
    finetune-phi azureml export-yaml|teardown --config configs/azureml.yaml

Errors that are meant for a person (bad config, missing file, failed job) print one clear message and exit 2;
heavy libraries (Prefect, the flow, the backends) are imported inside the commands so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from tasks.caching import REFRESHABLE, check_refresh

if TYPE_CHECKING:
    from tasks.config import Settings

# Modules that contribute sub-commands after ``run``, in the order they appear in --help.
COMMAND_MODULES = (
    "tasks.data",
    "deployments.service",
    "flows.smoke",
    "tasks.chat_connection",
    "tasks.backends.azureml_cli",
)


def prefect_ui_line() -> str:
    """Where to look at the run: the Prefect server's UI, or how to get one after a run on the ephemeral engine."""
    api = os.environ.get("PREFECT_API_URL")
    if api:
        ui = api.removesuffix("/api")
        return f"Prefect UI: {ui} (flow runs, logs, artifacts: run summary, loss curve, smoke table)"
    return (
        "Prefect: ran on a temporary local engine (no server). To browse runs and artifacts: `prefect server start`, "
        "then `export PREFECT_API_URL=http://127.0.0.1:4200/api` and run again"
    )


@contextlib.contextmanager
def prefect_home_of(settings: Settings) -> Iterator[None]:
    """Point Prefect at the state folder (``<state_dir>/prefect``) for this command.

    Prefect reads its settings once, on import, which the CLI does before it knows the config; so the home is
    applied here with ``temporary_settings`` (results, the ephemeral engine's database and logs all follow it).
    A ``PREFECT_HOME`` the user set in the environment wins, as ``configure_environment`` leaves it alone.
    """
    from prefect.settings import PREFECT_HOME, temporary_settings

    from tasks.state import configure_environment

    configure_environment(settings.state_dir)
    with temporary_settings(updates={PREFECT_HOME: os.environ["PREFECT_HOME"]}):
        yield


def run_command(args: argparse.Namespace) -> int:
    """``finetune-phi run``: the whole flow, then where to see it and how to chat with the endpoint."""
    from flows.finetune_deploy import finetune_and_deploy, load_settings
    from tasks.backends import get_backend
    from tasks.config import normalise_overrides
    from tasks.summary import how_to_chat

    refresh = [r.strip() for r in args.refresh.split(",") if r.strip()] if args.refresh else None
    check_refresh(refresh)  # before load_settings, which creates the state folder
    settings = load_settings(args.config, args.set)  # fails fast on a bad config, before Prefect starts
    started = time.perf_counter()
    with prefect_home_of(settings):
        result = finetune_and_deploy(args.config, normalise_overrides(args.set) or None, refresh)
    took = time.perf_counter() - started
    print(f"\nfinetune-phi run: done in {took:.1f} s; model version {result['version']}")
    print(f"gate: {'PROMOTE' if result['gate']['promote'] else 'REJECT'}: {result['gate']['reason']}")
    print(prefect_ui_line())
    endpoint = get_backend(settings).get_endpoint()
    if endpoint is not None:
        print(f"Endpoint: {endpoint.scoring_uri} (traffic {endpoint.traffic})")
        print(f"OpenAI-compatible base URL: {endpoint.openai_base_url}")
        print(how_to_chat(endpoint.openai_base_url, endpoint.scoring_uri, config=args.config))
        if settings.backend == "local":
            print("The local endpoint server keeps running; stop it with `finetune-phi endpoint stop`.")
    return 0


def add_run_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run the whole pipeline: data, training, evaluation, gate, blue/green rollout, smoke test",
        description="The product: one flow run takes a chat dataset to a live, tested model.",
    )
    parser.add_argument("--config", default="configs/local.yaml", help="run configuration (default: %(default)s)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field, e.g. --set training.overrides.max_steps=20 (repeatable)",
    )
    parser.add_argument(
        "--refresh",
        default="",
        metavar="STEPS",
        help=f"comma-separated steps to redo even if cached: {','.join(REFRESHABLE)}",
    )
    parser.set_defaults(handler=run_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune-phi", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_run_command(subparsers)
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # that area is not built yet
                continue
            raise
        module.add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tasks.backends.base import BackendError
    from tasks.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (ConfigError, BackendError, FileNotFoundError, ValueError) as exc:
        print(f"finetune-phi {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
