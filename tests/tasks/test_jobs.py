"""The local job runner with stand-in training scripts (fast): failure with the log tail, cancel of the whole process
group, timeout, a dead pid settled by a fresh runner, the Azure ML command line, and the Prefect tasks."""

from __future__ import annotations

import os
import shlex
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tasks.backends.base import JobFailedError, JobStatus, TrainingJobSpec
from tasks.jobs import LocalJobRunner, LogFollower, training_argv

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


@pytest.mark.slow
def test_prefect_tasks_submit_and_wait_stream_the_log(tmp_path: Path) -> None:
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from tasks.jobs import submit_training_job, wait_for_training_job

    good = _training_dir(tmp_path / "good", "print('step 1/1 | loss 1.0', flush=True)\n")
    bad = _training_dir(tmp_path / "bad", "import sys\nprint('oops', flush=True)\nsys.exit(1)\n")

    @flow
    def train(training: Path) -> str:
        runner = LocalJobRunner(tmp_path / "jobs", training_dir=training)
        job = submit_training_job(runner, _spec(training))
        return wait_for_training_job(runner, job.job_id, timeout_s=60, poll_interval_s=0.1).status.value

    with prefect_test_harness(server_startup_timeout=120):
        assert train(good) == "completed"
        state = train(bad, return_state=True)
        assert state.is_failed()
        with pytest.raises(JobFailedError, match="exited with code 1"):
            state.result()
