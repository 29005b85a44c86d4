"""The local job runner with stand-in training scripts (fast): failure with the log tail, cancel of the whole process
group, timeout, a dead pid settled by a fresh runner, the Azure ML command line; and the flow's submit and wait on the
local backend: every log line streamed once, every interrupted wait killing the job, train_task's retries."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect import flow
from prefect._internal.concurrency.cancellation import CancelledError
from prefect.exceptions import TerminationSignal

from tasks.backends.base import JobFailedError, JobInfo, JobStatus, TrainingJobSpec, TransientBackendError
from tasks.backends.local import LocalBackend
from tasks.backends.local_jobs import LocalJobRunner, training_argv
from tasks.config import RetryConfig, Settings
from tasks.jobs import PollTiming, wait_for_job, wait_for_training_job
from tasks.logs import LogFollower, read_lines_since
from tasks.retry import jitter_bounds

REPO_ROOT = Path(__file__).resolve().parents[2]


def _training_dir(tmp_path: Path, body: str, recipe_text: str = "max_steps: 1\n") -> Path:
    """A stand-in for training/: ``sft.py`` with ``body`` and a one-line recipe."""
    folder = tmp_path / "training"
    (folder / "recipes").mkdir(parents=True)
    (folder / "recipes" / "r.yaml").write_text(recipe_text)
    (folder / "sft.py").write_text(textwrap.dedent(body))
    return folder


def _spec(training_dir: Path, **overrides: object) -> TrainingJobSpec:
    return TrainingJobSpec(
        recipe=training_dir / "recipes" / "r.yaml",
        train_file=training_dir / "train.jsonl",
        eval_file=training_dir / "test.jsonl",
        manifest_sha256="abc123",
        overrides=dict(overrides),
    )


def _live_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(stat.parent.name))
    return members


def _wait_terminal(runner: LocalJobRunner, job_id: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not runner.get(job_id).status.is_terminal:
        assert time.monotonic() < deadline, runner.log_tail(job_id)
        time.sleep(0.05)


def test_failing_script_gives_a_failed_job_with_the_last_50_log_lines(tmp_path: Path) -> None:
    training = _training_dir(
        tmp_path,
        """
        import sys
        print("args", " ".join(sys.argv[1:]))
        for i in range(80):
            print(f"line {i}")
        print("Traceback: boom", file=sys.stderr)
        sys.exit(3)
        """,
    )
    runner = LocalJobRunner(tmp_path / "jobs", training_dir=training)
    job = runner.submit(_spec(training, max_steps=5))
    assert job.status == JobStatus.RUNNING and job.url and job.url.endswith("train.log")
    with pytest.raises(JobFailedError) as caught:
        runner.wait(job.job_id, timeout_s=30, poll_interval_s=0.05)
    info = runner.get(job.job_id)
    assert info.status == JobStatus.FAILED and info.exit_code == 3
    assert "exited with code 3" in str(caught.value) and "Traceback: boom" in str(caught.value)
    tail = info.error.split("lines:\n", 1)[1].splitlines()
    assert len(tail) == 50 and tail[0] == "line 31" and tail[-1] == "Traceback: boom"
    # The script saw the Azure ML command line, run from the training folder.
    log = Path(job.url).read_text()
    assert f"args --config recipes/r.yaml --train_file {training / 'train.jsonl'}" in log
    assert "--manifest_sha256 abc123 --max_steps 5" in log
    record = runner._record(job.job_id)
    assert record["cwd"] == str(training.resolve()) and record["finished_at"] and record["started_at"]


def test_cancel_kills_the_whole_process_group(tmp_path: Path) -> None:
    training = _training_dir(
        tmp_path,
        """
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a stubborn script: only SIGKILL ends it
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        print("child", child.pid, flush=True)
        time.sleep(300)
        """,
    )
    runner = LocalJobRunner(tmp_path / "jobs", training_dir=training, grace_s=1.0)
    job = runner.submit(_spec(training))
    deadline = time.monotonic() + 30
    while "child" not in Path(job.url).read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(Path(job.url).read_text().split("child ")[1].split()[0])
    pgid = runner._record(job.job_id)["pid"]
    assert os.getpgid(child) == pgid
    info = runner.cancel(job.job_id)
    assert info.status == JobStatus.CANCELED
    # Nothing of the group runs any more (killed members may linger as zombies until init reaps them).
    assert _live_members(pgid) == []
    assert runner.cancel(job.job_id).status == JobStatus.CANCELED  # idempotent


def test_wait_timeout_cancels_the_job(tmp_path: Path) -> None:
    training = _training_dir(tmp_path, "import time\nprint('started', flush=True)\ntime.sleep(300)\n")
    runner = LocalJobRunner(tmp_path / "jobs", training_dir=training, grace_s=2.0)
    job = runner.submit(_spec(training))
    seen: list[str] = []
    with pytest.raises(JobFailedError, match="did not finish within 1 s and was canceled"):
        runner.wait(job.job_id, timeout_s=1.0, poll_interval_s=0.1, on_lines=seen.extend)
    assert runner.get(job.job_id).status == JobStatus.CANCELED
    assert any(line == "started" for line in seen)


def test_a_fresh_runner_settles_a_finished_job_from_its_files(tmp_path: Path) -> None:
    training = _training_dir(tmp_path, "print('fine')\n")
    first = LocalJobRunner(tmp_path / "jobs", training_dir=training)
    job = first.submit(_spec(training))
    # Another process (a restarted flow) only has the folder: the exit-code file tells it how the job ended.
    exit_file = tmp_path / "jobs" / job.job_id / "exit_code"
    deadline = time.monotonic() + 30
    while not exit_file.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first._procs[job.job_id].wait()  # reap it, as the first process would have
    second = LocalJobRunner(tmp_path / "jobs", training_dir=training)
    info = second.get(job.job_id)
    assert info.status == JobStatus.COMPLETED and info.exit_code == 0
    assert [j.job_id for j in second.list_jobs()] == [job.job_id]
    assert second.log_tail(job.job_id, 1) == ["fine"]


def test_command_line_is_the_azure_ml_one(tmp_path: Path) -> None:
    from tasks.backends.azureml_entities import training_command_line

    spec = TrainingJobSpec(
        recipe=Path("training/recipes/tiny_full_cpu.yaml"),
        train_file=tmp_path / "train.jsonl",
        eval_file=tmp_path / "test.jsonl",
        manifest_sha256="f" * 64,
        overrides={"max_steps": 20, "learning_rate": 0.001},
    )
    local = training_argv(spec, tmp_path / "out")
    azure = shlex.split(training_command_line(spec).replace("${{", "<").replace("}}", ">"))
    assert local[0] == sys.executable and azure[0] == "python"
    local_flags = [a for a in local[1:] if a.startswith("--") or a in ("sft.py", "recipes/tiny_full_cpu.yaml")]
    azure_flags = [a for a in azure[1:] if a.startswith("--") or a in ("sft.py", "recipes/tiny_full_cpu.yaml")]
    assert local_flags == azure_flags
    assert local[local.index("--max_steps") + 1] == "20"


def test_recipe_outside_training_is_refused(tmp_path: Path) -> None:
    from tasks.backends.base import BackendError

    spec = TrainingJobSpec(recipe=tmp_path / "r.yaml", train_file=tmp_path, eval_file=tmp_path, manifest_sha256="x")
    with pytest.raises(BackendError, match="outside"):
        training_argv(spec, tmp_path / "out")


def test_log_follower_returns_complete_new_lines_only(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    follower = LogFollower(log)
    assert follower.read_new() == []
    log.write_text("a\nb")
    assert follower.read_new() == ["a"]
    with open(log, "a") as handle:
        handle.write("\nbar 10%\rbar 100%\n")
    assert follower.read_new() == ["b", "bar 100%"]


# ------------------------------------------------------------------------ the flow's submit and wait, local backend
@pytest.fixture
def local_backend(tmp_path: Path) -> Iterator[Callable[[str], LocalBackend]]:
    """``local_backend(body)``: a local backend in tmp whose jobs run a stand-in ``sft.py`` with ``body``."""
    from tasks.config import load_config

    made: list[LocalBackend] = []

    def make(body: str) -> LocalBackend:
        training = _training_dir(tmp_path, body)
        settings = load_config(REPO_ROOT / "configs" / "local.yaml").model_copy(
            update={"state_dir": tmp_path / "state"}
        )
        settings = _quick(settings, poll_interval_s=0.1, timeout_s=60.0, recipe=training / "recipes" / "r.yaml")
        backend = LocalBackend(settings)
        backend._runner = LocalJobRunner(backend.paths.jobs, training_dir=training, grace_s=2.0)
        made.append(backend)
        return backend

    yield make
    for backend in made:  # nothing left running, whatever the test did
        for job in backend.runner.list_jobs():
            backend.runner.cancel(job.job_id)


def _quick(settings: Settings, **training: object) -> Settings:
    return settings.model_copy(update={"training": settings.training.model_copy(update=training)})


def _submit(backend: LocalBackend) -> str:
    return backend.submit_training(_spec(backend.runner.training_dir)).job_id


BURSTS = """
import sys, time
for i in range(300):
    print(f"burst {i}")
for _ in range(60):
    print("the same line")
sys.stdout.flush()
time.sleep(0.5)
for i in range(40):
    print(f"after {i}")
for _ in range(25):
    print("the same line")
"""


def test_every_log_line_reaches_the_logger_exactly_once(local_backend, caplog: pytest.LogCaptureFixture) -> None:
    """Hundreds of lines between two polls, and runs of identical lines: none lost, none repeated."""
    backend = local_backend(BURSTS)
    caplog.set_level(logging.INFO, logger="finetune_phi.jobs")
    job_id = _submit(backend)
    assert wait_for_job(backend, job_id, backend.settings).status == JobStatus.COMPLETED
    prefix = f"[{job_id}] "
    streamed = [r.getMessage().removeprefix(prefix) for r in caplog.records if r.getMessage().startswith(prefix)]
    expected = [f"burst {i}" for i in range(300)] + ["the same line"] * 60
    expected += [f"after {i}" for i in range(40)] + ["the same line"] * 25
    assert streamed[0].startswith("[finetune-phi] attempt 1 at ")  # the launcher's own line
    assert streamed[1:] == expected


def test_log_since_returns_complete_lines_and_the_offset_to_go_on_from(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    assert read_lines_since(log, 0) == ([], 0)
    log.write_bytes(b"same\nsame\nhalf")
    assert read_lines_since(log, 0) == (["same", "same"], 10)
    assert read_lines_since(log, 10) == ([], 10)
    with open(log, "ab") as handle:
        handle.write("-done\n10%\r100%\né\n".encode())
    assert read_lines_since(log, 10) == (["half-done", "100%", "é"], log.stat().st_size)


def _assert_group_gone(pgid: int, timeout: float = 5.0) -> None:
    """``os.killpg(pgid, 0)`` raises ProcessLookupError: no process of the job's group is left, not even a zombie.

    The cancel returns once no member runs; the script, orphaned when its launcher shell died, is then a zombie
    until init reaps it, a moment later."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        assert _live_members(pgid) == [], "the job's process group still runs"
        assert time.monotonic() < deadline, f"process group {pgid} still has zombies after {timeout} s"
        time.sleep(0.05)


SLEEPER = "import time\nprint('started', flush=True)\ntime.sleep(300)\n"


@pytest.mark.parametrize(
    ("interrupt", "raised"),
    [
        (KeyboardInterrupt(), KeyboardInterrupt),
        (TerminationSignal(signal.SIGTERM), TerminationSignal),
        (CancelledError(), CancelledError),  # a Prefect task timeout inside the task
        (TimeoutError("Scope timed out"), TimeoutError),
        (None, JobFailedError),  # training.timeout_s passed
    ],
    ids=["ctrl-c", "prefect-cancel", "task-timeout-inside", "task-timeout", "deadline"],
)
def test_an_interrupted_wait_kills_the_jobs_process_group(local_backend, interrupt, raised) -> None:
    backend = local_backend(SLEEPER)
    job_id = _submit(backend)
    pgid = backend.runner._record(job_id)["pid"]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        if interrupt is not None and len(waits) == 2:
            raise interrupt
        waits.append(seconds)
        time.sleep(seconds)

    with pytest.raises(raised):
        wait_for_job(backend, job_id, _quick(backend.settings, timeout_s=1.0), PollTiming(sleep=sleep))
    _assert_group_gone(pgid)
    assert backend.get_job(job_id).status == JobStatus.CANCELED


def test_a_prefect_task_timeout_kills_the_jobs_process_group(prefect_harness, local_backend) -> None:
    """Prefect's own timeout of the wait task (not an exception we raise) cancels the job."""
    backend = local_backend(SLEEPER)
    job_id = _submit(backend)
    pgid = backend.runner._record(job_id)["pid"]

    @flow
    def waits_too_long() -> JobInfo:
        return wait_for_training_job.with_options(timeout_seconds=1.5)(backend, job_id, backend.settings)

    state = waits_too_long(return_state=True)
    assert state.is_failed()
    with pytest.raises(TimeoutError):
        state.result()
    _assert_group_gone(pgid)
    assert backend.get_job(job_id).status == JobStatus.CANCELED


def _train(backend: LocalBackend, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Any]:
    """The flow's train step as the flow runs it (``training_task``, with this run's retries) on ``backend``:
    the final state's name and its result (the exception for a failed run)."""
    from tasks.train import training_task

    monkeypatch.setattr("tasks.train.get_backend", lambda settings: backend)
    settings = backend.settings.model_copy(
        update={"retry": RetryConfig(attempts=3, base_delay_s=0.05, max_delay_s=0.1, jitter=0.5)}
    )
    folder = backend.runner.training_dir
    dataset = {"train_path": str(folder / "train.jsonl"), "test_path": str(folder / "test.jsonl"), "sha256": "ab"}

    @flow
    def train_step() -> tuple[str, Any]:
        trainer = training_task(settings, refresh=True)
        assert trainer.retries == 2 and trainer.retry_condition_fn is not None
        for attempt, delay in enumerate(trainer.retry_delay_seconds):  # our jittered delays, not Prefect's
            low, high = jitter_bounds(attempt, settings.retry)
            assert low <= delay <= high
        state = trainer(settings, dataset, f"test-{uuid.uuid4().hex}", return_state=True)
        return state.name, state.result(raise_on_failure=False)

    return train_step()


def _count_submits(backend: LocalBackend, monkeypatch: pytest.MonkeyPatch, *faults: Exception) -> list[int]:
    """Calls of ``backend.submit_training``; the first ones raise ``faults``."""
    calls: list[int] = []
    real = backend.submit_training

    def submit(spec: TrainingJobSpec) -> JobInfo:
        calls.append(1)
        if len(calls) <= len(faults):
            raise faults[len(calls) - 1]
        return real(spec)

    monkeypatch.setattr(backend, "submit_training", submit)
    return calls


def test_train_task_retries_a_transient_fault_in_submit(prefect_harness, local_backend, monkeypatch) -> None:
    backend = local_backend("print('step 1/1 | loss 1.0', flush=True)\n")
    calls = _count_submits(backend, monkeypatch, TransientBackendError("HTTP 503 while submitting"))
    name, result = _train(backend, monkeypatch)
    assert name == "Completed", result
    assert len(calls) == 2
    assert backend.get_job(result["job_id"]).status == JobStatus.COMPLETED


def test_train_task_never_retries_a_failed_training(prefect_harness, local_backend, monkeypatch) -> None:
    backend = local_backend("import sys\nprint('oops', flush=True)\nsys.exit(1)\n")
    calls = _count_submits(backend, monkeypatch)
    name, result = _train(backend, monkeypatch)
    assert name == "Failed"
    assert isinstance(result, JobFailedError) and "exited with code 1" in str(result)
    assert len(calls) == 1
