"""Shared test set-up. Nothing here downloads: models and data are made by the project or shipped with it."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock

# Set before any library import: tests never reach the hub or a telemetry collector.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Prompt flow fixes its home (connections, keyring) once, at its first import, and several test modules import it.
# One home per pytest process, named before anything imports Prompt flow, so that first import and every later
# tasks.chat_connection.configure_promptflow (which keeps a PF_HOME_DIRECTORY already set) agree. pytest-xdist workers
# inherit the controller's environment, so a home this file made for another process is replaced, not shared.
_PF_OWNER = os.environ.get("PYTEST_XDIST_WORKER", "controller")
if "PF_HOME_DIRECTORY" not in os.environ or os.environ.get("FINETUNE_PHI_TESTS_PF_OWNER", _PF_OWNER) != _PF_OWNER:
    _PF_ROOT = Path(tempfile.mkdtemp(prefix="finetune-phi-tests-pf-"))
    atexit.register(shutil.rmtree, _PF_ROOT, ignore_errors=True)
    os.environ["FINETUNE_PHI_TESTS_PF_OWNER"] = _PF_OWNER
    os.environ["PF_HOME_DIRECTORY"] = str(_PF_ROOT / "promptflow")
    os.environ["XDG_DATA_HOME"] = str(_PF_ROOT / "xdg")
    os.environ.setdefault("PYTHON_KEYRING_BACKEND", "keyrings.alt.file.PlaintextKeyring")

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    check_first_run_users(items)
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


FLOW_TESTS = "tests/flows/"  # every test file that uses the first_run session fixture (the whole flow) is here


def check_first_run_users(items: list[pytest.Item]) -> None:
    """pytest-xdist runs the files under FLOW_TESTS on one worker (pytest_xdist_make_scheduler), so that
    ``first_run`` runs once a session; a file elsewhere that used it would run the flow a second time."""
    for item in items:
        where = item.path.relative_to(REPO_ROOT).as_posix()
        if "first_run" in getattr(item, "fixturenames", ()) and not where.startswith(FLOW_TESTS):
            raise pytest.UsageError(f"{item.nodeid} uses first_run: move it under {FLOW_TESTS}")


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadfile`` (what ``scripts/dev.py test`` passes), with the files under FLOW_TESTS as one unit: each
    worker takes a whole test file at a time (its module-scoped servers and models are shared by its tests), and
    the flow files, which share the ``first_run`` session fixture, go to one worker together."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FlowFilesTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return FLOW_TESTS if path.startswith(FLOW_TESTS) else path

    return FlowFilesTogether(config, log)


@pytest.fixture(autouse=True)
def _restore_environment() -> Iterator[None]:
    """Each test gets back the environment it started with: ``configure_environment`` points MLFLOW_TRACKING_URI,
    PREFECT_HOME, HF_HOME... at a test's state folder, and a value left behind would steer the next test's store."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


# ---------------------------------------------------------------------------------------------------------------
# Training fixtures (issue 3), shared by every area: the sample split and one tiny model trained per session.
# Training on 2 cores is the slowest thing in the suite, so it runs once and is never cached across sessions.

# Steps for the shared tiny model: enough that greedy replies follow the chat format and stop on <|end|>, few
# enough for about a minute on 2 cores. The recipe as shipped (more steps) is what the benchmark measures.
TINY_FIXTURE_OVERRIDES = {"max_steps": 120, "save_steps": 60, "logging_steps": 20, "warmup_steps": 10}


@pytest.fixture(scope="session")
def sample_split(tmp_path_factory: pytest.TempPathFactory):
    """``tasks.data.prepare_dataset`` on the shipped sample: the DatasetManifest (train/test JSONL, sha256)."""
    from tasks.config import DataConfig
    from tasks.data import prepare_dataset

    config = DataConfig(path=REPO_ROOT / "data" / "sample" / "chat_sample.jsonl", test_share=0.2, seed=0)
    return prepare_dataset(config, tmp_path_factory.mktemp("sample-split"))


@pytest.fixture(scope="session")
def trained_tiny_model(tmp_path_factory: pytest.TempPathFactory, sample_split) -> Path:
    """The tiny recipe trained once per session as a local job (the Azure ML command line, from training/) on
    ``sample_split``, logging to an MLflow SQLite store beside it. Returns the job's output folder: ``model/``,
    ``metrics.json`` (with ``mlflow_run_id``/``mlflow_model_uri``), ``loss_curve.png``, ``checkpoint-*``."""
    # Under pytest-xdist every worker is its own session: the first worker to get here trains, in the run's shared
    # temporary folder, and the others wait on the lock and take its output (one training per run, as without xdist).
    shared = shared_temp_root(tmp_path_factory)
    with FileLock(shared / "trained-tiny.lock"):
        output = shared / "trained-tiny" / "output.txt"
        if output.exists():
            return Path(output.read_text(encoding="utf-8"))
        model_dir = _train_tiny_model(shared / "trained-tiny", sample_split)
        output.write_text(str(model_dir), encoding="utf-8")
        return model_dir


def shared_temp_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's temporary folder that every pytest-xdist worker shares (each worker's base folder is inside it);
    without xdist, the session's own base folder."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _train_tiny_model(root: Path, sample_split) -> Path:
    from tasks.backends.base import TrainingJobSpec
    from tasks.backends.local import LocalBackend
    from tasks.config import load_config
    from tasks.jobs import wait_for_job

    root.mkdir(parents=True, exist_ok=True)
    spec = TrainingJobSpec(
        recipe=REPO_ROOT / "training" / "recipes" / "tiny_full_cpu.yaml",
        train_file=sample_split.train_path,
        eval_file=sample_split.test_path,
        manifest_sha256=sample_split.sha256,
        overrides=dict(TINY_FIXTURE_OVERRIDES),
        experiment="finetune-phi-tests",
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
    )
    # Trained through the production wait (tasks.jobs.wait_for_job on the local backend); the backend's environment
    # defaults (MLflow, Prefect homes under its state folder) end with the fixture, not with the session.
    saved = dict(os.environ)
    try:
        settings = load_config(REPO_ROOT / "configs" / "local.yaml", environ={})
        training = settings.training.model_copy(update={"timeout_s": 900, "poll_interval_s": 1.0})
        settings = settings.model_copy(update={"state_dir": root, "training": training})
        backend = LocalBackend(settings)
        job = backend.runner.submit(spec, job_id="tiny-session")
        done = wait_for_job(backend, job.job_id, settings)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert done.output_dir is not None
    return Path(done.output_dir)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The suite's one temporary Prefect server and database (started on first use, it is the slow part: ~15 s on
    2 cores); results persist under tmp. Yields the API URL."""
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    with prefect_test_harness(server_startup_timeout=90), temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}):
        yield str(PREFECT_API_URL.value())
