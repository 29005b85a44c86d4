"""Shared set-up for the azureml backend tests: a training folder, the sample config, the fake client."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.backends.azureml import AzureMLBackend
from tasks.backends.base import TrainingJobSpec
from tasks.config import Settings, load_config
from tests.azure_fake.client import StaticToken, fake_cloud
from tests.azure_fake.server import AzureMLFake
from tests.tasks.backends.fake_azure import FakeMLClient

REPO_ROOT = Path(__file__).resolve().parents[3]


class FakeClock:
    """``time.monotonic`` and ``time.sleep`` in one: sleeping advances the clock and records the delay."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def training_dir(tmp_path: Path) -> Path:
    """A stand-in for training/: the job's code folder (script, conda file, a recipe)."""
    folder = tmp_path / "repo" / "training"
    (folder / "recipes").mkdir(parents=True)
    (folder / "sft.py").write_text("print('train')\n")
    (folder / "conda.yml").write_text("name: finetune-phi\ndependencies:\n  - python=3.11\n  - pip\n")
    (folder / "recipes" / "phi3.5-mini_full_gpu.yaml").write_text(
        "model_name_or_path: microsoft/Phi-3.5-mini-instruct\n"
    )
    return folder


@pytest.fixture
def settings(tmp_path: Path, training_dir: Path) -> Settings:
    return load_config(
        REPO_ROOT / "configs" / "azureml.yaml",
        {
            "training.recipe": str(training_dir / "recipes" / "phi3.5-mini_full_gpu.yaml"),
            "state_dir": str(tmp_path / "state"),
            # The shipped config bakes each step for minutes on Azure Monitor's numbers; these tests judge steps by
            # the probes (the Azure Monitor tests of test_azureml_flow.py set their own bakes).
            "rollout.bake_s": 0,
            "rollout.final_bake_s": 0,
        },
        environ={},
    )


@pytest.fixture
def spec(tmp_path: Path, settings: Settings) -> TrainingJobSpec:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"messages": []}\n')
    (data / "test.jsonl").write_text('{"messages": []}\n')
    return TrainingJobSpec(
        recipe=settings.training.recipe,
        train_file=data / "train.jsonl",
        eval_file=data / "test.jsonl",
        manifest_sha256="ab" * 32,
        overrides={"max_steps": 20},
        experiment="finetune-phi",
    )


@pytest.fixture
def fake() -> FakeMLClient:
    return FakeMLClient()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def logs() -> dict[str, str]:
    """Log text served by URL (the log files' SAS URLs in the run details); tests append to it as a job writes."""
    return {}


def serve_log(logs: dict[str, str], url: str, start: int | None) -> bytes:
    """What blob storage answers for ``url``: the bytes from ``start`` on, or the whole (short) log for a tail."""
    data = logs[url].encode()
    return data if start is None else data[start:]


@pytest.fixture
def secrets() -> dict[str, str]:
    return {}


@pytest.fixture
def backend(settings, fake, clock, logs, secrets, training_dir) -> AzureMLBackend:
    return AzureMLBackend(
        settings,
        ml_client=fake,
        sleep=clock.sleep,
        rng=random.Random(1234).random,
        clock=clock,
        fetch_log=lambda url, start: serve_log(logs, url, start),
        secret_store=secrets.__setitem__,
        training_dir=training_dir,
    )


@pytest.fixture
def azure(settings) -> Iterator[AzureMLFake]:
    """Azure ML's REST API on loopback HTTPS for the config's workspace, with the config's identity existing."""
    cfg = settings.azureml
    fake = AzureMLFake(subscription=cfg.subscription_id, resource_group=cfg.resource_group, workspace=cfg.workspace)
    fake.add_identity(cfg.user_assigned_identity_id.rsplit("/", 1)[-1])
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def rest_backend(settings, azure, clock, secrets, training_dir) -> Iterator[AzureMLBackend]:
    """The backend building the real ``MLClient`` against the REST fake (its own retry and transport settings)."""
    with fake_cloud(azure) as cloud:
        backend = AzureMLBackend(
            settings,
            credential=StaticToken(),
            cloud=cloud,
            sleep=clock.sleep,
            rng=random.Random(1234).random,
            clock=clock,
            secret_store=secrets.__setitem__,
            training_dir=training_dir,
        )
        try:
            yield backend
        finally:
            backend.close()
    # However the test ended, the backend left no SDK poller polling (and printing) behind it.
    assert [t.name for t in threading.enumerate() if t.name.startswith("LROPoller")] == []
