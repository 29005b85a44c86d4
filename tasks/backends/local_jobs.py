"""Local training jobs: ``training/sft.py`` as a subprocess in its own process group, one folder per job.

A job lives in ``<jobs_root>/<job_id>/``:

    job.json        the record: status, pid, exit code, command, timestamps (written atomically)
    train.log       everything the script prints (stdout and stderr, line by line)
    exit_code       written by the launcher when the script ends (so a restarted flow still learns the result)
    outputs/        the script's --output_dir: checkpoints, model/, metrics.json, loss_curve.png

The script runs from ``training/`` as its working directory (like the code snapshot of a command job) in its own
process group, so cancelling kills the script and anything it started. A small ``sh`` launcher records the exit
code; ``python sft.py ...`` itself is the exact command line the Azure ML backend submits, with MLflow's tracking
URI and experiment passed through the environment as Azure ML does.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import os
import shlex
import signal
import subprocess
import sys
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tasks.backends.base import (
    USAGE_ERROR_EXIT_CODE,
    BackendError,
    JobFailedError,
    JobInfo,
    JobStatus,
    TrainingJobSpec,
)
from tasks.backends.training_job import TRAINING_DIR, job_identity, training_args
from tasks.logs import LogFollower, read_lines_since, run_logger
from tasks.polling import PollTimeout, every, poll_until
from tasks.process_groups import pid_alive, stop_group
from tasks.state import atomic_write_json, read_json

LOG_NAME = "train.log"
RECORD_NAME = "job.json"
EXIT_CODE_NAME = "exit_code"
OUTPUT_NAME = "outputs"
FAILURE_TAIL_LINES = 50
_LOG = logging.getLogger("finetune_phi.local")
# Launches of one local job (the first run plus restarts after a kill, a failure or a cancel) before submit gives up:
# a job that keeps failing on the same inputs needs a person, not another try.
MAX_JOB_ATTEMPTS = 5


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def training_argv(spec: TrainingJobSpec, output_dir: Path, training_dir: Path = TRAINING_DIR) -> list[str]:
    """``python sft.py --config recipes/X.yaml ...``: the Azure ML command line with local paths filled in."""
    return [
        sys.executable,
        *training_args(
            spec,
            train_file=str(Path(spec.train_file).resolve()),
            eval_file=str(Path(spec.eval_file).resolve()),
            output_dir=str(output_dir.resolve()),
            training_dir=training_dir,
        ),
    ]


def training_job_id(spec: TrainingJobSpec, training_dir: Path = TRAINING_DIR) -> str:
    """``train-<12 hex>``: :func:`~tasks.backends.training_job.job_identity` with the local data paths and the
    MLflow store the job logs to, the identity the Azure ML backend names its jobs with too."""
    data = (str(Path(spec.train_file).resolve()), str(Path(spec.eval_file).resolve()))
    identity = job_identity(
        spec, data=data, target={"tracking_uri": spec.tracking_uri or ""}, training_dir=training_dir
    )
    return f"train-{identity}"


def last_checkpoint(output_dir: Path) -> Path | None:
    """The ``checkpoint-N`` folder with the highest N in ``output_dir`` (where ``sft.py`` resumes), if any."""
    steps = {
        int(p.name.rsplit("-", 1)[1]): p
        for p in Path(output_dir).glob("checkpoint-*")
        if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit()
    }
    return steps[max(steps)] if steps else None


def _is_launcher(pid: int, folder: Path) -> bool:
    """False when ``pid`` now belongs to another program: pids are reused after a reboot or a container restart, and
    a stale record must neither keep a flow waiting nor let cancel kill a stranger. The job's launcher names the
    job folder's exit-code file on its command line."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc to ask (or the process just ended): trust the pid, the next poll settles it
    return str((folder / EXIT_CODE_NAME).resolve()).encode() in cmdline


def exit_reason(exit_code: int | None) -> str:
    """How a job's process ended, in words: a negative code is a signal (Popen's convention), e.g. the OOM killer."""
    if exit_code is None:
        return "was killed (no exit code recorded)"
    if exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        return f"was killed by {name} (exit code {exit_code}; SIGKILL is often the out-of-memory killer)"
    return f"exited with code {exit_code}"


def read_text_or_none(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


class LocalJobRunner:
    """Starts, tracks and cancels training jobs under ``jobs_root``; the record on disk is the source of truth."""

    def __init__(
        self,
        jobs_root: Path,
        *,
        training_dir: Path = TRAINING_DIR,
        grace_s: float = 10.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.jobs_root = Path(jobs_root)
        self.training_dir = Path(training_dir)
        self.grace_s = grace_s  # SIGTERM, then SIGKILL after this many seconds
        self.extra_env = dict(env or {})
        self._procs: dict[str, subprocess.Popen[bytes]] = {}  # reaped here so they never linger as zombies

    # ------------------------------------------------------------------ paths and records
    def job_dir(self, job_id: str) -> Path:
        return self.jobs_root / job_id

    def exists(self, job_id: str) -> bool:
        return (self.job_dir(job_id) / RECORD_NAME).is_file()

    def attempts(self, job_id: str) -> int:
        """How many times the job's command has been launched (1 for a job never restarted)."""
        return int(self._record(job_id).get("attempt", 0))

    def _record(self, job_id: str) -> dict[str, Any]:
        record = read_json(self.job_dir(job_id) / RECORD_NAME)
        if record is None:
            raise BackendError(f"no local training job {job_id!r} under {self.jobs_root}; check the job id")
        return record

    def _save(self, record: dict[str, Any]) -> None:
        atomic_write_json(self.job_dir(record["job_id"]) / RECORD_NAME, record)

    def _info(self, record: dict[str, Any]) -> JobInfo:
        return JobInfo(
            job_id=record["job_id"],
            status=JobStatus(record["status"]),
            exit_code=record.get("exit_code"),
            error=record.get("error"),
            url=record.get("log_path"),
            output_dir=Path(record["output_dir"]),
        )

    # ------------------------------------------------------------------ submit / restart
    def submit(self, spec: TrainingJobSpec, job_id: str | None = None) -> JobInfo:
        """Start the job and return at once (status ``running``)."""
        job_id = job_id or f"job-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        folder = self.job_dir(job_id)
        if (folder / RECORD_NAME).exists():
            raise BackendError(f"job {job_id} already exists in {folder}; use restart() or a new job id")
        folder.mkdir(parents=True, exist_ok=True)
        output_dir = folder / OUTPUT_NAME
        env = dict(self.extra_env)
        if spec.tracking_uri:
            env["MLFLOW_TRACKING_URI"] = spec.tracking_uri
            env["MLFLOW_EXPERIMENT_NAME"] = spec.experiment
        record: dict[str, Any] = {
            "job_id": job_id,
            "status": JobStatus.QUEUED.value,
            "command": training_argv(spec, output_dir, self.training_dir),
            "cwd": str(self.training_dir.resolve()),
            "env": env,  # only what the job adds to the parent's environment (URIs and names, never secrets)
            "tracking_uri_set": bool(spec.tracking_uri),
            "output_dir": str(output_dir.resolve()),
            "log_path": str((folder / LOG_NAME).resolve()),
            "pid": None,
            "exit_code": None,
            "error": None,
            "attempt": 0,
            "created_at": _now(),
            "started_at": None,
            "finished_at": None,
            "spec": {
                "recipe": str(spec.recipe),
                "train_file": str(spec.train_file),
                "eval_file": str(spec.eval_file),
                "manifest_sha256": spec.manifest_sha256,
                "overrides": {k: str(v) for k, v in spec.overrides.items()},
                "experiment": spec.experiment,
            },
        }
        self._save(record)
        return self._launch(record)

    def restart(self, job_id: str) -> JobInfo:
        """Run a finished, failed or killed job's command again in the same folder: the script resumes from its
        last checkpoint."""
        record = self._record(job_id)
        if self.get(job_id).status == JobStatus.RUNNING:
            raise BackendError(f"job {job_id} is still running; cancel it before restarting it")
        record = self._record(job_id)
        record.update({"exit_code": None, "error": None, "finished_at": None, "cancel_requested": False})
        return self._launch(record)

    def _launch(self, record: dict[str, Any]) -> JobInfo:
        folder = self.job_dir(record["job_id"])
        with contextlib.suppress(FileNotFoundError):
            (folder / EXIT_CODE_NAME).unlink()
        command = shlex.join(record["command"])
        exit_file = shlex.quote(str((folder / EXIT_CODE_NAME).resolve()))
        # The launcher writes the exit code atomically, so a flow that restarts later still learns the result.
        launcher = f'{command}; code=$?; echo "$code" > {exit_file}.tmp && mv {exit_file}.tmp {exit_file}; exit $code'
        env = {**os.environ, **record.get("env", {}), "PYTHONUNBUFFERED": "1"}
        if not record.get("tracking_uri_set"):
            env.pop("MLFLOW_TRACKING_URI", None)  # no tracking URI for this job: the script skips MLflow
        record["attempt"] = int(record.get("attempt", 0)) + 1
        with open(folder / LOG_NAME, "ab") as log:
            log.write(f"[finetune-phi] attempt {record['attempt']} at {_now()}: {command}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(
                    ["/bin/sh", "-c", launcher],
                    cwd=record["cwd"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: cancel kills the whole tree
                )
            except OSError as exc:
                record.update({"status": JobStatus.FAILED.value, "error": f"could not start the job: {exc}"})
                record["finished_at"] = _now()
                self._save(record)
                raise BackendError(f"could not start training job {record['job_id']}: {exc}") from exc
        self._procs[record["job_id"]] = proc
        record.update({"status": JobStatus.RUNNING.value, "pid": proc.pid, "started_at": _now()})
        self._save(record)
        return self._info(record)

    # ------------------------------------------------------------------ status
    def get(self, job_id: str) -> JobInfo:
        """The job's status; a job whose process has ended is settled here (exit code, error with the log tail)."""
        record = self._record(job_id)
        if JobStatus(record["status"]).is_terminal or record.get("pid") is None:
            return self._info(record)
        proc = self._procs.get(job_id)
        if proc is not None:
            proc.poll()  # reap our own child
        if pid_alive(int(record["pid"])) and _is_launcher(int(record["pid"]), self.job_dir(job_id)):
            return self._info(record)
        code_text = read_text_or_none(self.job_dir(job_id) / EXIT_CODE_NAME)
        exit_code = int(code_text) if code_text and code_text.strip().lstrip("-").isdigit() else None
        if exit_code is None and proc is not None and proc.returncode is not None:
            exit_code = proc.returncode
        record["exit_code"] = exit_code
        record["finished_at"] = _now()
        if record.get("cancel_requested"):
            record["status"] = JobStatus.CANCELED.value
            record["error"] = "canceled"
        elif exit_code == 0:
            record["status"] = JobStatus.COMPLETED.value
        else:
            record["status"] = JobStatus.FAILED.value
            why = exit_reason(exit_code)
            tail = "\n".join(self.log_tail(job_id, FAILURE_TAIL_LINES))
            record["error"] = (
                f"training job {job_id} {why}; its log is {record['log_path']}; last {FAILURE_TAIL_LINES} lines:\n"
                f"{tail}"
            )
        self._save(record)
        self._procs.pop(job_id, None)
        return self._info(record)

    def log_tail(self, job_id: str, lines: int = 50) -> list[str]:
        path = self.job_dir(job_id) / LOG_NAME
        if not path.exists():
            return []
        with open(path, encoding="utf-8", errors="replace") as handle:
            return [line.rstrip("\n") for line in deque(handle, maxlen=lines)]

    def log_since(self, job_id: str, offset: int) -> tuple[list[str], int]:
        """The complete log lines after byte ``offset`` and the offset to ask from next time."""
        return read_lines_since(self.job_dir(job_id) / LOG_NAME, offset)

    def list_jobs(self) -> list[JobInfo]:
        if not self.jobs_root.is_dir():
            return []
        ids = sorted(p.parent.name for p in self.jobs_root.glob(f"*/{RECORD_NAME}"))
        return [self.get(job_id) for job_id in ids]

    # ------------------------------------------------------------------ cancel
    def cancel(self, job_id: str) -> JobInfo:
        """SIGTERM the job's process group, SIGKILL it after ``grace_s``; the job ends ``canceled``."""
        info = self.get(job_id)
        if info.status.is_terminal:
            return info
        record = self._record(job_id)
        record["cancel_requested"] = True
        self._save(record)
        pgid = int(record["pid"])  # start_new_session: the launcher leads its own group
        stop_group(pgid, self.grace_s, reap=lambda: self._reap(job_id))
        self._reap(job_id)
        with open(self.job_dir(job_id) / LOG_NAME, "a", encoding="utf-8") as log:
            log.write(f"[finetune-phi] canceled at {_now()}\n")
        return self.get(job_id)

    def _reap(self, job_id: str) -> None:
        proc = self._procs.get(job_id)
        if proc is not None:
            proc.poll()

    # ------------------------------------------------------------------ wait
    def wait(
        self,
        job_id: str,
        *,
        timeout_s: float,
        poll_interval_s: float = 2.0,
        on_lines: Callable[[list[str]], None] | None = None,
    ) -> JobInfo:
        """Poll until the job ends, handing new log lines to ``on_lines``; cancel it when ``timeout_s`` passes.

        Returns the completed job; raises :class:`JobFailedError` when it failed, was canceled or timed out.
        """
        follower = LogFollower(self.job_dir(job_id) / LOG_NAME)

        def read() -> JobInfo:
            info = self.get(job_id)
            fresh = follower.read_new() if on_lines is not None else []
            if fresh and on_lines is not None:
                on_lines(fresh)
            return info

        try:
            info = poll_until(
                read, lambda info: info.status.is_terminal, timeout_s=timeout_s, schedule=every(poll_interval_s)
            )
        except PollTimeout:
            self.cancel(job_id)
            raise JobFailedError(
                f"training job {job_id} did not finish within {timeout_s:.0f} s and was canceled; raise "
                "training.timeout_s or use a smaller recipe"
            ) from None
        if info.status == JobStatus.CANCELED:
            raise JobFailedError(f"training job {job_id} was canceled")
        if info.status == JobStatus.FAILED:
            raise JobFailedError(info.error or f"training job {job_id} failed")
        return info


def _logger() -> Any:
    """Prefect's run logger inside a flow or task run (so the decision shows in the UI), else the module's logger."""
    return run_logger(_LOG)


@contextlib.contextmanager
def _job_lock(jobs_root: Path, job_id: str) -> Iterator[None]:
    """One submitter at a time per job id, so two flow runs with the same inputs never start two processes."""
    jobs_root.mkdir(parents=True, exist_ok=True)
    with open(jobs_root / f".{job_id}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def submit_or_resume(runner: LocalJobRunner, spec: TrainingJobSpec, max_attempts: int = MAX_JOB_ATTEMPTS) -> JobInfo:
    """The job for these inputs (id from :func:`training_job_id`), started only when needed.

    - no such job: submit it under that id;
    - running (its process is alive, e.g. left by a flow that was killed): return it, the flow waits for it;
    - completed with its output folder there: return it, its model is reused;
    - failed, killed (kill -9, out of memory), canceled, or never launched: run the same command again in the same
      folder (:meth:`LocalJobRunner.restart`), so ``sft.py`` resumes from its last checkpoint; after
      ``max_attempts`` launches raise a :class:`BackendError` naming the log instead.
    """
    log = _logger()
    job_id = training_job_id(spec, runner.training_dir)
    if spec.fresh:
        # A forced re-train gets a folder of its own: the job for these inputs (and its checkpoints) stays as it was.
        job_id = f"{job_id}-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}"
        info = runner.submit(spec, job_id=job_id)
        log.info("training job %s: refresh asked, started a fresh job (log: %s)", job_id, info.url)
        return info
    with _job_lock(runner.jobs_root, job_id):
        if not runner.exists(job_id):
            info = runner.submit(spec, job_id=job_id)
            log.info("training job %s: new inputs, started attempt 1 (log: %s)", job_id, info.url)
            return info
        info = runner.get(job_id)
        attempt = runner.attempts(job_id)
        output_dir = Path(info.output_dir) if info.output_dir else runner.job_dir(job_id) / "outputs"
        if info.status == JobStatus.RUNNING:
            log.info(
                "training job %s with these inputs is already running (attempt %d): waiting for it instead of "
                "starting a second one (log: %s)",
                job_id,
                attempt,
                info.url,
            )
            return info
        if info.status == JobStatus.COMPLETED and output_dir.is_dir():
            log.info(
                "training job %s with these inputs already completed: reusing its outputs in %s", job_id, output_dir
            )
            return info
        if info.status == JobStatus.COMPLETED:
            why = f"completed but its output folder {output_dir} is gone"
        elif info.status == JobStatus.QUEUED:
            why = "was recorded but never launched"
        elif info.status == JobStatus.CANCELED:
            why = "was canceled"
        else:
            why = exit_reason(info.exit_code)
        if info.status == JobStatus.FAILED and info.exit_code == USAGE_ERROR_EXIT_CODE:
            raise JobFailedError(
                f"training job {job_id} refused its arguments (exit code {USAGE_ERROR_EXIT_CODE}, a usage error: "
                f"the same on every attempt, so it is not restarted); read its log {info.url}, fix the recipe or "
                f"the overrides, or delete {runner.job_dir(job_id)} to run these inputs again"
            )
        if attempt >= max_attempts:
            raise BackendError(
                f"training job {job_id} ended without a model on all {attempt} attempts (last: {why}); read its log "
                f"{info.url}, fix the cause, then delete {runner.job_dir(job_id)} to train these inputs afresh"
            )
        checkpoint = last_checkpoint(output_dir)
        restarted = runner.restart(job_id)
        log.warning(
            "training job %s with these inputs %s on attempt %d: restarted it as attempt %d in the same folder, "
            "resuming from %s (log: %s)",
            job_id,
            why,
            attempt,
            attempt + 1,
            checkpoint.name if checkpoint else "the start (no checkpoint yet)",
            restarted.url,
        )
        return restarted


__all__ = [
    "MAX_JOB_ATTEMPTS",
    "LocalJobRunner",
    "exit_reason",
    "last_checkpoint",
    "submit_or_resume",
    "training_argv",
    "training_job_id",
]
