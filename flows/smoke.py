"""A smoke test of the live endpoint as a flow of its own, for schedules (``prefect.yaml``'s ``smoke-test``).

Sends the configured prompts through the endpoint as users would (no pinned deployment) and checks HTTP 200,
non-empty replies that end, and the latency budget; publishes the prompts and answers as a table artifact. The
route follows ``smoke.route`` (``auto``: ``/v1/chat/completions`` locally, ``/score`` on Azure ML, where whether a
reply ended is not reported and so not checked; see :mod:`tasks.smoke`).
The run fails when any case fails, so a schedule turns a broken endpoint into a failed, visible run.

    finetune-phi smoke --config configs/local.yaml
"""

from __future__ import annotations

import argparse
from typing import Any

from prefect import flow

from tasks.config import load_config
from tasks.smoke import ROUTE_PATHS, smoke_test_task
from tasks.state import configure_environment


@flow(name="smoke-test")
def smoke_test(config_path: str = "configs/local.yaml", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Smoke-test the endpoint named in the config; fails the run when a reply is wrong, missing or slow."""
    settings = load_config(config_path, overrides)
    configure_environment(settings.state_dir)
    return smoke_test_task(settings, None, "smoke-test")


def _smoke_command(args: argparse.Namespace) -> int:
    settings = load_config(args.config, args.set)  # fail fast on a bad config, before Prefect starts
    from flows.cli import prefect_home_of
    from tasks.config import normalise_overrides

    with prefect_home_of(settings):
        state = smoke_test(args.config, normalise_overrides(args.set) or None, return_state=True)
    if state.is_completed():
        report = state.result()
        route = ROUTE_PATHS[report.get("route", "chat")]
        print(f"smoke test passed via {route}: {sum(1 for c in report['cases'] if c['problem'] is None)} replies ok")
        for case in report["cases"]:
            ended = case["finish_reason"] or "end not reported"
            print(f"  {case['prompt']!r} -> {case['reply'][:80]!r} ({case['latency_s']:.2f} s, {ended})")
        return 0
    try:
        state.result()
    except Exception as exc:
        print(f"smoke test failed: {exc}")
    return 1


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("smoke", help="smoke-test the live endpoint (the configured prompts)")
    parser.add_argument("--config", default="configs/local.yaml", help="run configuration (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a field")
    parser.set_defaults(handler=_smoke_command)


__all__ = ["add_commands", "smoke_test"]
