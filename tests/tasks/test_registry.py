"""The registry on a real MLflow SQLite store in tmp: idempotent registration, lineage tags, aliases, folders."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest

from tasks import registry

MODEL = "finetune-phi-test"


@pytest.fixture(scope="module")
def job_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training job's output folder as the local job runner leaves it: model/ and metrics.json."""
    from tests.deployments.conftest import build_model

    output = tmp_path_factory.mktemp("job-1")
    build_model(output / "model")
    metrics = {"recipe": "tiny_full_cpu", "manifest_sha256": "ab" * 32, "eval_loss": 1.2345678, "train_runtime": 12}
    (output / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    return output


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def registered(job_output: Path, tracking_uri: str):
    before = os.environ.get("MLFLOW_TRACKING_URI")
    version = registry.register_job_model(
        tracking_uri=tracking_uri, model_name=MODEL, job_id="job-1", job_output_dir=job_output, tags={"flow_run": "r1"}
    )
    assert os.environ.get("MLFLOW_TRACKING_URI") == before  # the global MLflow URI is left as it was
    return version


def test_artifacts_stay_beside_the_sqlite_store(registered, tracking_uri: str) -> None:
    store = Path(tracking_uri.removeprefix("sqlite:///")).parent
    assert any((store / "artifacts").rglob("model.safetensors"))


def test_registration_carries_lineage_tags(registered, job_output: Path) -> None:
    assert registered.name == MODEL and registered.version == "1" and registered.uri == f"models:/{MODEL}/1"
    assert registered.source_job_id == "job-1"
    tags = registered.tags
    assert tags["job_id"] == "job-1" and tags["recipe"] == "tiny_full_cpu" and tags["manifest_sha256"] == "ab" * 32
    assert float(tags["eval_loss"]) == pytest.approx(1.2345678, rel=1e-5) and tags["flow_run"] == "r1"
    assert registered.local_path == (job_output / "model").resolve()


def test_registering_the_same_job_again_returns_the_same_version(registered, job_output, tracking_uri) -> None:
    again = registry.register_job_model(
        tracking_uri=tracking_uri, model_name=MODEL, job_id="job-1", job_output_dir=job_output
    )
    assert again.version == registered.version
    other = registry.register_job_model(
        tracking_uri=tracking_uri,
        model_name=MODEL,
        job_id="job-2",
        job_output_dir=job_output,
        mlflow_model_uri=registered.uri,  # a model the job logged itself: registered as it is, not logged again
    )
    assert other.version == "2" and other.source_job_id == "job-2"
    assert registry.find_job_version(MODEL, "job-2", tracking_uri=tracking_uri).version == "2"
    assert registry.find_job_version(MODEL, "job-3", tracking_uri=tracking_uri) is None


def test_aliases_candidate_and_champion(registered, tracking_uri: str) -> None:
    assert registry.get_version_by_alias(MODEL, "champion", tracking_uri=tracking_uri) is None
    assert registry.get_version_by_alias("no-such-model", "champion", tracking_uri=tracking_uri) is None
    registry.set_alias(MODEL, "candidate", registered.version, tracking_uri=tracking_uri)
    registry.set_alias(MODEL, "champion", registered.version, tracking_uri=tracking_uri)
    candidate = registry.get_version_by_alias(MODEL, "candidate", tracking_uri=tracking_uri)
    assert candidate is not None and candidate.version == registered.version and candidate.source_job_id == "job-1"
    registry.delete_alias(MODEL, "candidate", tracking_uri=tracking_uri)
    assert registry.get_version_by_alias(MODEL, "candidate", tracking_uri=tracking_uri) is None
    assert registry.get_version_by_alias(MODEL, "champion", tracking_uri=tracking_uri).version == registered.version
    with pytest.raises(ValueError, match="unknown alias"):
        registry.set_alias(MODEL, "latest", registered.version, tracking_uri=tracking_uri)


def test_model_folder_downloads_when_the_job_folder_is_gone(registered, tracking_uri: str, tmp_path: Path) -> None:
    from deployments.engine import find_hf_folders

    assert registry.model_folder(registered, tracking_uri=tracking_uri) == registered.local_path
    detached = dataclasses.replace(registered, local_path=None, tags={})  # as if the job folder were deleted
    folder = registry.model_folder(detached, tracking_uri=tracking_uri, download_dir=tmp_path)
    assert (folder / "MLmodel").is_file()
    # the signature declares the sample's params, or MLflow's scoring server would drop max_new_tokens
    assert "max_new_tokens" in (folder / "MLmodel").read_text(encoding="utf-8")
    model_dir, tokenizer_dir = find_hf_folders(folder)
    assert (model_dir / "config.json").is_file() and (tokenizer_dir / "tokenizer_config.json").is_file()


def test_a_job_without_a_model_fails_clearly(tracking_uri: str, tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json missing"):
        registry.register_job_model(
            tracking_uri=tracking_uri, model_name=MODEL, job_id="empty", job_output_dir=tmp_path
        )
    shutil.rmtree(tmp_path / "model")
