"""Cache keys follow content: each input of a step changes its key, identical inputs give identical keys, and a
key never depends on which Python objects carried the inputs (their ids, a fresh interpreter's hash seed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tasks.caching import content_key_fn, data_cache_key, training_cache_key
from tasks.config import DataConfig, Settings, TrainingConfig
from tasks.data import source_fingerprint

REPO_ROOT = Path(__file__).resolve().parents[2]
ROWS = [
    {"messages": [{"role": "user", "content": "What is a flow?"}, {"role": "assistant", "content": "A DAG."}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
]
MANIFEST = "a" * 64


def _write_inputs(root: Path) -> dict[str, Path]:
    """A JSONL source, a recipe file and a training code folder, as real files."""
    root.mkdir(parents=True, exist_ok=True)
    source = root / "chat.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    recipe = root / "recipe.yaml"
    recipe.write_text("max_steps: 10\nlearning_rate: 0.001\n", encoding="utf-8")
    code = root / "training"
    code.mkdir(exist_ok=True)
    (code / "sft.py").write_text("def main():\n    return 1\n", encoding="utf-8")
    return {"source": source, "recipe": recipe, "code": code, "state": root / "state"}


def _settings(paths: dict[str, Path], overrides: dict[str, Any] | None = None) -> Settings:
    return Settings(
        state_dir=paths["state"],
        data=DataConfig(path=paths["source"]),
        training=TrainingConfig(recipe=paths["recipe"], overrides=dict(overrides or {"max_steps": 10})),
    )


def _training_key(paths: dict[str, Path], manifest: str = MANIFEST, **kwargs: Any) -> str:
    return training_cache_key(_settings(paths, **kwargs), manifest, code_root=paths["code"])


def _data_key(paths: dict[str, Path]) -> str:
    settings = _settings(paths)
    return data_cache_key(settings, source_fingerprint(settings.data))


@pytest.fixture()
def paths(tmp_path: Path) -> dict[str, Path]:
    return _write_inputs(tmp_path / "inputs")


def test_identical_inputs_give_identical_keys_from_separate_objects(paths: dict[str, Path]) -> None:
    # Two Settings built apart (different object ids) for the same files: same keys.
    assert _settings(paths) is not _settings(paths)
    assert _training_key(paths) == _training_key(paths)
    assert _data_key(paths) == _data_key(paths)
    assert _training_key(paths).startswith("training-") and _data_key(paths).startswith("data-")


def test_training_key_changes_with_the_data_manifest(paths: dict[str, Path]) -> None:
    assert _training_key(paths, manifest="b" * 64) != _training_key(paths)


def test_training_key_changes_with_the_recipe_content(paths: dict[str, Path]) -> None:
    before = _training_key(paths)
    paths["recipe"].write_text("max_steps: 10\nlearning_rate: 0.002\n", encoding="utf-8")
    assert _training_key(paths) != before


def test_training_key_changes_with_the_training_code(paths: dict[str, Path]) -> None:
    before = _training_key(paths)
    (paths["code"] / "sft.py").write_text("def main():\n    return 2\n", encoding="utf-8")
    edited = _training_key(paths)
    assert edited != before
    (paths["code"] / "helpers.py").write_text("X = 1\n", encoding="utf-8")
    assert _training_key(paths) not in (before, edited), "a new module is part of the training code"


def test_training_key_ignores_bytecode_and_non_python_files(paths: dict[str, Path]) -> None:
    before = _training_key(paths)
    (paths["code"] / "__pycache__").mkdir()
    (paths["code"] / "__pycache__" / "sft.cpython-311.pyc").write_bytes(b"\x00\x01")
    (paths["code"] / "notes.txt").write_text("scratch", encoding="utf-8")
    assert _training_key(paths) == before


def test_training_key_changes_with_the_overrides(paths: dict[str, Path]) -> None:
    before = _training_key(paths)
    assert _training_key(paths, overrides={"max_steps": 11}) != before
    assert _training_key(paths, overrides={"max_steps": 10, "seed": 1}) != before
    # Same overrides in another order are the same request.
    two = {"max_steps": 10, "seed": 1}
    assert _training_key(paths, overrides=two) == _training_key(paths, overrides=dict(reversed(two.items())))


def test_training_key_follows_recipe_content_not_its_path(paths: dict[str, Path], tmp_path: Path) -> None:
    copy = _write_inputs(tmp_path / "copy")
    copy = {**copy, "state": paths["state"], "code": paths["code"]}
    assert _training_key(copy) == _training_key(paths)


def test_data_key_changes_with_the_source_content(paths: dict[str, Path]) -> None:
    before = _data_key(paths)
    with paths["source"].open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(ROWS[0]) + "\n")
    assert _data_key(paths) != before


def test_data_key_changes_with_the_data_section(paths: dict[str, Path]) -> None:
    settings = _settings(paths)
    base = data_cache_key(settings, source_fingerprint(settings.data))
    settings.data.seed = 1
    assert data_cache_key(settings, source_fingerprint(settings.data)) != base


def test_content_key_fn_uses_only_the_content_key() -> None:
    # Whatever objects ride along as other parameters, the key is the precomputed string.
    assert content_key_fn(None, {"content_key": "training-x", "settings": object()}) == "training-x"
    assert content_key_fn(None, {"content_key": "training-x", "settings": object()}) == "training-x"


KEYS_SCRIPT = """
import json, sys
from pathlib import Path
from tasks.caching import data_cache_key, training_cache_key
from tasks.config import DataConfig, Settings, TrainingConfig
from tasks.data import source_fingerprint

root = Path(sys.argv[1])
settings = Settings(
    state_dir=root / "state",
    data=DataConfig(path=root / "chat.jsonl"),
    training=TrainingConfig(recipe=root / "recipe.yaml", overrides={"max_steps": 10}),
)
print(json.dumps({
    "data": data_cache_key(settings, source_fingerprint(settings.data)),
    "training": training_cache_key(settings, sys.argv[2], code_root=root / "training"),
}))
"""


def test_keys_are_the_same_in_a_fresh_interpreter(paths: dict[str, Path]) -> None:
    # Another process has other object ids and another str hash seed: a key built from either would differ.
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO_ROOT)}
    root = paths["source"].parent
    output = subprocess.run(
        [sys.executable, "-c", KEYS_SCRIPT, str(root), MANIFEST],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    keys = json.loads(output.strip().splitlines()[-1])
    assert keys == {"data": _data_key(paths), "training": _training_key(paths)}
