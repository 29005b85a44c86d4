"""The local backend's training job survives a crash of the flow: one job per set of inputs, found again by the next
flow run. Stand-in training scripts (fast) that checkpoint and resume like ``sft.py``; each test simulates the next
flow process with a fresh :class:`LocalJobRunner` on the same folder (it knows the job only from its files)."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tasks.backends.base import BackendError, JobStatus, TrainingJobSpec
from tasks.backends.local import LocalBackend
from tasks.backends.local_jobs import MAX_JOB_ATTEMPTS, LocalJobRunner, submit_or_resume, training_job_id
from tests.tasks.test_jobs import _live_members, _spec
from tests.tasks.test_jobs import _training_dir as _stand_in_training_dir

REPO_ROOT = Path(__file__).resolve().parents[3]

# Like sft.py: resumes from the highest checkpoint-N in --output_dir, writes one checkpoint per step. It pauses after
# step STANDIN_PAUSE_AT while the file STANDIN_HOLD exists, so a test can act while the job is mid-training.
CHECKPOINTING_SCRIPT = """
import os, sys, time
from pathlib import Path
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
out = Path(args["--output_dir"])
out.mkdir(parents=True, exist_ok=True)
total = int(args.get("--max_steps", "6"))
start = max((int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")), default=0)
if start:
    print(f"resuming from {out / f'checkpoint-{start}'}", flush=True)
with open(out / "starts", "a") as handle:
    handle.write(f"{os.getpid()}\\n")
for step in range(start + 1, total + 1):
    time.sleep(0.02)
    (out / f"checkpoint-{step}").mkdir()
    print(f"step {step}/{total}", flush=True)
    while step == int(os.environ.get("STANDIN_PAUSE_AT", "0")) and os.path.exists(os.environ["STANDIN_HOLD"]):
        time.sleep(0.02)
(out / "metrics.json").write_text("{}")
"""


def _training_dir(tmp_path: Path, body: str = CHECKPOINTING_SCRIPT) -> Path:
    return _stand_in_training_dir(tmp_path, body, recipe_text="max_steps: 6\n")


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Runners:
    """Fresh runners on one jobs folder (each one a new flow process); at the end it kills whatever still runs."""

    def __init__(self, tmp_path: Path, training: Path, hold: Path) -> None:
        self.jobs = tmp_path / "jobs"
        self.training = training
        self.env = {"STANDIN_HOLD": str(hold)}
        self.made: list[LocalJobRunner] = []

    def fresh(self, **env: str) -> LocalJobRunner:
        runner = LocalJobRunner(self.jobs, training_dir=self.training, grace_s=2.0, env={**self.env, **env})
        self.made.append(runner)
        return runner

    def stop_all(self) -> None:
        if not self.jobs.is_dir():
            return
        runner = self.fresh()
        for job in runner.list_jobs():
            if job.status == JobStatus.RUNNING:
                runner.cancel(job.job_id)
        for made in self.made:
            for proc in made._procs.values():
                proc.poll()  # reap our children so none lingers as a zombie


@pytest.fixture()
def hold(tmp_path: Path) -> Path:
    return tmp_path / "hold"


@pytest.fixture()
def runners(tmp_path: Path, hold: Path) -> Iterator[Runners]:
    made = Runners(tmp_path, _training_dir(tmp_path), hold)
    yield made
    made.stop_all()


def _log(runner: LocalJobRunner, job_id: str) -> str:
    return (runner.job_dir(job_id) / "train.log").read_text()


def test_same_inputs_while_running_give_the_same_job_and_one_process_then_the_completed_job_is_reused(
    runners: Runners, hold: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="finetune_phi.local")
    hold.touch()
    first = runners.fresh(STANDIN_PAUSE_AT="2")
    job = submit_or_resume(first, _spec(runners.training))
    assert job.job_id == training_job_id(_spec(runners.training), runners.training)
    assert job.job_id.startswith("train-") and job.status == JobStatus.RUNNING
    _wait_for(lambda: "step 2/6" in _log(first, job.job_id), "step 2")
    pid = first._record(job.job_id)["pid"]

    # The flow was killed; its job was not (own process group). The next flow run finds it and waits for it.
    second = runners.fresh(STANDIN_PAUSE_AT="2")
    again = submit_or_resume(second, _spec(runners.training))
    assert again.job_id == job.job_id and again.status == JobStatus.RUNNING
    assert second._record(job.job_id)["pid"] == pid and second.attempts(job.job_id) == 1
    assert "already running (attempt 1): waiting for it" in caplog.text
    hold.unlink()
    done = second.wait(job.job_id, timeout_s=30, poll_interval_s=0.05)
    assert done.status == JobStatus.COMPLETED and done.exit_code == 0
    starts = Path(done.output_dir) / "starts"
    assert len(starts.read_text().split()) == 1  # one training process in all

    # Completed: returned as is, no new process, the same outputs.
    third = runners.fresh()
    reused = submit_or_resume(third, _spec(runners.training))
    assert reused.job_id == job.job_id and reused.status == JobStatus.COMPLETED
    assert reused.output_dir == done.output_dir and len(starts.read_text().split()) == 1
    assert third.attempts(job.job_id) == 1 and "attempt 2" not in _log(third, job.job_id)
    assert "already completed: reusing its outputs" in caplog.text
    assert [j.job_id for j in third.list_jobs()] == [job.job_id]

    # refresh=["training"]: a fresh job in a folder of its own, from scratch; the completed one is left as it was.
    forced = submit_or_resume(runners.fresh(), dataclasses.replace(_spec(runners.training), fresh=True))
    assert forced.job_id.startswith(f"{job.job_id}-") and forced.output_dir != done.output_dir
    assert third.wait(forced.job_id, timeout_s=30, poll_interval_s=0.05).status == JobStatus.COMPLETED
    assert "resuming" not in _log(third, forced.job_id) and len(starts.read_text().split()) == 1
    assert "refresh asked, started a fresh job" in caplog.text


def test_after_a_kill_9_of_the_job_the_next_submit_resumes_it_from_its_last_checkpoint(
    runners: Runners, hold: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="finetune_phi.local")
    hold.touch()
    first = runners.fresh(STANDIN_PAUSE_AT="3")
    job = submit_or_resume(first, _spec(runners.training))
    _wait_for(lambda: "step 3/6" in _log(first, job.job_id), "step 3")
    pgid = first._record(job.job_id)["pid"]
    os.killpg(pgid, signal.SIGKILL)  # the flow and the job die together, as with kill -9 or the OOM killer
    _wait_for(lambda: _live_members(pgid) == [], "the killed group to go")
    first._procs[job.job_id].wait()  # the dead flow's child is reaped (by init, for a real crash)

    second = runners.fresh(STANDIN_PAUSE_AT="3")  # the next flow run
    resumed = submit_or_resume(second, _spec(runners.training))
    assert resumed.job_id == job.job_id and resumed.status == JobStatus.RUNNING
    assert second.attempts(job.job_id) == 2
    assert "was killed (no exit code recorded) on attempt 1: restarted it as attempt 2" in caplog.text
    assert "resuming from checkpoint-3" in caplog.text
    done = second.wait(job.job_id, timeout_s=30, poll_interval_s=0.05)
    assert done.status == JobStatus.COMPLETED and done.output_dir == Path(job.output_dir)
    log = _log(second, job.job_id)
    before, after = log.split("[finetune-phi] attempt 2", 1)
    assert "step 3/6" in before and "step 4/6" not in before
    assert f"resuming from {Path(job.output_dir) / 'checkpoint-3'}" in after
    assert "step 1/6" not in after and "step 3/6" not in after and "step 6/6" in after  # no step ran twice


def test_a_record_whose_pid_now_belongs_to_another_program_is_restarted_not_waited_for(
    runners: Runners, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="finetune_phi.local")
    first = runners.fresh()
    job = submit_or_resume(first, _spec(runners.training))
    assert first.wait(job.job_id, timeout_s=30, poll_interval_s=0.05).status == JobStatus.COMPLETED
    # The machine rebooted mid-training: the record still says running, and its pid is now someone else's.
    stranger = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        record = first._record(job.job_id)
        record.update({"status": "running", "pid": stranger.pid, "exit_code": None, "finished_at": None})
        first._save(record)
        # As if it died after step 5, before it wrote an exit code.
        shutil.rmtree(Path(job.output_dir) / "checkpoint-6")
        (first.job_dir(job.job_id) / "exit_code").unlink()
        resumed = submit_or_resume(runners.fresh(), _spec(runners.training))
        assert resumed.status == JobStatus.RUNNING and runners.made[-1].attempts(job.job_id) == 2
        assert "restarted it as attempt 2" in caplog.text and "resuming from checkpoint-5" in caplog.text
        assert stranger.poll() is None  # the stranger was left alone
        done = runners.made[-1].wait(job.job_id, timeout_s=30, poll_interval_s=0.05)
        assert done.status == JobStatus.COMPLETED
    finally:
        stranger.kill()
        stranger.wait()


def test_a_canceled_job_is_restarted_and_a_job_failing_every_time_stops_after_the_bounded_attempts(
    tmp_path: Path, runners: Runners, hold: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="finetune_phi.local")
    hold.touch()
    runner = runners.fresh(STANDIN_PAUSE_AT="1")
    job = submit_or_resume(runner, _spec(runners.training))
    _wait_for(lambda: "step 1/6" in _log(runner, job.job_id), "step 1")
    assert runner.cancel(job.job_id).status == JobStatus.CANCELED
    again = submit_or_resume(runners.fresh(STANDIN_PAUSE_AT="1"), _spec(runners.training))
    assert again.job_id == job.job_id and again.status == JobStatus.RUNNING and runner.attempts(job.job_id) == 2
    assert "was canceled on attempt 1: restarted it as attempt 2" in caplog.text
    assert "resuming from checkpoint-1" in caplog.text

    failing = _training_dir(tmp_path / "failing", "import sys\nprint('CUDA out of memory', flush=True)\nsys.exit(1)\n")
    runner = LocalJobRunner(tmp_path / "jobs", training_dir=failing)
    spec = _spec(failing)
    for attempt in range(1, MAX_JOB_ATTEMPTS + 1):
        info = submit_or_resume(runner, spec)
        assert runner.attempts(info.job_id) == attempt
        _wait_for(lambda: runner.get(info.job_id).status.is_terminal, f"attempt {attempt} to end")  # noqa: B023
        assert runner.get(info.job_id).status == JobStatus.FAILED
    with pytest.raises(BackendError) as caught:
        submit_or_resume(runner, spec)
    message = str(caught.value)
    assert f"on all {MAX_JOB_ATTEMPTS} attempts (last: exited with code 1)" in message
    assert str(runner.job_dir(info.job_id) / "train.log") in message and "delete" in message
    assert "\n" not in message  # one sentence, not the log
    assert runner.attempts(info.job_id) == MAX_JOB_ATTEMPTS  # nothing launched after the last one


def test_the_job_id_follows_what_the_job_computes(tmp_path: Path) -> None:
    training = _training_dir(tmp_path)
    base = training_job_id(_spec(training, max_steps=5), training)
    assert base == training_job_id(_spec(training, max_steps="5"), training)  # the same command line
    changed = {
        "overrides": training_job_id(_spec(training, max_steps=6), training),
        "manifest": training_job_id(
            TrainingJobSpec(**{**_spec(training, max_steps=5).__dict__, "manifest_sha256": "other"}), training
        ),
        "tracking": training_job_id(
            TrainingJobSpec(**{**_spec(training, max_steps=5).__dict__, "tracking_uri": "sqlite:///x.db"}), training
        ),
    }
    (training / "recipes" / "r.yaml").write_text("max_steps: 7\n")
    changed["recipe"] = training_job_id(_spec(training, max_steps=5), training)
    (training / "sft.py").write_text((training / "sft.py").read_text() + "\n# edited\n")
    changed["code"] = training_job_id(_spec(training, max_steps=5), training)
    assert base not in changed.values() and len(set(changed.values())) == len(changed)


def test_the_local_backend_submits_through_the_job_for_these_inputs(
    tmp_path: Path, runners: Runners, hold: Path
) -> None:
    from tasks.config import load_config

    settings = load_config(REPO_ROOT / "configs" / "local.yaml").model_copy(update={"state_dir": tmp_path / "state"})
    backend = LocalBackend(settings)
    runners.jobs = backend.paths.jobs
    backend._runner = runners.fresh()  # the stand-in training/ instead of the real one
    first = backend.submit_training(_spec(runners.training))
    other = backend.submit_training(_spec(runners.training, max_steps=2))
    assert first.job_id != other.job_id and first.job_id.startswith("train-")
    for job in (first, other):
        assert backend.runner.wait(job.job_id, timeout_s=30, poll_interval_s=0.05).status == JobStatus.COMPLETED
    assert backend.submit_training(_spec(runners.training)).job_id == first.job_id
    assert backend.job_metrics(first.job_id) == {}  # the stand-in's metrics.json, read from the reused job
    assert sorted(j.job_id for j in backend.runner.list_jobs()) == sorted([first.job_id, other.job_id])
