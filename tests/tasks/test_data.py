"""Dataset preparation (tasks/data.py) on the shipped sample, the malformed rows and hub-shaped local data.

No network: the hub path runs through ``datasets.load_dataset`` on a local folder, and the unreachable-hub
case is the real offline behaviour of ``datasets`` (HF_HUB_OFFLINE=1, set by conftest).
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml

from flows.cli import main as cli_main
from tasks import data as data_module
from tasks.config import DataConfig, HubSource, load_config
from tasks.data import (
    REASONS,
    DatasetError,
    DatasetManifest,
    HubUnreachableError,
    prepare_dataset,
    prepare_dataset_task,
    source_fingerprint,
)
from tasks.state import sha256_file

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "data" / "sample"
SAMPLE = SAMPLE_DIR / "chat_sample.jsonl"
MALFORMED = SAMPLE_DIR / "malformed.jsonl"


def _malformed_lines() -> list[str]:
    return [line for line in MALFORMED.read_text(encoding="utf-8").splitlines() if line.strip()]


def _expected_reason(line: str) -> str:
    for reason in [*REASONS, "valid"]:
        if f'"expect": "{reason}"' in line or f"(expect {reason})" in line:
            return reason
    raise AssertionError(f"malformed.jsonl line names no expected reason: {line}")


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _chat(question: str, answer: str, prompt_id: str | None = None) -> str:
    row: dict[str, object] = {
        "prompt": question,
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
    }
    if prompt_id is not None:
        row["prompt_id"] = prompt_id
    return json.dumps(row)


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sample_manifest(tmp_path_factory: pytest.TempPathFactory) -> DatasetManifest:
    return prepare_dataset(DataConfig(path=SAMPLE), tmp_path_factory.mktemp("sample-out"))


# --------------------------------------------------------------------------- the shipped sample


def test_sample_file_is_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("make_sample", SAMPLE_DIR / "make_sample.py")
    assert spec is not None and spec.loader is not None
    make_sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_sample)
    assert make_sample.render() == SAMPLE.read_text(encoding="utf-8"), "run python3 data/sample/make_sample.py"


def test_sample_is_small_multi_turn_and_all_valid(sample_manifest: DatasetManifest) -> None:
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    assert 250 <= len(rows) <= 400
    assert SAMPLE.stat().st_size < 1_000_000
    shapes = Counter((row["messages"][0]["role"], len(row["messages"])) for row in rows)
    assert shapes[("system", 3)] > 0 and shapes[("user", 4)] > 0 and shapes[("user", 2)] > 0
    assert all(set(row) == {"prompt", "prompt_id", "messages"} for row in rows)
    answers = [m["content"] for row in rows for m in row["messages"] if m["role"] == "assistant"]
    assert max(len(answer.split()) for answer in answers) < 60
    assert sample_manifest.rejected == {}
    assert sample_manifest.counts["unique"] == len(rows)
    assert (sample_manifest.counts["train"], sample_manifest.counts["test"]) == (249, 62)


def test_smoke_prompts_of_local_config_are_in_the_training_split(
    repo_root: Path, sample_manifest: DatasetManifest
) -> None:
    settings = load_config(repo_root / "configs" / "local.yaml")
    trained = {
        turn["content"]
        for line in sample_manifest.train_path.read_text(encoding="utf-8").splitlines()
        for turn in json.loads(line)["messages"]
        if turn["role"] == "user"
    }
    assert settings.data.path == Path("data/sample/chat_sample.jsonl")
    missing = [prompt for prompt in settings.smoke.prompts if prompt not in trained]
    assert not missing, f"smoke prompts not in train.jsonl: {missing}"


def test_manifest_records_counts_hashes_and_no_absolute_path(sample_manifest: DatasetManifest, tmp_path: Path) -> None:
    text = sample_manifest.manifest_path.read_text(encoding="utf-8")
    assert str(sample_manifest.output_dir.parent) not in text and str(SAMPLE.parent) not in text
    body = json.loads(text)
    assert body["sha256"] == sample_manifest.sha256
    assert sample_manifest.output_dir.name == sample_manifest.sha256[:16]
    assert body["source"]["files"] == [{"name": "chat_sample.jsonl", "sha256": sha256_file(SAMPLE)}]
    for name, path in (("train.jsonl", sample_manifest.train_path), ("test.jsonl", sample_manifest.test_path)):
        assert body["files"][name]["sha256"] == sha256_file(path)
        assert body["files"][name]["rows"] == len(path.read_text(encoding="utf-8").splitlines())
    assert DatasetManifest.load(sample_manifest.manifest_path) == sample_manifest
    round_trip = json.loads(json.dumps(sample_manifest.to_dict()))
    assert round_trip["train_path"] == str(sample_manifest.train_path) and round_trip["counts"]["input"] == 311
    first = json.loads(sample_manifest.train_path.read_text(encoding="utf-8").splitlines()[0])
    assert list(first) == ["prompt", "prompt_id", "messages"]
    assert all(list(turn) == ["role", "content"] for turn in first["messages"])


# --------------------------------------------------------------------------- validation, one reason at a time


@pytest.mark.parametrize("reason", list(REASONS))
def test_each_rejection_reason(reason: str, tmp_path: Path) -> None:
    lines = _malformed_lines()
    valid = [line for line in lines if _expected_reason(line) == "valid"]
    bad = [line for line in lines if _expected_reason(line) == reason]
    assert bad, f"malformed.jsonl has no row for {reason}"
    source = _write(tmp_path / "rows.jsonl", valid + bad)
    manifest = prepare_dataset(DataConfig(path=source, min_valid_share=0.0), tmp_path / "out")
    assert manifest.rejected == {reason: len(bad)}
    assert manifest.counts["input"] == len(valid) + len(bad)
    assert manifest.counts["unique"] == len(valid) == manifest.counts["train"] + manifest.counts["test"]
    examples = manifest.examples[reason]
    assert 1 <= len(examples) <= 5
    if reason == "invalid_json":
        assert examples == [f"rows.jsonl:{len(valid) + n}" for n in range(1, len(bad) + 1)]
    elif reason == "duplicate_id":
        assert examples == ["ok-1"]
    elif reason != "not_an_object":
        assert all(example.startswith(reason) for example in examples)


def test_whole_malformed_file_fails_the_default_threshold_with_the_report(tmp_path: Path) -> None:
    expected = Counter(_expected_reason(line) for line in _malformed_lines())
    with pytest.raises(DatasetError) as caught:
        prepare_dataset(DataConfig(path=MALFORMED), tmp_path / "out")
    message = str(caught.value)
    assert "below data.min_valid_share 90.0%" in message
    assert f"rows read: {sum(expected.values())}" in message
    for reason, count in expected.items():
        if reason != "valid":
            assert f"  {reason}: {count} (" in message
    assert "e.g. bad_role-1, bad_role-2" in message
    assert not (tmp_path / "out").exists(), "nothing is written when the step fails"


def test_at_most_five_example_ids_per_reason(tmp_path: Path) -> None:
    good = [_chat(f"question {n}", f"answer {n}") for n in range(40)]
    bad = [json.dumps({"prompt_id": f"bad-{n}", "messages": [{"role": "robot", "content": "x"}]}) for n in range(7)]
    source = _write(tmp_path / "rows.jsonl", good + bad)
    manifest = prepare_dataset(DataConfig(path=source, min_valid_share=0.0), tmp_path / "out")
    assert manifest.rejected == {"bad_role": 7}
    assert manifest.examples["bad_role"] == [f"bad-{n}" for n in range(5)]


# --------------------------------------------------------------------------- threshold, dedup, nothing left


def test_threshold_passes_at_the_share_and_fails_below_it(tmp_path: Path) -> None:
    lines = [_chat(f"question {n}", f"answer {n}") for n in range(9)] + ["not json"]
    source = _write(tmp_path / "rows.jsonl", lines)
    manifest = prepare_dataset(DataConfig(path=source, min_valid_share=0.9), tmp_path / "out")
    assert manifest.counts["valid"] == 9 and manifest.rejected == {"invalid_json": 1}
    with pytest.raises(DatasetError) as caught:
        prepare_dataset(DataConfig(path=source, min_valid_share=0.95), tmp_path / "out2")
    message = str(caught.value)
    assert "only 90.0% of the rows are valid, below data.min_valid_share 95.0%" in message
    assert "invalid_json: 1" in message and "rows.jsonl:10" in message and "rows read: 10" in message


def test_duplicates_by_id_and_by_content_are_removed_first_kept(tmp_path: Path) -> None:
    lines = [
        _chat("What is LoRA?", "Small adapters.", prompt_id="a"),
        _chat("What is QLoRA?", "LoRA on 4 bits.", prompt_id="a"),  # same id, other content
        _chat("What is LoRA?", "Small adapters.", prompt_id="b"),  # same content, other id
        _chat("What is LoRA?", "Small adapters."),  # same content, derived id
        _chat("What is MLflow?", "A tracker.", prompt_id="c"),
        _chat("What is Prefect?", "An orchestrator.", prompt_id="d"),
    ]
    manifest = prepare_dataset(DataConfig(path=_write(tmp_path / "rows.jsonl", lines)), tmp_path / "out")
    assert manifest.rejected == {"duplicate_id": 1, "duplicate_content": 2}
    assert manifest.counts == {
        "input": 6,
        "invalid": 0,
        "valid": 6,
        "duplicates": 3,
        "unique": 3,
        "train": 2,
        "test": 1,
    }
    kept = [
        json.loads(line)
        for path in (manifest.train_path, manifest.test_path)
        for line in path.read_text(encoding="utf-8").splitlines()
    ]
    assert sorted(row["prompt_id"] for row in kept) == ["a", "c", "d"]
    assert next(row for row in kept if row["prompt_id"] == "a")["prompt"] == "What is LoRA?"


def test_missing_prompt_and_id_are_derived(tmp_path: Path) -> None:
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "x": 1}]}
    lines = [json.dumps(row), _chat("Other", "Answer", prompt_id="z")]
    manifest = prepare_dataset(DataConfig(path=_write(tmp_path / "rows.jsonl", lines)), tmp_path / "out")
    rows = [json.loads(line) for p in (manifest.train_path, manifest.test_path) for line in p.read_text().splitlines()]
    derived = next(r for r in rows if r["prompt_id"] != "z")
    assert derived["prompt"] == "Hi" and len(derived["prompt_id"]) == 64
    assert derived["messages"][1] == {"role": "assistant", "content": "Hello"}


@pytest.mark.parametrize(
    ("lines", "needle"),
    [
        ([], "the source holds no rows"),
        (["not json", "also not json"], "0 usable row(s) left"),
        ([_chat("one", "row")], "only 1 usable row(s) left"),
    ],
)
def test_nothing_left_fails(lines: list[str], needle: str, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset preparation failed") as caught:
        prepare_dataset(DataConfig(path=_write(tmp_path / "rows.jsonl", lines), min_valid_share=0.0), tmp_path / "o")
    assert needle in str(caught.value)


# --------------------------------------------------------------------------- determinism


def test_same_input_and_seed_give_byte_identical_output_anywhere(tmp_path: Path) -> None:
    elsewhere = tmp_path / "copy" / "renamed.jsonl"
    elsewhere.parent.mkdir()
    shutil.copyfile(SAMPLE, elsewhere)
    first = prepare_dataset(DataConfig(path=SAMPLE), tmp_path / "a")
    second = prepare_dataset(DataConfig(path=SAMPLE), tmp_path / "b" / "deeper")
    assert first.sha256 == second.sha256
    assert _tree(first.output_dir) == _tree(second.output_dir)
    moved = prepare_dataset(DataConfig(path=elsewhere), tmp_path / "c")
    assert moved.train_path.read_bytes() == first.train_path.read_bytes()
    assert moved.test_path.read_bytes() == first.test_path.read_bytes()


def test_split_ignores_input_order_and_depends_on_seed(tmp_path: Path) -> None:
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()
    random.Random(7).shuffle(lines)
    shuffled = _write(tmp_path / "shuffled.jsonl", lines)
    base = prepare_dataset(DataConfig(path=SAMPLE, seed=0), tmp_path / "a")
    reordered = prepare_dataset(DataConfig(path=shuffled, seed=0), tmp_path / "b")
    assert reordered.train_path.read_bytes() == base.train_path.read_bytes()
    other_seed = prepare_dataset(DataConfig(path=SAMPLE, seed=1), tmp_path / "a")
    assert other_seed.sha256 != base.sha256 and other_seed.output_dir != base.output_dir
    ids = {json.loads(line)["prompt_id"] for line in base.test_path.read_text().splitlines()}
    other_ids = {json.loads(line)["prompt_id"] for line in other_seed.test_path.read_text().splitlines()}
    assert len(other_ids) == len(ids) and other_ids != ids
    bigger_test = prepare_dataset(DataConfig(path=SAMPLE, test_share=0.5), tmp_path / "a")
    assert (bigger_test.counts["train"], bigger_test.counts["test"]) == (155, 156)


def test_source_fingerprint_follows_content_not_location(tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / SAMPLE.name  # the file's own name is part of the source; its folder is not
    copy.parent.mkdir()
    shutil.copyfile(SAMPLE, copy)
    base = source_fingerprint(DataConfig(path=SAMPLE))
    assert source_fingerprint(DataConfig(path=copy)) == base
    assert source_fingerprint(DataConfig(path=SAMPLE, min_valid_share=0.5)) == base
    assert source_fingerprint(DataConfig(path=SAMPLE, seed=1)) != base
    copy.write_text(SAMPLE.read_text(encoding="utf-8") + _chat("new", "row") + "\n", encoding="utf-8")
    assert source_fingerprint(DataConfig(path=copy)) != base
    hub = DataConfig(hub=HubSource())
    assert source_fingerprint(hub) != source_fingerprint(DataConfig(hub=HubSource(split="train_sft[:2%]")))
    assert len(base) == 64


# --------------------------------------------------------------------------- atomic output


def test_failure_mid_write_leaves_no_partial_file_and_keeps_the_previous_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    previous = prepare_dataset(DataConfig(path=SAMPLE), out)
    before = _tree(out)
    real = data_module._serialise_row
    calls = {"n": 0}

    def failing(row: dict) -> str:
        calls["n"] += 1
        if calls["n"] == 100:
            raise OSError("disk full (simulated)")
        return real(row)

    monkeypatch.setattr(data_module, "_serialise_row", failing)
    for seed in (0, 5):  # the same result again, and a new one that would go to a new folder
        calls["n"] = 0
        with pytest.raises(OSError, match="disk full"):
            prepare_dataset(DataConfig(path=SAMPLE, seed=seed), out)
        assert calls["n"] == 100, "the failure came in the middle of train.jsonl"
        assert _tree(out) == before, "the earlier result is intact and nothing else was left behind"
        assert sorted(p.name for p in out.iterdir()) == [previous.output_dir.name]
    monkeypatch.setattr(data_module, "_serialise_row", real)
    assert prepare_dataset(DataConfig(path=SAMPLE, seed=5), out).counts["test"] == 62


def test_damaged_earlier_result_is_replaced_whole(tmp_path: Path) -> None:
    first = prepare_dataset(DataConfig(path=SAMPLE), tmp_path)
    expected = _tree(first.output_dir)
    first.test_path.write_text("truncated", encoding="utf-8")
    again = prepare_dataset(DataConfig(path=SAMPLE), tmp_path)
    assert again == first and _tree(again.output_dir) == expected
    assert [p.name for p in tmp_path.iterdir()] == [first.output_dir.name]


# --------------------------------------------------------------------------- local sources


def test_json_parquet_and_folder_sources(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    folder = tmp_path / "folder"
    (folder / "part").mkdir(parents=True)
    (folder / "a.json").write_text(json.dumps(rows[:100]), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows[100:200]), folder / "part" / "b.parquet")
    _write(folder / "c.jsonl", [json.dumps(row) for row in rows[200:]] + ["{oops"])
    (folder / "notes.txt").write_text("ignored", encoding="utf-8")
    manifest = prepare_dataset(DataConfig(path=folder), tmp_path / "out")
    assert manifest.counts["input"] == 312 and manifest.counts["unique"] == 311
    assert manifest.examples == {"invalid_json": [f"c.jsonl:{len(rows) - 200 + 1}"]}
    assert [f["name"] for f in manifest.source["files"]] == ["a.json", "c.jsonl", "part/b.parquet"]
    whole = prepare_dataset(DataConfig(path=SAMPLE), tmp_path / "out2")
    assert manifest.train_path.read_bytes() == whole.train_path.read_bytes()


def test_max_rows_caps_the_input(tmp_path: Path) -> None:
    manifest = prepare_dataset(DataConfig(path=SAMPLE, max_rows=50), tmp_path)
    assert manifest.counts["input"] == 50 and manifest.counts["train"] + manifest.counts["test"] == 50


def test_missing_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such.jsonl"
    with pytest.raises(DatasetError, match="data file not found") as caught:
        prepare_dataset(DataConfig(path=missing), tmp_path / "out")
    assert str(missing) in str(caught.value) and "data.path" in str(caught.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"no \.jsonl, \.json or \.parquet files"):
        prepare_dataset(DataConfig(path=tmp_path / "empty"), tmp_path / "out")
    with pytest.raises(DatasetError, match=r"not a \.jsonl, \.json or \.parquet file"):
        prepare_dataset(DataConfig(path=_write(tmp_path / "rows.csv", ["a,b"])), tmp_path / "out")


# --------------------------------------------------------------------------- the hub path


def test_hub_path_goes_through_datasets_on_local_data(tmp_path: Path) -> None:
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()[:40]
    bad = {"prompt": "x", "prompt_id": "bad_role-hub", "messages": [{"content": "hi", "role": "robot"}]}
    empty = {"prompt": "y", "prompt_id": "empty-hub", "messages": [{"content": " ", "role": "user"}]}
    repo = tmp_path / "fake-hub-dataset"
    _write(repo / "train.jsonl", [*lines, json.dumps(bad), json.dumps(empty)])
    config = DataConfig(hub=HubSource(id=str(repo), config="default", split="train[:41]"), min_valid_share=0.5)
    manifest = prepare_dataset(config, tmp_path / "out", cache_dir=tmp_path / "hf")
    assert manifest.counts["input"] == 41 and manifest.rejected == {"bad_role": 1}
    assert manifest.examples == {"bad_role": ["bad_role-hub"]}
    assert {k: v for k, v in manifest.source.items() if k != "content_sha256"} == {
        "kind": "hub",
        "id": str(repo),
        "config": "default",
        "split": "train[:41]",
        "revision": None,
    }
    before = source_fingerprint(config)
    _write(repo / "train.jsonl", lines[:39])
    assert source_fingerprint(config) != before, "a local folder given as hub id is keyed on its content"
    assert (tmp_path / "hf").is_dir(), "datasets kept its cache where it was told"
    local = prepare_dataset(DataConfig(path=_write(tmp_path / "same.jsonl", lines)), tmp_path / "out-local")
    assert manifest.train_path.read_bytes() == local.train_path.read_bytes()
    with pytest.raises(DatasetError, match="could not load dataset"):
        prepare_dataset(
            DataConfig(hub=HubSource(id=str(repo), split="nosuchsplit")), tmp_path / "o", cache_dir=tmp_path
        )


def test_unreachable_hub_says_so_and_shows_the_local_file_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = DataConfig(hub=HubSource(id="finetune-phi-tests/no-such-dataset", split="train_sft[:1%]"))
    with pytest.raises(HubUnreachableError) as caught:
        prepare_dataset(config, tmp_path / "out", cache_dir=tmp_path / "hf")
    message = str(caught.value)
    assert "could not reach the Hugging Face hub" in message
    assert "'finetune-phi-tests/no-such-dataset', config 'default', split 'train_sft[:1%]'" in message
    assert "data.path: data/sample/chat_sample.jsonl" in message and "--set data.path=" in message
    assert caught.value.transient is False, "offline: a retry cannot help"
    copy = pickle.loads(pickle.dumps(caught.value))
    assert str(copy) == message and copy.transient is False
    assert not (tmp_path / "out").exists()


def test_task_retries_only_transient_hub_faults(tmp_path: Path) -> None:
    from prefect.logging import disable_run_logger
    from prefect.states import Failed

    retry = data_module._retry_hub_faults
    assert retry(None, None, Failed(data=HubUnreachableError("down", transient=True))) is True
    assert retry(None, None, Failed(data=HubUnreachableError("offline", transient=False))) is False
    assert retry(None, None, Failed(data=DatasetError("bad rows"))) is False
    assert prepare_dataset_task.retries == 1
    with disable_run_logger():
        manifest = prepare_dataset_task.fn(DataConfig(path=SAMPLE), tmp_path)
    assert manifest.counts["unique"] == 311


# --------------------------------------------------------------------------- the command line


def _config_file(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "data": data}), encoding="utf-8")
    return path


def test_cli_prints_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config_file(tmp_path, {"path": str(SAMPLE)})
    assert cli_main(["prepare-data", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "rows read: 311" in out and "rejected by reason: none" in out
    assert "split (seed 0, test share 0.2): 249 train, 62 test" in out
    sha = next(line.split(": ")[1] for line in out.splitlines() if line.startswith("manifest sha256: "))
    assert f"train: {tmp_path / 'state' / 'data' / sha[:16] / 'train.jsonl'}" in out
    assert (
        cli_main(["prepare-data", "--config", str(config), "--set", "data.seed=3", "--output", str(tmp_path / "o")])
        == 0
    )
    out = capsys.readouterr().out
    assert "seed 3" in out and sha not in out and str(tmp_path / "o") in out


def test_cli_reports_bad_rows_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config_file(tmp_path, {"path": str(MALFORMED)})
    assert cli_main(["prepare-data", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "prepare-data: error: dataset preparation failed" in err
    assert "not_alternating: 3" in err and "not_alternating-1, not_alternating-2, not_alternating-3" in err
    assert cli_main(["prepare-data", "--config", str(config), "--set", "data.min_valid_share=0.1"]) == 0
    out = capsys.readouterr().out
    assert "valid: 5 (23.8%; threshold data.min_valid_share 10.0%)" in out and "duplicate_id: 1" in out
