"""One job identity and one command line for both backends: the same spec gives the same id and the same argv."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

from tasks.backends import azureml_entities as entities
from tasks.backends.base import TrainingJobSpec
from tasks.backends.local_jobs import training_argv, training_job_id
from tasks.backends.training_job import job_identity


def _azure_argv(spec: TrainingJobSpec, training_dir: Path, output_dir: Path) -> list[str]:
    """The Azure ML command line as the job runs it, its input/output bindings filled with the local paths."""
    line = entities.training_command_line(spec, training_dir)
    line = line.replace("${{inputs.train_file}}", str(Path(spec.train_file).resolve()))
    line = line.replace("${{inputs.eval_file}}", str(Path(spec.eval_file).resolve()))
    line = line.replace(f"${{{{outputs.{entities.MODEL_OUTPUT}}}}}", str(output_dir.resolve()))
    return shlex.split(line)


def test_the_same_spec_gives_the_same_identity_and_argv_on_both_backends(settings, spec, training_dir, tmp_path):
    as_int = dataclasses.replace(spec, overrides={"max_steps": 5, "learning_rate": 0.001})
    as_text = dataclasses.replace(spec, overrides={"learning_rate": "0.001", "max_steps": "5"})
    output = tmp_path / "out"

    # The override 5 and "5" are one job on both backends, with one command line.
    assert training_job_id(as_int, training_dir) == training_job_id(as_text, training_dir)
    assert entities.job_name(as_int, settings.azureml, training_dir) == entities.job_name(
        as_text, settings.azureml, training_dir
    )
    assert training_argv(as_int, output, training_dir) == training_argv(as_text, output, training_dir)
    assert entities.training_command_line(as_int, training_dir) == entities.training_command_line(
        as_text, training_dir
    )
    # The same arguments after the interpreter on both backends, once Azure's bindings are the local paths.
    local = training_argv(as_int, output, training_dir)
    azure = _azure_argv(as_text, training_dir, output)
    assert azure[0] == "python" and local[1:] == azure[1:]
    assert local[local.index("--max_steps") + 1] == "5"

    # Both ids are the one identity of the spec, each backend adding only where it runs the job.
    data = (str(Path(spec.train_file).resolve()), str(Path(spec.eval_file).resolve()))
    local_identity = job_identity(as_int, data=data, target={"tracking_uri": ""}, training_dir=training_dir)
    assert training_job_id(as_int, training_dir) == f"train-{local_identity}"
    assert entities.job_name(as_int, settings.azureml, training_dir).endswith(
        job_identity(as_text, data=data, target=_azure_target(settings, training_dir), training_dir=training_dir)
    )


def _azure_target(settings, training_dir: Path) -> dict[str, str]:
    cfg = settings.azureml
    return {
        "compute": cfg.compute.name,
        "nodes": f"{cfg.instance_count}x{cfg.processes_per_node}",
        "environment": entities.environment_version(cfg, training_dir.parent),
        "model_output_subpath": cfg.model_output_subpath,
    }
