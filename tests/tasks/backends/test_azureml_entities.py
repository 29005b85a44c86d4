"""Every entity built from configs/azureml.yaml dumps to CLI v2 YAML and loads back with the SDK's own loaders."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from azure.ai.ml import (
    load_compute,
    load_environment,
    load_job,
    load_model,
    load_online_deployment,
    load_online_endpoint,
)
from azure.ai.ml.entities import ManagedOnlineDeployment, ManagedOnlineEndpoint

from tasks.backends import azureml_entities as entities
from tasks.backends.base import TrainingJobSpec
from tasks.backends.training_job import recipe_in_code


def _write(tmp_path: Path, name: str, document: dict) -> Path:
    path = tmp_path / "yaml" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def test_command_job_round_trips_with_the_same_command_line(tmp_path, settings, spec, training_dir) -> None:
    cfg = settings.azureml
    job = entities.training_command(spec, cfg, environment="azureml:finetune-phi-train:1", training_dir=training_dir)
    out = tmp_path / "yaml"
    loaded = load_job(_write(tmp_path, "job.yml", entities.to_yaml_dict(job, "job", out)))

    training_line, export_step = loaded.command.split(" && ", 1)
    assert training_line == (
        "python sft.py --config recipes/phi3.5-mini_full_gpu.yaml --train_file ${{inputs.train_file}} "
        "--eval_file ${{inputs.eval_file}} --output_dir ${{outputs.model_output}} "
        f"--manifest_sha256 {spec.manifest_sha256} --max_steps 20"
    )
    assert export_step.endswith("${{outputs.model_output}}/model ${{outputs.model_output}}/mlflow_model; fi")
    assert (out / loaded.code).resolve() == training_dir.resolve()  # relative to the YAML file, as az ml reads it
    assert loaded.compute == cfg.compute.name
    assert loaded.environment.removeprefix("azureml:") == "finetune-phi-train:1"
    assert loaded.experiment_name == "finetune-phi"
    # Local data stays a local path (the SDK's dict would make it an asset reference azureml:<path>).
    assert Path(out, loaded.inputs["train_file"].path).resolve() == Path(spec.train_file).resolve()
    assert loaded.inputs["eval_file"].type == "uri_file"
    assert loaded.outputs["model_output"].type == "uri_folder"
    assert loaded.distribution.type == "pytorch"
    assert loaded.distribution.process_count_per_instance == cfg.processes_per_node
    assert loaded.resources.instance_count == cfg.instance_count
    assert loaded.tags["manifest_sha256"] == spec.manifest_sha256


def test_multi_gpu_and_datastore_inputs(tmp_path, settings, training_dir) -> None:
    cfg = settings.azureml.model_copy(update={"instance_count": 2, "processes_per_node": 4})
    spec = TrainingJobSpec(
        recipe=settings.training.recipe,
        # TrainingJobSpec types data as Path, which collapses the double slash of a URI: it must come back.
        train_file=Path("azureml://datastores/workspaceblobstore/paths/chat/train.jsonl"),
        eval_file=Path("azureml:chat-test:3"),
        manifest_sha256="cd" * 32,
    )
    job = entities.training_command(spec, cfg, environment="azureml:env:1", training_dir=training_dir)
    loaded = load_job(_write(tmp_path, "job.yml", entities.to_yaml_dict(job, "job", tmp_path / "yaml")))
    assert loaded.inputs["train_file"].path == "azureml://datastores/workspaceblobstore/paths/chat/train.jsonl"
    assert loaded.inputs["eval_file"].path.removeprefix("azureml:") == "chat-test:3"  # a data asset reference
    assert loaded.distribution.process_count_per_instance == 4
    assert loaded.resources.instance_count == 2


def test_recipe_outside_training_folder_is_refused(settings, spec, training_dir, tmp_path) -> None:
    stray = tmp_path / "elsewhere.yaml"
    stray.write_text("x: 1\n")
    with pytest.raises(ValueError, match="outside"):
        entities.training_command_line(TrainingJobSpec(stray, spec.train_file, spec.eval_file, "00"), training_dir)
    with pytest.raises(FileNotFoundError, match=r"training\.recipe"):
        entities.training_command_line(
            TrainingJobSpec(training_dir / "recipes" / "nope.yaml", spec.train_file, spec.eval_file, "00"),
            training_dir,
        )


def test_job_name_is_stable_for_the_same_inputs_and_changes_with_them(settings, spec, training_dir) -> None:
    cfg = settings.azureml
    first = entities.job_name(spec, cfg, training_dir)
    assert first == entities.job_name(spec, cfg, training_dir)
    assert entities.job_name(spec, cfg, training_dir, attempt=2) == f"{first}-2"
    changed = TrainingJobSpec(spec.recipe, spec.train_file, spec.eval_file, "ff" * 32, spec.overrides)
    assert entities.job_name(changed, cfg, training_dir) != first
    (training_dir / "sft.py").write_text("print('edited')\n")
    second = entities.job_name(spec, cfg, training_dir)
    assert second != first
    (training_dir / "conda.yml").write_text("name: x\ndependencies:\n  - python=3.12\n")  # a new environment
    assert entities.job_name(spec, cfg, training_dir) != second


def test_endpoint_round_trips_with_identity_and_auth_mode(tmp_path, settings) -> None:
    endpoint = entities.online_endpoint(settings)
    loaded = load_online_endpoint(_write(tmp_path, "endpoint.yml", entities.to_yaml_dict(endpoint, "endpoint")))
    assert isinstance(loaded, ManagedOnlineEndpoint)
    assert loaded.name == settings.endpoint.name
    assert loaded.auth_mode == "key"
    assert loaded.identity.type == "user_assigned"
    assert [i.resource_id for i in loaded.identity.user_assigned_identities] == [
        settings.azureml.user_assigned_identity_id
    ]
    # Serialising did not touch the entity the backend would submit.
    assert not isinstance(endpoint.identity.user_assigned_identities[0], dict)
    token = settings.model_copy(update={"azureml": settings.azureml.model_copy(update={"auth_mode": "aml_token"})})
    assert (
        load_online_endpoint(
            _write(tmp_path, "token.yml", entities.to_yaml_dict(entities.online_endpoint(token), "endpoint"))
        ).auth_mode
        == "aml_token"
    )


def test_deployment_round_trips_with_the_samples_settings(tmp_path, settings) -> None:
    deployment = entities.online_deployment(settings, "model-v3", "finetune-phi:3", tags={"job_id": "j1"})
    loaded = load_online_deployment(
        _write(tmp_path, "deployment.yml", entities.to_yaml_dict(deployment, "deployment"))
    )
    assert isinstance(loaded, ManagedOnlineDeployment)
    assert (loaded.name, loaded.endpoint_name) == ("model-v3", settings.endpoint.name)
    assert loaded.model.removeprefix("azureml:") == "finetune-phi:3"
    assert (loaded.instance_type, loaded.instance_count) == ("Standard_E4s_v3", 1)
    assert loaded.request_settings.max_concurrent_requests_per_instance == 3
    assert loaded.request_settings.request_timeout_ms == 180_000
    for probe in (loaded.liveness_probe, loaded.readiness_probe):
        assert (probe.initial_delay, probe.period, probe.timeout, probe.failure_threshold) == (500, 100, 2, 30)
    assert loaded.tags["job_id"] == "j1"


def test_environment_and_compute_round_trip(tmp_path, settings, training_dir) -> None:
    cfg = settings.azureml
    env = entities.training_environment(cfg, training_dir.parent)
    loaded_env = load_environment(_write(tmp_path, "environment.yml", entities.to_yaml_dict(env, "environment")))
    assert (loaded_env.name, loaded_env.version, loaded_env.image) == (
        cfg.environment.name,
        env.version,
        cfg.environment.image,
    )
    assert loaded_env.conda_file["dependencies"][0] == "python=3.11"
    # The version is a content hash: an edited conda file gives a new version, an unchanged one the same.
    assert entities.environment_version(cfg, training_dir.parent) == env.version
    (training_dir / "conda.yml").write_text("name: x\ndependencies:\n  - python=3.12\n")
    assert entities.environment_version(cfg, training_dir.parent) != env.version

    compute = load_compute(
        _write(tmp_path, "compute.yml", entities.to_yaml_dict(entities.compute_cluster(cfg), "compute"))
    )
    assert (compute.name, compute.size, compute.min_instances, compute.max_instances) == (
        "gpu-a100-cluster", "Standard_NC24ads_A100_v4", 0, 1,
    )  # fmt: skip
    assert compute.tier == "dedicated" and compute.idle_time_before_scale_down == 1800


def test_registered_model_points_at_the_job_output(tmp_path) -> None:
    model = entities.registered_model("finetune-phi", "job-1", {"manifest_sha256": "ab"}, "mlflow_model")
    assert model.path == "azureml://jobs/job-1/outputs/model_output/paths/mlflow_model"
    assert model.type == "mlflow_model"
    assert model.tags["job_id"] == "job-1" and model.tags["manifest_sha256"] == "ab"
    assert entities.registered_model("m", "job-1", {}).path == "azureml://jobs/job-1/outputs/model_output"
    loaded = load_model(_write(tmp_path, "model.yml", entities.to_yaml_dict(model, "model")))
    assert (loaded.path, loaded.type, loaded.tags["job_id"]) == (model.path, "mlflow_model", "job-1")


def test_low_priority_compute_reaches_the_rest_request(settings) -> None:
    cfg = settings.azureml.model_copy(
        update={"compute": settings.azureml.compute.model_copy(update={"tier": "low_priority", "max_instances": 4})}
    )
    cluster = entities.compute_cluster(cfg)
    rest = cluster._to_rest_object().properties.properties
    assert rest.vm_priority == "LowPriority"
    assert (rest.scale_settings.min_node_count, rest.scale_settings.max_node_count) == (0, 4)


def test_the_shipped_azure_config_names_a_shipped_recipe() -> None:
    from tasks.config import load_config
    from tests.tasks.backends.conftest import REPO_ROOT

    settings = load_config(REPO_ROOT / "configs" / "azureml.yaml", environ={})
    assert recipe_in_code(settings.training.recipe) == "recipes/phi3.5-mini_full_gpu.yaml"
    assert (
        settings.azureml.subscription_id == "00000000-0000-0000-0000-000000000000"
    )  # a placeholder, never a real one
