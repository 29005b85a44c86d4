"""The local state folder and the file-writing rules every step follows.

Everything the local backend keeps lives under one folder (``.finetune-phi/`` by default):

    data/<manifest-hash>/      train.jsonl, test.jsonl, manifest.json
    jobs/<job-id>/             job.json, the job's log, its output folder (model, metrics.json, checkpoints)
    mlflow/mlflow.db           the MLflow tracking store and model registry (SQLite); artifacts beside it
    endpoint/                  the endpoint server's state: deployments, traffic, keys (0600), PID, log
    prefect/                   PREFECT_HOME
    promptflow/                PF_HOME_DIRECTORY, and the file keyring for connections
    hf/                        HF_HOME

Files are written to a temporary name in the same folder and renamed, so a crash never leaves a
half-written file and the previous version stays until the new one is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any


@dataclass(frozen=True)
class StatePaths:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    @property
    def mlflow(self) -> Path:
        return self.root / "mlflow"

    @property
    def mlflow_tracking_uri(self) -> str:
        return f"sqlite:///{(self.mlflow / 'mlflow.db').resolve()}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.mlflow / "artifacts"

    @property
    def endpoint(self) -> Path:
        return self.root / "endpoint"

    @property
    def prefect(self) -> Path:
        return self.root / "prefect"

    @property
    def promptflow(self) -> Path:
        return self.root / "promptflow"

    @property
    def hf(self) -> Path:
        return self.root / "hf"

    def ensure(self) -> StatePaths:
        for folder in (self.root, self.data, self.jobs, self.mlflow, self.endpoint, self.prefect, self.promptflow):
            folder.mkdir(parents=True, exist_ok=True)
        return self


def state_paths(state_dir: str | Path) -> StatePaths:
    return StatePaths(Path(state_dir).expanduser().resolve())


def configure_environment(state_dir: str | Path, *, override: bool = False) -> StatePaths:
    """Point Prefect, Prompt flow, Hugging Face and MLflow at the state folder and turn telemetry off.

    Values already in the environment win unless ``override`` is set, so a user's own Prefect server
    (``PREFECT_API_URL``) or MLflow server keeps working.
    """
    paths = state_paths(state_dir).ensure()
    defaults = {
        "PREFECT_HOME": str(paths.prefect),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PF_HOME_DIRECTORY": str(paths.promptflow),
        "PF_DISABLE_TRACING": "true",
        "HF_HOME": str(paths.hf),
        "MLFLOW_TRACKING_URI": paths.mlflow_tracking_uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # keyrings.alt's plain-text file backend: Prompt flow connections work on a headless machine.
        "PYTHON_KEYRING_BACKEND": "keyrings.alt.file.PlaintextKeyring",
        "XDG_DATA_HOME": str(paths.promptflow / "xdg"),
    }
    for name, value in defaults.items():
        if override or name not in os.environ:
            os.environ[name] = value
    return paths


# Read once at import (os.umask can only be read by setting it, which is not thread-safe later on).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", *, permissions: int | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; rename it over ``path`` only if the block succeeds."""
    if mode not in ("w", "wb"):
        raise ValueError("atomic_open writes whole files: mode must be 'w' or 'wb'")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        # mkstemp creates 0600. Without explicit permissions keep the mode of the file being replaced (a 0600
        # key stays 0600), or give a new file the mode a plain open() would.
        if permissions is None:
            try:
                permissions = target.stat().st_mode & 0o777
            except FileNotFoundError:
                permissions = 0o666 & ~_UMASK
        os.chmod(tmp_name, permissions)
        kwargs: dict[str, Any] = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def atomic_write_text(path: str | Path, text: str, *, permissions: int | None = None) -> Path:
    with atomic_open(path, "w", permissions=permissions) as handle:
        handle.write(text)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes, *, permissions: int | None = None) -> Path:
    with atomic_open(path, "wb", permissions=permissions) as handle:
        handle.write(data)
    return Path(path)


def atomic_write_json(path: str | Path, payload: Any, *, permissions: int | None = None) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n", permissions=permissions)


def read_json(path: str | Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_tree(folder: str | Path, pattern: str = "**/*.py") -> str:
    """Content hash of the files under ``folder`` matching ``pattern`` (paths and bytes), for cache keys."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.glob(pattern) if p.is_file() and "__pycache__" not in p.parts):
        digest.update(file.relative_to(folder).as_posix().encode())
        digest.update(b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()
