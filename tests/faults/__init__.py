"""Test-only faults for the model server (see ``engine.py`` here)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tests.faults.engine import ENGINE, FAULTS_FILE


def faulty_engines(deployments: list[str]) -> str:
    """A ``FINETUNE_PHI_TEST_ENGINE`` value giving these deployments the engine that honours ``test_faults.json``."""
    return ",".join(f"{name}={ENGINE}" for name in deployments)


def faulty_copy(model_dir: Path, target: Path, **faults: Any) -> Path:
    """A copy of ``model_dir`` at ``target`` with ``test_faults.json`` holding ``faults``."""
    shutil.copytree(model_dir, target)
    (target / FAULTS_FILE).write_text(json.dumps(faults), encoding="utf-8")
    return target
