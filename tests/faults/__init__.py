"""Test-only faults for the model server (see ``sitecustomize.py`` here)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

FOLDER = Path(__file__).resolve().parent


def faulty_engine_path() -> str:
    """A ``PYTHONPATH`` value that makes the server's engine honour ``test_faults.json`` in model folders."""
    return os.pathsep.join(p for p in (str(FOLDER), os.environ.get("PYTHONPATH", "")) if p)


def faulty_copy(model_dir: Path, target: Path, **faults: Any) -> Path:
    """A copy of ``model_dir`` at ``target`` with ``test_faults.json`` holding ``faults``."""
    shutil.copytree(model_dir, target)
    (target / "test_faults.json").write_text(json.dumps(faults), encoding="utf-8")
    return target
