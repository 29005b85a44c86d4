"""scripts/dev.py: the README's two commands. What its torch install asks pip for, per machine."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
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


def _recording_run(calls: list[list[str]], returncode: int = 0):
    def run(command, **_):
        calls.append(list(command))
        return subprocess.CompletedProcess(
            command, returncode, stdout="", stderr="E: Unable to locate package chromium"
        )

    return run


def test_chromium_already_there_installs_nothing(dev: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    calls: list[list[str]] = []
    monkeypatch.delenv("FINETUNE_PHI_CHROMIUM", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name, **_: "/usr/bin/chromium" if name == "chromium" else None)
    monkeypatch.setattr(subprocess, "run", _recording_run(calls))
    assert dev.ensure_chromium() is True
    assert calls == [] and capsys.readouterr().out == ""  # quiet when present


def test_missing_chromium_is_installed_with_apt_get_as_root(dev: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    installed: list[str] = []
    monkeypatch.delenv("FINETUNE_PHI_CHROMIUM", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(os, "geteuid", lambda: 0)

    def which(name: str, **_: object) -> str | None:
        if name == "apt-get":
            return "/usr/bin/apt-get"
        return "/usr/bin/chromium" if name == "chromium" and installed else None

    def run(command, **kwargs):
        calls.append(list(command))
        assert kwargs["env"]["DEBIAN_FRONTEND"] == "noninteractive"
        if command[:2] == ["apt-get", "install"]:
            installed.append("chromium")
        return subprocess.CompletedProcess(command, 0, stdout="", stderr="")

    monkeypatch.setattr(shutil, "which", which)
    monkeypatch.setattr(subprocess, "run", run)
    assert dev.ensure_chromium() is True
    assert calls == [["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]]


@pytest.mark.parametrize("situation", ["not root", "no apt-get", "apt-get fails"])
def test_where_chromium_cannot_be_installed_it_says_why(
    dev: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys, situation: str
) -> None:
    calls: list[list[str]] = []
    monkeypatch.delenv("FINETUNE_PHI_CHROMIUM", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(os, "geteuid", lambda: 1000 if situation == "not root" else 0)
    has_apt = situation != "no apt-get"
    monkeypatch.setattr(
        shutil, "which", lambda name, **_: "/usr/bin/apt-get" if name == "apt-get" and has_apt else None
    )
    monkeypatch.setattr(subprocess, "run", _recording_run(calls, returncode=100))
    assert dev.ensure_chromium() is False
    out = capsys.readouterr().out
    assert "browser tests" in out and "skipped" in out
    if situation == "apt-get fails":
        assert "Unable to locate package chromium" in out and len(calls) == 1
    else:
        assert calls == []
