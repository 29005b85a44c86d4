"""scripts/dev.py: the README's two commands. What its torch install asks pip for, per machine."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

DEV_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "dev.py"


@pytest.fixture
def dev(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    for name in ("FINETUNE_PHI_TORCH_SPEC", "FINETUNE_PHI_TORCH_INDEX"):
        monkeypatch.delenv(name, raising=False)
    spec = importlib.util.spec_from_file_location("finetune_phi_dev_script", DEV_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_linux_without_a_gpu_adds_the_cpu_index(dev: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(shutil, "which", lambda name, **_: None)
    assert dev._torch_index_args() == ["--extra-index-url", "https://download.pytorch.org/whl/cpu"]


def test_a_gpu_machine_or_another_os_keeps_pypi(dev: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(shutil, "which", lambda name, **_: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    assert dev._torch_index_args() == []
    monkeypatch.setattr(shutil, "which", lambda name, **_: None)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert dev._torch_index_args() == []


def test_the_user_chooses_the_spec_or_the_index(dev: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(shutil, "which", lambda name, **_: None)
    monkeypatch.setenv("FINETUNE_PHI_TORCH_INDEX", "https://example.invalid/torch")
    assert dev._torch_index_args() == ["--extra-index-url", "https://example.invalid/torch"]
    monkeypatch.setenv("FINETUNE_PHI_TORCH_INDEX", "")
    assert dev._torch_index_args() == []
    monkeypatch.delenv("FINETUNE_PHI_TORCH_INDEX")
    monkeypatch.setenv("FINETUNE_PHI_TORCH_SPEC", "torch==2.9.1")
    assert dev._torch_index_args() == []
