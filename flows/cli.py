"""The ``finetune-phi`` command line. Each area adds its own sub-commands through ``add_commands(subparsers)``.

    finetune-phi run [--config configs/local.yaml] [--set section.field=value ...]
    finetune-phi prepare-data --config configs/local.yaml
    finetune-phi endpoint start|stop|status|logs|keys
    finetune-phi smoke --config configs/local.yaml
    finetune-phi chat-connection --config configs/local.yaml
    finetune-phi azureml export-yaml|teardown --config configs/azureml.yaml

Errors that are meant for a person (bad config, missing file, failed job) print one clear message and exit 2;
heavy libraries are imported inside the commands so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute sub-commands, in the order they appear in --help.
COMMAND_MODULES = (
    "flows.finetune_deploy",
    "tasks.data",
    "deployments.service",
    "flows.smoke",
    "tasks.chat_connection",
    "tasks.backends.azureml_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune-phi", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
