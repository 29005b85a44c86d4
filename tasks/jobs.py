"""Local training jobs: ``training/sft.py`` as a subprocess, with the command line an Azure ML command job runs.

A job lives in ``<jobs_root>/<job_id>/``:

    job.json        the record: status, pid, exit code, command, timestamps (written atomically)
    train.log       everything the script prints (stdout and stderr, line by line)
    exit_code       written by the launcher when the script ends (so a restarted flow still learns the result)
    outputs/        the script's --output_dir: checkpoints, model/, metrics.json, loss_curve.png

The script runs from ``training/`` as its working directory (like the code snapshot of a command job) in its own
process group, so cancelling kills the script and anything it started. A small ``sh`` launcher records the exit
code; ``python sft.py ...`` itself is the exact command line ``tasks/backends/azureml_entities.py`` submits, with
MLflow's tracking URI and experiment passed through the environment as Azure ML does.

The flow submits and waits through any :class:`~tasks.backends.base.Backend` with the Prefect tasks at the end
(:func:`submit_training_job`, :func:`wait_for_training_job`): the wait polls with exponential backoff and jitter,
streams every new log line to Prefect's logger once (:meth:`Backend.job_log_since`, by byte offset), and cancels the
job on every way out that is not the job's own end (timeout, Ctrl-C, a Prefect cancel or task timeout). A failed
training raises :class:`JobFailedError` with the last log lines and is never retried.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import random
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.backends.base import Backend, BackendError, JobFailedError, JobInfo, JobStatus, TrainingJobSpec
from tasks.config import Settings
from tasks.retry import backoff_delay, is_worth_another_try_later, poll_policy
from tasks.state import atomic_write_json, read_json, sha256_file, sha256_text, sha256_tree

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAINING_DIR = REPO_ROOT / "training"
LOG_NAME = "train.log"
RECORD_NAME = "job.json"
EXIT_CODE_NAME = "exit_code"
OUTPUT_NAME = "outputs"
FAILURE_TAIL_LINES = 50
_LOG = logging.getLogger("finetune_phi.jobs")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def run_logger(fallback: logging.Logger = _LOG) -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run (so the lines show in the UI), else ``fallback``."""
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return fallback


def training_argv(spec: TrainingJobSpec, output_dir: Path, training_dir: Path = TRAINING_DIR) -> list[str]:
    """``python sft.py --config recipes/X.yaml ...``: the Azure ML command line with local paths filled in."""
    recipe = spec.recipe if spec.recipe.is_absolute() else REPO_ROOT / spec.recipe
    try:
        recipe_arg = recipe.resolve().relative_to(training_dir.resolve()).as_posix()
    except ValueError:
        raise BackendError(
            f"recipe {spec.recipe} is outside {training_dir}: jobs run from training/ (the code snapshot), "
            "so put the recipe in training/recipes/"
        ) from None
    argv = [
        sys.executable,
        "sft.py",
        "--config",
        recipe_arg,
        "--train_file",
        str(Path(spec.train_file).resolve()),
        "--eval_file",
        str(Path(spec.eval_file).resolve()),
        "--output_dir",
        str(output_dir.resolve()),
        "--manifest_sha256",
        spec.manifest_sha256,
    ]
    for key, value in sorted(spec.overrides.items()):
        argv += [f"--{key}", str(value)]
    return argv


def training_job_id(spec: TrainingJobSpec, training_dir: Path = TRAINING_DIR) -> str:
    """``train-<12 hex>`` from what the job computes: data manifest, recipe (path and bytes), the training code,
    overrides, data paths and where it logs (MLflow URI, experiment).

    The same inputs give the same id, so a flow re-run after a crash finds the job it already started, as
    ``tasks.backends.azureml_entities.job_name`` does on Azure ML. Override values count as the command line
    shows them (``5`` and ``"5"`` are the same job).
    """
    recipe = (spec.recipe if spec.recipe.is_absolute() else REPO_ROOT / spec.recipe).resolve()
    document = {
        "manifest": spec.manifest_sha256,
        "recipe": str(recipe),
        "recipe_sha256": sha256_file(recipe) if recipe.is_file() else "missing",
        "code": sha256_tree(training_dir) if Path(training_dir).is_dir() else "missing",
        "overrides": {str(k): str(v) for k, v in spec.overrides.items()},
        "train_file": str(Path(spec.train_file).resolve()),
        "eval_file": str(Path(spec.eval_file).resolve()),
        "tracking_uri": spec.tracking_uri or "",
        "experiment": spec.experiment,
    }
    return f"train-{sha256_text(json.dumps(document, sort_keys=True))[:12]}"


def last_checkpoint(output_dir: Path) -> Path | None:
    """The ``checkpoint-N`` folder with the highest N in ``output_dir`` (where ``sft.py`` resumes), if any."""
    steps = {
        int(p.name.rsplit("-", 1)[1]): p
        for p in Path(output_dir).glob("checkpoint-*")
        if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit()
    }
    return steps[max(steps)] if steps else None


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone: it has exited and only waits to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    return True


def _is_launcher(pid: int, folder: Path) -> bool:
    """False when ``pid`` now belongs to another program: pids are reused after a reboot or a container restart, and
    a stale record must neither keep a flow waiting nor let cancel kill a stranger. The job's launcher names the
    job folder's exit-code file on its command line."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc to ask (or the process just ended): trust the pid, the next poll settles it
    return str((folder / EXIT_CODE_NAME).resolve()).encode() in cmdline


def stop_process_group(process: subprocess.Popen, grace_s: float) -> None:
    """Stop the process group that ``process`` leads (started with ``start_new_session=True``): SIGTERM, then
    SIGKILL if it is still there after ``grace_s``. For servers and tools run beside a job (tests, benchmarks)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=grace_s)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies still count for killpg; look for a live member of the group.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                return True
    return False


def _exit_reason(exit_code: int | None) -> str:
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
        if _pid_alive(int(record["pid"])) and _is_launcher(int(record["pid"]), self.job_dir(job_id)):
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
            why = _exit_reason(exit_code)
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
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while _group_alive(pgid) and time.monotonic() < deadline:
            self._reap(job_id)
            time.sleep(0.1)
        if _group_alive(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            while _group_alive(pgid):
                self._reap(job_id)
                time.sleep(0.05)
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
        deadline = time.monotonic() + timeout_s
        follower = LogFollower(self.job_dir(job_id) / LOG_NAME)
        while True:
            info = self.get(job_id)
            if on_lines is not None:
                fresh = follower.read_new()
                if fresh:
                    on_lines(fresh)
            if info.status.is_terminal:
                break
            if time.monotonic() > deadline:
                self.cancel(job_id)
                raise JobFailedError(
                    f"training job {job_id} did not finish within {timeout_s:.0f} s and was canceled; raise "
                    "training.timeout_s or use a smaller recipe"
                )
            time.sleep(poll_interval_s)
        if info.status == JobStatus.CANCELED:
            raise JobFailedError(f"training job {job_id} was canceled")
        if info.status == JobStatus.FAILED:
            raise JobFailedError(info.error or f"training job {job_id} failed")
        return info


def split_log_chunk(chunk: bytes, offset: int) -> tuple[list[str], int]:
    """The complete lines of ``chunk`` (the log's bytes from ``offset`` on) and the offset after the last of them.

    A partial last line waits for its newline; tqdm-style bars rewrite one line with carriage returns, so a line
    keeps what it finally said."""
    end = chunk.rfind(b"\n")
    if end < 0:
        return [], offset
    text = chunk[:end].decode("utf-8", "replace")
    return [line.rstrip("\r").split("\r")[-1] for line in text.split("\n")], offset + end + 1


def read_lines_since(path: Path, offset: int) -> tuple[list[str], int]:
    """:func:`split_log_chunk` of a log file from byte ``offset``; a file not written yet has no lines."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            chunk = handle.read()
    except FileNotFoundError:
        return [], offset
    return split_log_chunk(chunk, offset)


class LogFollower:
    """Reads the lines appended to a log file since the last call (a partial last line waits for its newline)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def read_new(self) -> list[str]:
        lines, self.offset = read_lines_since(self.path, self.offset)
        return lines


def read_text_or_none(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


# ------------------------------------------------------------------------------- submit and wait, any backend
@dataclass(frozen=True)
class PollTiming:
    """Where a wait takes its time from: tests pass a fake clock whose ``sleep`` advances it and records the delay."""

    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    rng: random.Random | None = None  # None: the ``random`` module


def _poll_status(backend: Backend, job_id: str, log: logging.Logger | logging.LoggerAdapter) -> JobInfo | None:
    """The job's status, or None after a transient fault (also one that outlasted the backend's own retries): a
    missed poll, retried by the next one. The wait's deadline, not an outage, decides when to give up on a job."""
    try:
        return backend.get_job(job_id)
    except Exception as exc:
        if not is_worth_another_try_later(exc):
            raise
        log.warning("could not read the status of training job %s for now (%s: %s)", job_id, type(exc).__name__, exc)
        return None


def _stream_log(backend: Backend, job_id: str, offset: int, log: logging.Logger | logging.LoggerAdapter) -> int:
    """Hand every log line written since ``offset`` to ``log`` once; returns the new offset.

    A log that cannot be read this time is no failure of the job: the next poll reads from the same offset."""
    try:
        lines, offset = backend.job_log_since(job_id, offset)
    except Exception as exc:
        log.debug("could not read the log of training job %s (%s: %s)", job_id, type(exc).__name__, exc)
        return offset
    for line in lines:
        if line.strip():
            log.info("[%s] %s", job_id, line)
    return offset


def _poll_until_terminal(backend: Backend, job_id: str, settings: Settings, timing: PollTiming) -> JobInfo:
    """Poll until the job reaches a terminal status; raise :class:`JobFailedError` at ``training.timeout_s``.

    The interval grows from ``training.poll_interval_s`` to a cap with jitter (:func:`tasks.retry.poll_policy`),
    and starts again from the bottom when the status changes, so a job that just started running is looked at soon.
    """
    log = run_logger()
    schedule = poll_policy(settings.training.poll_interval_s, settings.retry)
    deadline = timing.clock() + settings.training.timeout_s
    offset, attempt, last_status = 0, 0, None
    while True:
        job = _poll_status(backend, job_id, log)
        offset = _stream_log(backend, job_id, offset, log)
        if job is not None and job.status.is_terminal:
            return job
        if job is not None and job.status != last_status:
            attempt, last_status = 0, job.status
        remaining = deadline - timing.clock()
        if remaining <= 0:
            raise JobFailedError(
                f"training job {job_id} did not finish within training.timeout_s={settings.training.timeout_s:.0f} s "
                "and was canceled; raise the timeout or use a smaller recipe"
            )
        timing.sleep(min(remaining, backoff_delay(attempt, schedule, timing.rng)))
        attempt += 1


def _cancel_abandoned(backend: Backend, job_id: str, exc: BaseException) -> None:
    """Cancel a job nobody waits for any more: left running it keeps a GPU (and, on Azure ML, the bill) busy."""
    log = run_logger()
    why = "its wait timed out" if isinstance(exc, JobFailedError) else f"the wait stopped ({type(exc).__name__})"
    log.warning("training job %s: %s; canceling the job", job_id, why)
    try:
        backend.cancel_job(job_id)
    except Exception as cancel_exc:
        log.error(
            "could not cancel training job %s (%s: %s); cancel it by hand",
            job_id,
            type(cancel_exc).__name__,
            cancel_exc,
        )


def wait_for_job(backend: Backend, job_id: str, settings: Settings, timing: PollTiming | None = None) -> JobInfo:
    """Wait for the job to end, streaming its log; return it when it completed, raise :class:`JobFailedError` when
    it failed or was canceled.

    Every way out that is not the job's own end cancels it: ``training.timeout_s`` passing, Ctrl-C
    (``KeyboardInterrupt``), a Prefect cancel (``TerminationSignal``), a Prefect task timeout (a ``CancelledError``
    inside the task, a ``TimeoutError`` outside it), or a status poll that failed for good. Transient poll faults
    are only missed polls.
    """
    try:
        job = _poll_until_terminal(backend, job_id, settings, timing or PollTiming())
    except BaseException as exc:
        _cancel_abandoned(backend, job_id, exc)
        raise
    if job.status != JobStatus.COMPLETED:
        raise JobFailedError(f"training job {job_id} ended {job.status.value}: {job.error or 'no reason given'}")
    return job


@task(name="submit-training-job", cache_policy=NO_CACHE, persist_result=False)
def submit_training_job(backend: Backend, spec: TrainingJobSpec) -> JobInfo:
    """Submit the job (or find the one these inputs already have). No retries of its own: the flow's train step
    retries submit and wait together, on transient faults only."""
    info = backend.submit_training(spec)
    get_run_logger().info("training job %s submitted (%s)", info.job_id, info.url or "no URL")
    return info


@task(name="wait-for-training-job", cache_policy=NO_CACHE, persist_result=False)
def wait_for_training_job(
    backend: Backend, job_id: str, settings: Settings, timing: PollTiming | None = None
) -> JobInfo:
    """:func:`wait_for_job` as a task: the polling, the job's log lines and the cancel show under it in Prefect."""
    return wait_for_job(backend, job_id, settings, timing)


__all__ = [
    "LocalJobRunner",
    "LogFollower",
    "PollTiming",
    "last_checkpoint",
    "read_lines_since",
    "run_logger",
    "split_log_chunk",
    "submit_training_job",
    "training_argv",
    "training_job_id",
    "wait_for_job",
    "wait_for_training_job",
]
