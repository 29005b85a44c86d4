"""The local backend's preflight, and the rule that a training job exiting with the usage-error code 2 is never
restarted or resubmitted (both backends)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tasks.backends.base import JobFailedError, JobStatus
from tasks.backends.local_jobs import LocalJobRunner, submit_or_resume
from tasks.config import load_config
from tasks.preflight import PreflightError, data_check, disk_check, local_checks, port_check, recipe_check, require
from tests.tasks.test_jobs import _spec
from tests.tasks.test_jobs import _training_dir as _stand_in_training_dir

REPO_ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _settings(tmp_path: Path, **overrides):
    base = {"state_dir": str(tmp_path / "state"), "endpoint.port": _free_port()}
    return load_config(REPO_ROOT / "configs" / "local.yaml", {**base, **overrides}, environ={})


def test_a_missing_recipe_is_stopped_by_preflight_with_one_sentence(tmp_path: Path) -> None:
    settings = _settings(tmp_path, **{"training.recipe": "training/recipes/nope.yaml"})
    checks = local_checks(settings)
    assert [(c.name, c.ok) for c in checks] == [
        ("recipe", False),
        ("data", True),
        ("endpoint port", True),
        ("disk", True),
    ]
    with pytest.raises(PreflightError) as raised:
        require(checks)
    assert str(raised.value) == (
        "preflight stopped the run before it spent anything: recipe: training/recipes/nope.yaml does not exist; "
        "set training.recipe to a file in training/recipes/"
    )


def test_a_recipe_key_the_training_script_does_not_know_is_a_cross(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: tiny\nlearning_rat: 0.1\n")
    recipe = recipe_check(_settings(tmp_path, **{"training.recipe": str(bad)}))
    assert not recipe.ok and "unknown key 'learning_rat' (did you mean 'learning_rate'?)" in recipe.detail
    assert not list((tmp_path / "state").glob("preflight/recipe-*.ok"))  # only a pass is remembered


def test_an_unreadable_data_source_and_a_taken_port_are_crosses(tmp_path: Path) -> None:
    with socket.socket() as other:  # another program on the endpoint port
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        settings = _settings(tmp_path, **{"data.path": str(tmp_path / "missing.jsonl"), "endpoint.port": port})
        checks = {c.name: c for c in (data_check(settings), port_check(settings))}
    assert not checks["data"].ok and "missing.jsonl does not exist" in checks["data"].detail
    assert not checks["endpoint port"].ok and "in use by another program" in checks["endpoint port"].detail
    assert checks["endpoint port"].fix == "stop it or set endpoint.port"
    assert port_check(settings).ok  # once the other program is gone


def test_a_full_disk_is_a_cross(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    assert disk_check(settings).ok
    full = disk_check(settings, min_free_bytes=2**62)
    assert not full.ok and "GiB free" in full.detail and "state_dir" in full.fix


def test_a_local_job_that_exited_2_is_not_restarted(tmp_path: Path) -> None:
    training = _stand_in_training_dir(
        tmp_path, "import sys\nprint('error: recipe nope', file=sys.stderr)\nsys.exit(2)\n"
    )
    runner = LocalJobRunner(tmp_path / "jobs", training_dir=training)
    first = submit_or_resume(runner, _spec(training))
    with pytest.raises(JobFailedError):  # the wait reports the failure (and retries nothing: JobFailedError is final)
        runner.wait(first.job_id, timeout_s=60, poll_interval_s=0.05)
    assert runner.get(first.job_id).status == JobStatus.FAILED and runner.get(first.job_id).exit_code == 2
    with pytest.raises(JobFailedError, match=r"exit code 2, a usage error.*not restarted"):
        submit_or_resume(LocalJobRunner(tmp_path / "jobs", training_dir=training), _spec(training))
    assert runner.attempts(first.job_id) == 1
