"""The run configuration (tasks/config.py) and the atomic file writes every step relies on (tasks/state.py)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import yaml

from tasks.config import ConfigError, Settings, load_config
from tasks.state import atomic_open, atomic_write_json, atomic_write_text, sha256_tree, state_paths


def _write_config(tmp_path: Path, body: dict | str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(body if isinstance(body, str) else yaml.safe_dump(body), encoding="utf-8")
    return path


MINIMAL = {"data": {"path": "data/sample/chat_sample.jsonl"}}


# --------------------------------------------------------------------------- loading


def test_shipped_local_config_loads(repo_root: Path) -> None:
    settings = load_config(repo_root / "configs" / "local.yaml", environ={})
    assert isinstance(settings, Settings)
    assert settings.backend == "local"
    assert settings.data.path == Path("data/sample/chat_sample.jsonl") and settings.data.hub is None
    assert (settings.data.test_share, settings.data.seed, settings.data.min_valid_share) == (0.2, 0, 0.9)
    assert settings.source_file == repo_root / "configs" / "local.yaml"


def test_unknown_key_names_the_field_and_the_file(tmp_path: Path) -> None:
    path = _write_config(tmp_path, {"data": {"path": "x.jsonl", "colour": "red"}})
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    message = str(caught.value)
    assert str(path) in message and "field 'data.colour': unknown field" in message


def test_wrong_type_names_the_field_the_file_and_the_value(tmp_path: Path) -> None:
    path = _write_config(tmp_path, {"data": {"path": "x.jsonl", "seed": "three"}})
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    message = str(caught.value)
    assert str(path) in message and "field 'data.seed'" in message and "'three'" in message


def test_out_of_range_value_is_refused(tmp_path: Path) -> None:
    path = _write_config(tmp_path, {"data": {"path": "x.jsonl", "test_share": 1.5}})
    with pytest.raises(ConfigError, match=r"field 'data\.test_share'"):
        load_config(path, environ={})


def test_missing_data_section_is_named(tmp_path: Path) -> None:
    path = _write_config(tmp_path, {"backend": "local"})
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    message = str(caught.value)
    assert str(path) in message and "field 'data': required field is missing" in message


def test_data_needs_exactly_one_source(tmp_path: Path) -> None:
    both = _write_config(tmp_path, {"data": {"path": "x.jsonl", "hub": {"id": "a/b"}}})
    with pytest.raises(ConfigError, match="exactly one of 'path'"):
        load_config(both, environ={})
    neither = _write_config(tmp_path, {"data": {"seed": 1}}, name="neither.yaml")
    with pytest.raises(ConfigError, match="exactly one of 'path'"):
        load_config(neither, environ={})


def test_missing_or_unparsable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write_config(tmp_path, "data: [unclosed"), environ={})
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(_write_config(tmp_path, "- a\n- b\n", name="list.yaml"), environ={})


# --------------------------------------------------------------------------- overrides


def test_environment_override_is_applied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_config(tmp_path, MINIMAL)
    monkeypatch.setenv("FINETUNE_PHI__DATA__SEED", "3")
    assert load_config(path).data.seed == 3
    # Explicit overrides (the CLI's --set) win over the environment.
    assert load_config(path, ["data.seed=5"]).data.seed == 5
    assert load_config(path, {"data.seed": 7}).data.seed == 7


def test_environment_override_of_a_list_and_a_bad_value(tmp_path: Path) -> None:
    path = _write_config(tmp_path, MINIMAL)
    settings = load_config(path, environ={"FINETUNE_PHI__ROLLOUT__TRAFFIC_STEPS": "[25, 100]"})
    assert settings.rollout.traffic_steps == [25, 100]
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={"FINETUNE_PHI__DATA__SEED": "many"})
    assert "(with overrides)" in str(caught.value) and "field 'data.seed'" in str(caught.value)


def test_path_override_switches_the_source_off_the_hub(tmp_path: Path) -> None:
    path = _write_config(tmp_path, {"data": {"hub": {"id": "HuggingFaceH4/ultrachat_200k"}}})
    settings = load_config(path, ["data.path=data/sample/chat_sample.jsonl"], environ={})
    assert settings.data.hub is None and settings.data.path == Path("data/sample/chat_sample.jsonl")
    back = load_config(_write_config(tmp_path, MINIMAL, "m.yaml"), ["data.hub.split=train[:10]"], environ={})
    assert back.data.path is None and back.data.hub is not None and back.data.hub.split == "train[:10]"


def test_malformed_cli_override_is_explained(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"must look like section\.field=value"):
        load_config(_write_config(tmp_path, MINIMAL), ["data.seed"], environ={})


# --------------------------------------------------------------------------- secrets


@pytest.mark.parametrize(
    "body",
    [
        {"data": {"path": "x.jsonl"}, "endpoint": {"api_key": "abc"}},
        {"data": {"path": "x.jsonl"}, "registry": {"hfToken": "abc"}},
        {"data": {"path": "x.jsonl"}, "azureml": {"password": "abc"}},
        {"data": {"path": "x.jsonl"}, "client_secret": "abc"},
    ],
)
def test_secret_looking_field_is_refused(body: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="looks like a secret; secrets never go in config files"):
        load_config(_write_config(tmp_path, body), environ={})


def test_secret_looking_override_is_refused_and_not_echoed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(_write_config(tmp_path, MINIMAL), environ={"FINETUNE_PHI__ENDPOINT__API_KEY": "s3cr3t-value"})
    assert "looks like a secret" in str(caught.value) and "s3cr3t-value" not in str(caught.value)


def test_ordinary_fields_with_secret_words_inside_are_accepted(tmp_path: Path) -> None:
    # 'max_new_tokens' holds the word 'token' and '*_id' fields name identities, not secrets.
    body = {
        "data": {"path": "x.jsonl"},
        "evaluation": {"max_new_tokens": 32},
        "smoke": {"max_new_tokens": 16},
        "endpoint": {"max_new_tokens_cap": 256},
    }
    settings = load_config(_write_config(tmp_path, body), environ={"FINETUNE_PHI__EVALUATION__MAX_NEW_TOKENS": "40"})
    assert settings.evaluation.max_new_tokens == 40 and settings.endpoint.max_new_tokens_cap == 256


# --------------------------------------------------------------------------- atomic writes


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_replaces_whole_files(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "file.txt"
    atomic_write_text(target, "first\n")
    atomic_write_text(target, "second\n")
    assert target.read_text() == "second\n" and _leftovers(target.parent) == []
    atomic_write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    atomic_write_json(tmp_path / "b.json", {"a": [1, 2], "b": 1})
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": [1, 2], "b": 1}


def test_failure_mid_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "train.jsonl"
    atomic_write_text(target, "old complete content\n")

    def rows():
        yield '{"row": 1}\n'
        yield '{"row": 2}\n'
        raise RuntimeError("generator failed half-way")

    with pytest.raises(RuntimeError, match="half-way"), atomic_open(target) as handle:
        for line in rows():
            handle.write(line)
    assert target.read_text() == "old complete content\n"
    assert _leftovers(tmp_path) == []
    with pytest.raises(KeyboardInterrupt), atomic_open(tmp_path / "new.txt") as handle:
        handle.write("partial")
        raise KeyboardInterrupt
    assert not (tmp_path / "new.txt").exists() and _leftovers(tmp_path) == []


def test_atomic_open_refuses_append(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="whole files"), atomic_open(tmp_path / "x", "a"):
        pass


def test_atomic_write_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        plain = atomic_write_text(tmp_path / "plain.txt", "x")
        secret = atomic_write_text(tmp_path / "key.txt", "k", permissions=0o600)
        atomic_write_text(secret, "k2")  # rewriting a 0600 file without permissions keeps it 0600
    finally:
        os.umask(umask)
    from tasks import state

    assert stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~state._UMASK
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and secret.read_text() == "k2"


def test_sha256_tree_follows_content_not_location(tmp_path: Path) -> None:
    for root in (tmp_path / "a", tmp_path / "b"):
        (root / "pkg").mkdir(parents=True)
        (root / "pkg" / "m.py").write_text("x = 1\n")
        (root / "pkg" / "__pycache__").mkdir()
        (root / "pkg" / "__pycache__" / "m.py").write_text(str(root))
    assert sha256_tree(tmp_path / "a") == sha256_tree(tmp_path / "b")
    (tmp_path / "b" / "pkg" / "m.py").write_text("x = 2\n")
    assert sha256_tree(tmp_path / "a") != sha256_tree(tmp_path / "b")


def test_state_paths_resolve_under_one_folder(tmp_path: Path) -> None:
    paths = state_paths(tmp_path / "state").ensure()
    assert paths.data == (tmp_path / "state" / "data").resolve() and paths.data.is_dir()
    assert paths.mlflow_tracking_uri.startswith("sqlite:///") and str(tmp_path) in paths.mlflow_tracking_uri
