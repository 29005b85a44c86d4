"""``finetune-phi azureml export-yaml`` and ``teardown``."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

from azure.ai.ml import load_compute, load_environment, load_job, load_online_deployment, load_online_endpoint

from tasks.backends.azureml_cli import EXPORT_FILES, add_commands, teardown
from tests.tasks.backends.conftest import REPO_ROOT


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune-phi")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_export_yaml_writes_files_that_az_ml_can_load(tmp_path, training_dir, capsys) -> None:
    out = tmp_path / "azureml-yaml"
    prepared = tmp_path / "state" / "data" / "0123456789abcdef"  # what `finetune-phi prepare-data` leaves
    prepared.mkdir(parents=True)
    (prepared / "manifest.json").write_text(json.dumps({"sha256": "0123456789abcdef" * 4}))
    for name in ("train.jsonl", "test.jsonl"):
        (prepared / name).write_text('{"messages": []}\n')
    recipe = training_dir / "recipes" / "phi3.5-mini_full_gpu.yaml"
    args = _parser().parse_args(
        [
            "azureml", "export-yaml", "--config", str(REPO_ROOT / "configs" / "azureml.yaml"), "--output", str(out),
            "--training-dir", str(training_dir), "--set", f"training.recipe={recipe}",
            "--set", f"state_dir={tmp_path / 'state'}",
            "--train-file", "azureml://datastores/workspaceblobstore/paths/chat/train.jsonl",
        ]
    )  # fmt: skip
    assert args.handler(args) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(EXPORT_FILES)
    assert "az ml job create -f" in capsys.readouterr().out

    job = load_job(out / "job.yml")
    assert job.command.startswith("python sft.py --config recipes/phi3.5-mini_full_gpu.yaml --train_file")
    assert job.inputs["train_file"].path == "azureml://datastores/workspaceblobstore/paths/chat/train.jsonl"
    assert (out / job.code).resolve() == training_dir.resolve()  # relative, so the folder can move with the repo
    assert (out / job.inputs["eval_file"].path).resolve() == (prepared / "test.jsonl").resolve()
    assert "--manifest_sha256 " + "0123456789abcdef" * 4 in job.command
    endpoint = load_online_endpoint(out / "endpoint.yml")
    assert endpoint.auth_mode == "key" and endpoint.identity.type == "user_assigned"
    deployment = load_online_deployment(out / "deployment.yml")
    assert deployment.readiness_probe.initial_delay == 500
    assert deployment.request_settings.request_timeout_ms == 180_000
    env = load_environment(out / "environment.yml")
    assert env.conda_file["name"] == "finetune-phi"  # read through the relative conda_file path
    assert load_compute(out / "compute.yml").size == "Standard_NC24ads_A100_v4"
    text = "".join((out / name).read_text() for name in EXPORT_FILES)
    assert "key:" not in text.replace("primary_key", "")  # no secret in any exported file


class _RecordingBackend:
    def __init__(self, plan):
        self.plan = plan
        self.deleted: list = []

    def teardown_plan(self, include_compute: bool):
        return [p for p in self.plan if include_compute or p[0] != "compute"]

    def teardown(self, plan):
        self.deleted.extend(plan)
        return [f"{k} {n}" for k, n in plan]


def test_teardown_without_yes_and_without_a_terminal_deletes_nothing(backend, fake, settings, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("yes\n"))  # not a TTY: even a "yes" on stdin does not count
    backend.ensure_endpoint()
    fake.compute.store[settings.azureml.compute.name] = object()
    assert teardown(backend, include_compute=True, yes=False) == []
    shown = capsys.readouterr().out
    assert f"endpoint   {settings.endpoint.name}" in shown and "compute" in shown and "nothing deleted" in shown
    assert not [c for c in fake.calls if c[0].endswith("begin_delete")]


def test_teardown_with_yes_deletes_endpoint_and_optionally_compute(backend, fake, settings, capsys) -> None:
    backend.ensure_endpoint()
    fake.online_deployments.add(settings.endpoint.name, "model-v1", "azureml:finetune-phi:1")
    fake.compute.store[settings.azureml.compute.name] = object()
    done = teardown(backend, include_compute=False, yes=True)
    assert done[-1] == f"endpoint {settings.endpoint.name}"
    assert fake.online_endpoints.store == {} and settings.azureml.compute.name in fake.compute.store
    teardown(backend, include_compute=True, yes=True)
    assert fake.compute.store == {}
    assert "nothing to delete" not in capsys.readouterr().out


def test_teardown_asks_on_a_terminal(capsys) -> None:
    plan = [("endpoint", "ep"), ("compute", "gpu")]
    refused = _RecordingBackend(plan)
    assert teardown(refused, include_compute=True, yes=False, confirm=lambda prompt: False) == []
    assert refused.deleted == []
    agreed = _RecordingBackend(plan)
    assert teardown(agreed, include_compute=True, yes=False, confirm=lambda prompt: True) == [
        "endpoint ep",
        "compute gpu",
    ]


def test_cli_lists_the_azureml_commands() -> None:
    from flows.cli import build_parser

    help_text = build_parser().format_help()
    assert "azureml" in help_text
    assert Path(REPO_ROOT / "configs" / "azureml.yaml").is_file()
