"""`finetune-phi run` with a bad config: exit code 2, one message naming the field and the file, nothing created."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
# The venv's console script; `python -m flows.cli` would skip the entry point that a person actually types.
FINETUNE_PHI = Path(sys.executable).with_name("finetune-phi")


def _local_config_with(tmp_path: Path, section: str, key: str, value: Any) -> dict[str, Any]:
    """configs/local.yaml with absolute inputs, its state folder under ``tmp_path``, and one field changed."""
    config = yaml.safe_load((REPO_ROOT / "configs" / "local.yaml").read_text(encoding="utf-8"))
    config["state_dir"] = str(tmp_path / "state")
    config["data"]["path"] = str(REPO_ROOT / config["data"]["path"])
    config["training"]["recipe"] = str(REPO_ROOT / config["training"]["recipe"])
    config[section][key] = value
    return config


def _run_cli(tmp_path: Path, config: dict[str, Any], *flags: str) -> subprocess.CompletedProcess[str]:
    """``finetune-phi run --config bad.yaml FLAGS`` from ``tmp_path/work``, which holds only that file."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "bad.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    # No FINETUNE_PHI__* override from the caller's shell; Prefect's own home (made on import) away from both.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_PHI__")}
    (tmp_path / "home").mkdir()
    env.update(HOME=str(tmp_path / "home"), PREFECT_HOME=str(tmp_path / "home" / ".prefect"))
    return subprocess.run(
        [str(FINETUNE_PHI), "run", "--config", "bad.yaml", *flags],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _assert_one_message_and_no_state(tmp_path: Path, done: subprocess.CompletedProcess[str]) -> str:
    """Exit code 2, one error line and no traceback; neither the configured state folder nor the default one
    (``.finetune-phi/`` in the working folder) exists. Returns the error line."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("finetune-phi run: error:"), done.stderr
    assert not (tmp_path / "state").exists()
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["bad.yaml"]
    return errors[0]


@pytest.mark.parametrize(
    ("section", "key", "value", "field"),
    [
        ("data", "tset_share", 0.2, "data.tset_share"),  # unknown key (a typo of test_share)
        ("endpoint", "port", "not-a-port", "endpoint.port"),  # wrong type
    ],
    ids=["unknown-key", "wrong-type"],
)
def test_run_with_a_bad_config_exits_2_naming_field_and_file(
    tmp_path: Path, section: str, key: str, value: Any, field: str
) -> None:
    done = _run_cli(tmp_path, _local_config_with(tmp_path, section, key, value))
    assert "bad.yaml" in _assert_one_message_and_no_state(tmp_path, done)
    assert f"field '{field}'" in done.stderr


def test_run_with_an_unknown_refresh_step_stops_before_making_the_state_folder(tmp_path: Path) -> None:
    config = _local_config_with(tmp_path, "data", "seed", 0)  # a valid config
    done = _run_cli(tmp_path, config, "--refresh", "trainig")
    assert "trainig" in _assert_one_message_and_no_state(tmp_path, done)
