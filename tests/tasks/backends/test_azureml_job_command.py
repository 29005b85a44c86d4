"""The Azure ML job's command, run here the way Azure ML runs it: inputs and outputs bound to paths, cwd = training/.

This is the one part of the azureml path that can run for real without Azure: the same training/sft.py with the
tiny CPU recipe, then the MLflow export that makes ``model_output/mlflow_model`` registrable and deployable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.backends import azureml_entities as entities
from tasks.backends.base import TrainingJobSpec
from tests.tasks.backends.conftest import REPO_ROOT

TRAINING = REPO_ROOT / "training"
TINY_RECIPE = TRAINING / "recipes" / "tiny_full_cpu.yaml"


def _bind(command: str, train: Path, test: Path, out: Path) -> str:
    """What Azure ML does to ``${{...}}`` before it runs the command."""
    return (
        command.replace("${{inputs.train_file}}", str(train))
        .replace("${{inputs.eval_file}}", str(test))
        .replace("${{outputs.model_output}}", str(out))
    )


def _env(tmp_path: Path, rank: str) -> dict[str, str]:
    # Inside an Azure ML job MLflow points at the workspace and PyTorchDistribution sets RANK.
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
        "RANK": rank,
    }


@pytest.fixture
def sample_data(tmp_path: Path) -> tuple[Path, Path]:
    rows = (REPO_ROOT / "data" / "sample" / "chat_sample.jsonl").read_text().splitlines()
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("\n".join(rows[:40]) + "\n")
    test.write_text("\n".join(rows[40:50]) + "\n")
    return train, test


@pytest.mark.slow  # ~30 s of CPU: two Python processes importing torch, transformers and MLflow
@pytest.mark.skipif(not (TRAINING / "sft.py").is_file() or not TINY_RECIPE.is_file(), reason="training/ not built")
def test_the_job_command_trains_and_leaves_a_registrable_mlflow_model(tmp_path, settings, sample_data) -> None:
    train, test = sample_data
    out = tmp_path / "model_output"
    spec = TrainingJobSpec(TINY_RECIPE, train, test, "ab" * 32, overrides={"max_steps": 1})
    command = _bind(entities.job_command(spec, settings.azureml), train, test, out)
    # An SQLite store puts artifacts in ./mlruns of the working directory (training/) unless the experiment says
    # otherwise: make the experiment first, with its artifacts in tmp_path (on Azure the workspace holds them).
    import mlflow

    env = _env(tmp_path, "0")
    mlflow.tracking.MlflowClient(env["MLFLOW_TRACKING_URI"]).create_experiment(
        "finetune-phi", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    done = subprocess.run(["bash", "-c", command], cwd=TRAINING, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["manifest_sha256"] == "ab" * 32 and "eval_loss" in metrics
    mlmodel = yaml.safe_load((out / "mlflow_model" / "MLmodel").read_text())
    assert mlmodel["flavors"]["transformers"]["task"] == "text-generation"
    assert (out / "mlflow_model" / "model" / "model.safetensors").is_file()
    assert (out / "mlflow_model" / "components" / "tokenizer" / "tokenizer_config.json").is_file()


def test_only_rank_0_exports_the_mlflow_model(tmp_path) -> None:
    out = tmp_path / "model_output"
    step = _bind(entities.mlflow_export_step("mlflow_model"), tmp_path, tmp_path, out)
    done = subprocess.run(["bash", "-c", step], cwd=tmp_path, env=_env(tmp_path, "1"), capture_output=True, timeout=60)
    assert done.returncode == 0 and not (out / "mlflow_model").exists()
