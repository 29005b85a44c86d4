#!/usr/bin/env python3
"""One-command set-up for a fresh clone: creates .venv, installs the pinned stack, then runs something.

    python3 scripts/dev.py run     # install, then run the whole pipeline on the local backend
    python3 scripts/dev.py test    # install, then run the whole test suite
    python3 scripts/dev.py setup   # install only

Needs only Python 3.10+. On a machine without an NVIDIA GPU it installs the CPU build of torch
(torch==2.13.0) instead of letting a dependency pull a multi-GB CUDA build. Set FINETUNE_PHI_TORCH_SPEC
to choose another torch requirement, and FINETUNE_PHI_PIP_ARGS for extra pip arguments (an index URL).
The install is skipped when pyproject.toml and constraints.txt have not changed since the last one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".finetune-phi-installed"
TORCH_SPEC = os.environ.get("FINETUNE_PHI_TORCH_SPEC", "torch==2.13.0")


def _run(*args: str | Path, env: dict[str, str] | None = None) -> None:
    print("+", " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], check=True, cwd=ROOT, env=env)


def _install_fingerprint() -> str:
    digest = hashlib.sha256(TORCH_SPEC.encode())
    for name in ("pyproject.toml", "constraints.txt"):
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def setup() -> None:
    if sys.version_info < (3, 10):  # noqa: UP036 - this script runs on the bare system Python
        sys.exit(f"finetune-phi needs Python 3.10 or newer; this is {sys.version.split()[0]}")
    if not PYTHON.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    fingerprint = _install_fingerprint()
    if STAMP.exists() and STAMP.read_text().strip() == fingerprint:
        return
    extra_args = os.environ.get("FINETUNE_PHI_PIP_ARGS", "").split()
    pip = [PYTHON, "-m", "pip", "install", "--disable-pip-version-check", *extra_args]
    # torch first, on its own: its CPU build here, so nothing later pulls the CUDA build.
    _run(*pip, TORCH_SPEC)
    _run(*pip, "-c", "constraints.txt", "-e", ".[dev]")
    STAMP.write_text(fingerprint + "\n")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "test"
    rest = argv[1:]
    setup()
    if command == "setup":
        return 0
    if command == "test":
        # Tests never touch the hub: everything they load is made or shipped by the project.
        env = _env() | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        return subprocess.run([str(PYTHON), "-m", "pytest", *rest], cwd=ROOT, env=env).returncode
    if command == "run":
        return subprocess.run([str(BIN / "finetune-phi"), "run", *rest], cwd=ROOT, env=_env()).returncode
    if command == "lint":
        ruff = shutil.which("ruff", path=str(BIN)) or "ruff"
        code = subprocess.run([ruff, "check", "."], cwd=ROOT).returncode
        return code or subprocess.run([ruff, "format", "--check", "."], cwd=ROOT).returncode
    sys.exit(f"unknown command {command!r}: use run, test, setup or lint")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
