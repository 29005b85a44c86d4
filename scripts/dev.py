#!/usr/bin/env python3
"""One-command set-up for a fresh clone: creates .venv, installs the pinned stack, then runs something.

    python3 scripts/dev.py run     # install, then run the whole pipeline on the local backend
    python3 scripts/dev.py test    # install, then run the whole test suite
    python3 scripts/dev.py setup   # install only

Needs only Python 3.11+ (prefect 3.9, transformers 5 and trl 1.16 need it). On a Linux machine without an
NVIDIA GPU it installs the CPU build of torch (torch==2.13.0+cpu, from PyTorch's CPU index or a local wheel)
instead of letting a dependency pull the multi-GB CUDA build that PyPI serves for Linux; macOS and Windows
wheels on PyPI are CPU builds already. Set FINETUNE_PHI_TORCH_SPEC to choose another torch requirement (then
no index is added), FINETUNE_PHI_TORCH_INDEX for another torch index, and FINETUNE_PHI_PIP_ARGS for extra
pip arguments.
The install is skipped when pyproject.toml and constraints.txt have not changed since the last one.
`test` also installs Debian's chromium (apt-get, as root) when it is missing, for the browser tests.
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
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
CHROMIUM_NAMES = ("chromium", "chromium-browser")


def _torch_index_args() -> list[str]:
    """Extra pip arguments that make the torch install take a CPU build where PyPI would give a CUDA one.

    PyPI's Linux torch wheels bundle CUDA (several GB). With PyTorch's CPU index added, ``torch==2.13.0`` resolves
    to ``2.13.0+cpu`` (a local version sorts above the plain one); a local ``+cpu`` wheel in pip's find-links
    wins the same way, so an offline machine with the wheel on disk only pays pip's retries on the index.
    """
    if "FINETUNE_PHI_TORCH_INDEX" in os.environ:
        index = os.environ["FINETUNE_PHI_TORCH_INDEX"]
        return ["--extra-index-url", index] if index else []
    if "FINETUNE_PHI_TORCH_SPEC" in os.environ or not sys.platform.startswith("linux"):
        return []
    if shutil.which("nvidia-smi") is not None:
        return []  # a GPU machine: PyPI's CUDA build is the one wanted
    return ["--extra-index-url", CPU_TORCH_INDEX]


def _run(*args: str | Path, env: dict[str, str] | None = None) -> None:
    print("+", " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], check=True, cwd=ROOT, env=env)


def _install_fingerprint() -> str:
    digest = hashlib.sha256(" ".join([TORCH_SPEC, *_torch_index_args()]).encode())
    for name in ("pyproject.toml", "constraints.txt"):
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def setup() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - this script runs on the bare system Python
        sys.exit(
            f"finetune-phi needs Python 3.11 or newer (prefect 3.9, transformers 5 and trl 1.16 need it); this is "
            f"{sys.version.split()[0]}. Run this script with a newer interpreter, e.g. `python3.11 scripts/dev.py`"
        )
    if not PYTHON.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    fingerprint = _install_fingerprint()
    if STAMP.exists() and STAMP.read_text().strip() == fingerprint:
        return
    extra_args = os.environ.get("FINETUNE_PHI_PIP_ARGS", "").split()
    pip = [PYTHON, "-m", "pip", "install", "--disable-pip-version-check", *extra_args]
    # torch first, on its own: its CPU build on a machine without a GPU, so nothing later pulls the CUDA build.
    # --no-deps where an index is added: torch's own dependencies then come with the project's install below,
    # pinned by constraints.txt, and pip does not look each of them up on the torch index too.
    index_args = _torch_index_args()
    _run(*pip, *index_args, *(["--no-deps"] if index_args else []), TORCH_SPEC)
    _run(*pip, "-c", "constraints.txt", "-e", ".[dev]")
    STAMP.write_text(fingerprint + "\n")


def _chromium() -> str | None:
    """The Chromium the browser tests drive (tests/browser/conftest.py looks for the same names)."""
    if os.environ.get("FINETUNE_PHI_CHROMIUM"):
        return os.environ["FINETUNE_PHI_CHROMIUM"]
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


def ensure_chromium() -> bool:
    """Install Debian's ``chromium`` for the browser tests when it is missing; True when one is there afterwards.

    Playwright drives this system browser (a browser download is not possible everywhere these tests run). Says
    nothing when Chromium is already installed; where it cannot install one (not Debian/Ubuntu, not root, no
    network) it says why in one line, and the browser tests are skipped with the same reason.
    """
    if _chromium() is not None:
        return True
    if not sys.platform.startswith("linux") or shutil.which("apt-get") is None:
        print("no Chromium and no apt-get here: the browser tests (tests/browser) will be skipped", flush=True)
        return False
    if os.geteuid() != 0:
        print(
            "no Chromium, and installing one needs root: run `sudo apt-get install chromium` (the browser tests "
            "in tests/browser are skipped until then)",
            flush=True,
        )
        return False
    print("installing Chromium for the browser tests: apt-get install chromium", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            reason = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            print(f"`{' '.join(command)}` failed ({reason[0]}): the browser tests will be skipped", flush=True)
            return False
    return _chromium() is not None


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _workers(pytest_args: list[str]) -> list[str]:
    """Two pytest-xdist workers, each taking a whole test file at a time (the flow files together: tests/conftest.py's
    pytest_xdist_make_scheduler), unless the command line chooses its own (``-n``, ``--dist``, ``-p no:xdist``).
    Much of the suite's time is spent waiting on servers, probes and timeouts, so two workers help on 2 cores."""
    chosen = any(arg.startswith(("-n", "--numprocesses", "--dist")) or arg == "no:xdist" for arg in pytest_args)
    return [] if chosen else ["-n", "2", "--dist", "loadfile"]


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "test"
    rest = argv[1:]
    setup()
    if command == "setup":
        return 0
    if command == "test":
        ensure_chromium()
        # Tests never touch the hub: everything they load is made or shipped by the project.
        env = _env() | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        return subprocess.run([str(PYTHON), "-m", "pytest", *_workers(rest), *rest], cwd=ROOT, env=env).returncode
    if command == "run":
        return subprocess.run([str(BIN / "finetune-phi"), "run", *rest], cwd=ROOT, env=_env()).returncode
    if command == "lint":
        ruff = shutil.which("ruff", path=str(BIN)) or "ruff"
        code = subprocess.run([ruff, "check", "."], cwd=ROOT).returncode
        return code or subprocess.run([ruff, "format", "--check", "."], cwd=ROOT).returncode
    sys.exit(f"unknown command {command!r}: use run, test, setup or lint")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
