"""Dataset preparation: the pipeline's first step.

    finetune-phi prepare-data --config configs/local.yaml [--set data.seed=3] [--output DIR]

Reads a chat dataset (a Hugging Face hub dataset, or a local JSONL/JSON/Parquet file or folder of them),
normalises every row to UltraChat's shape ``{"prompt", "prompt_id", "messages": [{"role", "content"}, ...]}``,
drops invalid rows (counted per reason, with up to 5 example ids each), removes duplicates (same ``prompt_id``
or same content), splits the rest into train and test with a seeded, order-free rule, and writes

    <output_root>/<manifest sha256[:16]>/train.jsonl, test.jsonl, manifest.json

through a staging folder that is renamed into place only when complete, so a crash never leaves half a file
and an earlier result stays intact. The manifest's hash depends only on the content (source bytes, seed,
test share, the rows written), never on absolute paths or times: it is the cache key later steps use.

:func:`prepare_dataset` is the plain function (tests call it); :data:`prepare_dataset_task` is its thin
Prefect wrapper, cached on the source's content and retried only for transient hub faults; :func:`prepare_data_step`
is the flow's data step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from tasks.caching import StepResult, content_key_fn, data_cache_key, run_cached
from tasks.config import DataConfig, HubSource, Settings, load_config
from tasks.state import atomic_open, atomic_write_json, sha256_file, sha256_tree, state_paths

# Bump when normalisation, validation or the split rule changes: old cache keys must stop matching.
FORMAT_VERSION = "finetune-phi/dataset/1"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
ROLES = ("system", "user", "assistant")
EXAMPLES_PER_REASON = 5
SAMPLE_PATH = "data/sample/chat_sample.jsonl"

# Why a row was dropped, in the order the checks run (the report lists them in this order).
REASONS: dict[str, str] = {
    "invalid_json": "the line is not valid JSON",
    "not_an_object": "the row is not a JSON object",
    "messages_not_list": "'messages' is missing or not a list",
    "bad_role": "a turn is not an object with role system, user or assistant",
    "empty_content": "a turn's content is missing, not a string, or blank",
    "no_user_turn": "no user turn",
    "no_assistant_turn": "no assistant turn",
    "not_alternating": "turns do not alternate user/assistant (an optional system turn may come first only)",
    "last_turn_not_assistant": "the last turn is not the assistant's",
    "duplicate_id": "same prompt_id as an earlier row",
    "duplicate_content": "same messages as an earlier row",
}
DUPLICATE_REASONS = ("duplicate_id", "duplicate_content")


class DatasetError(ValueError):
    """Bad input: the message says what is wrong (with the report, when there is one) and how to fix it."""


class HubUnreachableError(DatasetError):
    """The hub could not be reached. ``transient`` is False in offline mode, where a retry cannot help."""

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient

    def __reduce__(self) -> tuple[Any, ...]:  # Prefect pickles a failed task's exception: keep `transient`
        return (type(self), (str(self),), {"transient": self.transient})


@dataclass(frozen=True)
class DatasetManifest:
    """What :func:`prepare_dataset` wrote. ``sha256`` is the manifest hash: the cache key of later steps."""

    sha256: str
    train_path: Path
    test_path: Path
    manifest_path: Path
    counts: dict[str, int]  # input, invalid, valid, duplicates, unique, train, test
    rejected: dict[str, int]  # reason -> rows (duplicates included, as duplicate_id / duplicate_content)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> up to 5 example ids
    source: dict[str, Any] = field(default_factory=dict)  # path-free source spec with content hashes
    split: dict[str, Any] = field(default_factory=dict)  # seed, test_share, max_rows
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> sha256, rows, bytes

    @property
    def output_dir(self) -> Path:
        return self.manifest_path.parent

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("train_path", "test_path", "manifest_path"):
            data[key] = str(data[key])
        return data

    @classmethod
    def load(cls, manifest_path: str | Path) -> DatasetManifest:
        """Read a ``manifest.json`` written by :func:`prepare_dataset` (paths point beside it)."""
        path = Path(manifest_path)
        body = json.loads(path.read_text(encoding="utf-8"))
        return cls(
            sha256=body["sha256"],
            train_path=path.parent / "train.jsonl",
            test_path=path.parent / "test.jsonl",
            manifest_path=path,
            counts=body["counts"],
            rejected=body["rejected"],
            examples=body["examples"],
            source=body["source"],
            split=body["split"],
            files=body["files"],
        )


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Raw:
    ref: str  # where the row came from, path-free: "chat.jsonl:12" or "row 12"
    value: Any  # the decoded row, or None when the line was not JSON
    invalid_json: bool = False


def _local_files(path: Path) -> list[Path]:
    if not path.exists():
        raise DatasetError(
            f"data file not found: {path} (resolved: {path.resolve()}); set data.path to a JSONL/JSON/Parquet "
            f"file or folder, e.g. --set data.path={SAMPLE_PATH}"
        )
    if path.is_file():
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise DatasetError(f"{path} is not a .jsonl, .json or .parquet file; convert it or point data.path at one")
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES and not any(part.startswith(".") for part in p.parts)
    )
    if not files:
        raise DatasetError(f"no .jsonl, .json or .parquet files under the folder {path}; add some or fix data.path")
    return files


def _relative_name(file: Path, root: Path) -> str:
    return file.name if root.is_file() else file.relative_to(root).as_posix()


def _read_json_lines(file: Path, name: str) -> Iterator[_Raw]:
    with open(file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            ref = f"{name}:{number}"
            try:
                yield _Raw(ref, json.loads(line))
            except json.JSONDecodeError:
                yield _Raw(ref, None, invalid_json=True)


def _read_local_file(file: Path, name: str) -> Iterator[_Raw]:
    suffix = file.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(file)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise DatasetError(f"{file} is not a readable Parquet file ({exc}); re-export it") from None
        for number, row in enumerate(table.to_pylist(), start=1):
            yield _Raw(f"{name}:row {number}", row)
        return
    if suffix == ".json":
        # A .json file is either one JSON array of rows or, as `datasets` writes it, JSON lines.
        text = file.read_text(encoding="utf-8")
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, list):
            for number, row in enumerate(whole, start=1):
                yield _Raw(f"{name}:item {number}", row)
            return
        if isinstance(whole, dict):
            yield _Raw(f"{name}:1", whole)
            return
    yield from _read_json_lines(file, name)


def _read_local(path: Path) -> Iterator[_Raw]:
    for file in _local_files(path):
        yield from _read_local_file(file, _relative_name(file, path))


def _offline() -> bool:
    return any(
        os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _hub_failure_is_network(exc: BaseException) -> bool:
    from tasks.retry import is_transient

    if is_transient(exc):
        return True
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

        return isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled))
    except ImportError:  # pragma: no cover - huggingface_hub comes with datasets
        return False


def _hub_label(hub: HubSource) -> str:
    parts = [f"'{hub.id}'"]
    if hub.config:
        parts.append(f"config '{hub.config}'")
    parts.append(f"split '{hub.split}'")
    if hub.revision:
        parts.append(f"revision '{hub.revision}'")
    return ", ".join(parts)


def _read_hub(hub: HubSource, cache_dir: Path | None) -> Iterator[_Raw]:
    import datasets

    try:
        loaded = datasets.load_dataset(
            hub.id,
            hub.config,
            split=hub.split,
            revision=hub.revision,
            cache_dir=str(cache_dir) if cache_dir else None,
        )
    except Exception as exc:
        if _hub_failure_is_network(exc):
            offline = _offline()
            why = "HF_HUB_OFFLINE is set" if offline else "no network, or the hub is down"
            raise HubUnreachableError(
                f"could not reach the Hugging Face hub for dataset {_hub_label(hub)} ({why}: {exc}). "
                f"To use a local file instead, set 'data.path: {SAMPLE_PATH}' (and remove 'data.hub') in your "
                f"config, or run with --set data.path={SAMPLE_PATH}",
                transient=not offline,
            ) from exc
        not_found = getattr(datasets.exceptions, "DatasetNotFoundError", ())
        if isinstance(exc, not_found):
            raise DatasetError(
                f"dataset {_hub_label(hub)} was not found on the hub ({exc}); check data.hub.id, or set HF_TOKEN "
                "in the environment if it is gated or private"
            ) from exc
        if isinstance(exc, (ValueError, KeyError, FileNotFoundError)):
            raise DatasetError(f"could not load dataset {_hub_label(hub)}: {exc}; check data.hub") from exc
        raise
    if isinstance(loaded, datasets.DatasetDict):
        raise DatasetError(f"dataset {_hub_label(hub)} gave several splits; name one in data.hub.split")
    for number, row in enumerate(loaded, start=1):
        yield _Raw(f"row {number}", row)


def _rows(config: DataConfig, cache_dir: Path | None) -> Iterator[_Raw]:
    rows: Iterable[_Raw] = _read_local(config.path) if config.path is not None else _read_hub(config.hub, cache_dir)
    for count, raw in enumerate(rows):
        if config.max_rows is not None and count >= config.max_rows:
            return
        yield raw


# --------------------------------------------------------------------------- checking


def _canonical(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _turns_error(messages: list[Any]) -> str | None:
    """The first rule a list of turns breaks, or None."""
    for turn in messages:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            return "bad_role"
    for turn in messages:
        content = turn.get("content")
        if not isinstance(content, str) or not content.strip():
            return "empty_content"
    roles = [turn["role"] for turn in messages]
    if "user" not in roles:
        return "no_user_turn"
    if "assistant" not in roles:
        return "no_assistant_turn"
    dialogue = roles[1:] if roles[0] == "system" else roles
    expected = ("user", "assistant")
    if any(role != expected[i % 2] for i, role in enumerate(dialogue)):
        return "not_alternating"
    if roles[-1] != "assistant":
        return "last_turn_not_assistant"
    return None


def check_row(value: Any) -> tuple[dict[str, Any] | None, str | None]:
    """Normalise one decoded row: ``(row, None)`` if valid, ``(None, reason)`` otherwise.

    A missing ``prompt`` becomes the first user turn (as in UltraChat); a missing ``prompt_id`` becomes the
    sha256 of the conversation. Other fields are dropped.
    """
    if not isinstance(value, dict):
        return None, "not_an_object"
    messages = value.get("messages")
    if not isinstance(messages, list):
        return None, "messages_not_list"
    reason = _turns_error(messages)
    if reason is not None:
        return None, reason
    turns = [{"role": turn["role"], "content": turn["content"]} for turn in messages]
    prompt = value.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        prompt = next(turn["content"] for turn in turns if turn["role"] == "user")
    prompt_id = value.get("prompt_id")
    if not isinstance(prompt_id, str) or not prompt_id.strip():
        prompt_id = _sha256(_canonical(turns))
    return {"prompt": prompt, "prompt_id": prompt_id, "messages": turns}, None


def _example_id(raw: _Raw) -> str:
    if isinstance(raw.value, dict):
        prompt_id = raw.value.get("prompt_id")
        if isinstance(prompt_id, str) and prompt_id.strip():
            return prompt_id
    return raw.ref


@dataclass
class _Tally:
    input: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def reject(self, reason: str, example: str) -> None:
        self.rejected[reason] += 1
        bucket = self.examples.setdefault(reason, [])
        if len(bucket) < EXAMPLES_PER_REASON:
            bucket.append(example)

    @property
    def invalid(self) -> int:
        return sum(n for reason, n in self.rejected.items() if reason not in DUPLICATE_REASONS)

    @property
    def duplicates(self) -> int:
        return sum(self.rejected[reason] for reason in DUPLICATE_REASONS)

    def ordered_rejected(self) -> dict[str, int]:
        return {reason: self.rejected[reason] for reason in REASONS if self.rejected[reason]}

    def ordered_examples(self) -> dict[str, list[str]]:
        return {reason: self.examples[reason] for reason in REASONS if reason in self.examples}


def _collect(raws: Iterable[_Raw]) -> tuple[list[dict[str, Any]], _Tally]:
    """Validate and de-duplicate; the first of several duplicates is kept."""
    tally = _Tally()
    kept: list[dict[str, Any]] = []
    seen_ids: set[str] = set()
    seen_content: set[str] = set()
    for raw in raws:
        tally.input += 1
        if raw.invalid_json:
            tally.reject("invalid_json", raw.ref)
            continue
        row, reason = check_row(raw.value)
        if row is None:
            tally.reject(reason or "not_an_object", _example_id(raw))
            continue
        content = _sha256(_canonical(row["messages"]))
        if row["prompt_id"] in seen_ids:
            tally.reject("duplicate_id", row["prompt_id"])
            continue
        if content in seen_content:
            tally.reject("duplicate_content", row["prompt_id"])
            continue
        seen_ids.add(row["prompt_id"])
        seen_content.add(content)
        kept.append(row)
    return kept, tally


# --------------------------------------------------------------------------- splitting and writing


def split_rows(
    rows: list[dict[str, Any]], *, seed: int, test_share: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Order rows by sha256(seed, content) and cut off the test share.

    The order depends on content and seed only, not on input order or Python's ``random``, so the same rows
    and seed give the same files anywhere. At least one row goes to each side.
    """
    if len(rows) < 2:
        raise DatasetError(f"only {len(rows)} usable row(s) left; a train/test split needs at least 2")
    keyed = sorted(rows, key=lambda row: _sha256(f"{seed}\0{_canonical(row['messages'])}"))
    n_test = min(max(round(len(rows) * test_share), 1), len(rows) - 1)
    return keyed[n_test:], keyed[:n_test]


def _serialise_row(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    digest = hashlib.sha256()
    size = 0
    with atomic_open(path, "w") as handle:
        for row in rows:
            line = _serialise_row(row)
            data = line.encode("utf-8")
            digest.update(data)
            size += len(data)
            handle.write(line)
    return {"sha256": digest.hexdigest(), "rows": len(rows), "bytes": size}


def _intact(folder: Path, body: dict[str, Any]) -> bool:
    """True when ``folder`` already holds exactly these files (same manifest, same file hashes)."""
    manifest = folder / "manifest.json"
    try:
        existing = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    if existing != body:
        return False
    return all(
        (folder / name).is_file() and sha256_file(folder / name) == info["sha256"]
        for name, info in body["files"].items()
    )


def _publish(staging: Path, final: Path, body: dict[str, Any]) -> None:
    """Rename the finished staging folder into place; an intact earlier copy is kept as it is."""
    if _intact(final, body):
        shutil.rmtree(staging, ignore_errors=True)
        return
    trash: Path | None = None
    if final.exists():  # damaged by hand: move it aside so the rename cannot fail half-way
        trash = Path(tempfile.mkdtemp(prefix=".old-", dir=final.parent))
        os.replace(final, trash / final.name)
    try:
        os.replace(staging, final)
    except OSError:
        if not _intact(final, body):  # someone else published the same result meanwhile: fine; else a real error
            raise
        shutil.rmtree(staging, ignore_errors=True)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------- the step


def _local_spec(path: Path) -> dict[str, Any]:
    files = _local_files(path)
    return {
        "kind": "local",
        "name": path.name,
        "files": [{"name": _relative_name(f, path), "sha256": sha256_file(f)} for f in files],
    }


def source_spec(config: DataConfig) -> dict[str, Any]:
    """The source as it goes into the manifest: content hashes for local files, coordinates for the hub."""
    if config.path is not None:
        return _local_spec(Path(config.path))
    hub = config.hub
    assert hub is not None  # DataConfig guarantees exactly one source
    spec: dict[str, Any] = {
        "kind": "hub",
        "id": hub.id,
        "config": hub.config,
        "split": hub.split,
        "revision": hub.revision,
    }
    if Path(hub.id).is_dir():  # `datasets` also takes a local folder as an id: key it on its content too
        spec["content_sha256"] = sha256_tree(hub.id, "**/*")
    return spec


def _split_params(config: DataConfig) -> dict[str, Any]:
    return {"seed": config.seed, "test_share": config.test_share, "max_rows": config.max_rows}


def source_fingerprint(config: DataConfig) -> str:
    """A content hash of everything that decides the output: source spec and file bytes, split parameters.

    For a Prefect ``cache_key_fn``. Local files are hashed by content (a moved file keeps its key); hub
    sources by id, config, split and revision (pin ``data.hub.revision`` for a key that cannot go stale).
    ``min_valid_share`` is left out: it decides whether the step fails, not what it writes.
    """
    payload = {"format": FORMAT_VERSION, "source": source_spec(config), "split": _split_params(config)}
    return _sha256(_canonical(payload))


def _describe_source(config: DataConfig) -> str:
    if config.path is not None:
        return f"local {config.path}"
    assert config.hub is not None
    return f"hub {_hub_label(config.hub)}"


def render_report(
    *,
    source: str,
    counts: dict[str, int],
    rejected: dict[str, int],
    examples: dict[str, list[str]],
    min_valid_share: float,
    split: dict[str, Any] | None = None,
    outputs: dict[str, str] | None = None,
) -> str:
    """The report people read: counts, rejected rows by reason with example ids, outputs and the hash."""
    share = counts["valid"] / counts["input"] if counts["input"] else 0.0
    lines = [
        f"source: {source}",
        f"rows read: {counts['input']}",
        f"valid: {counts['valid']} ({share:.1%}; threshold data.min_valid_share {min_valid_share:.1%})",
        f"duplicates removed: {counts['duplicates']}",
        f"unique rows kept: {counts['unique']}",
    ]
    if rejected:
        lines.append("rejected by reason:")
        rank = {reason: index for index, reason in enumerate(REASONS)}
        for reason, count in sorted(rejected.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])):
            shown = ", ".join(examples.get(reason, []))
            lines.append(f"  {reason}: {count} ({REASONS.get(reason, reason)}; e.g. {shown})")
    else:
        lines.append("rejected by reason: none")
    if split is not None:
        lines.append(
            f"split (seed {split['seed']}, test share {split['test_share']}): "
            f"{counts['train']} train, {counts['test']} test"
        )
    for name, value in (outputs or {}).items():
        lines.append(f"{name}: {value}")
    return "\n".join(lines)


def report(manifest: DatasetManifest, *, source: str, min_valid_share: float) -> str:
    """The report of a finished preparation."""
    return render_report(
        source=source,
        counts=manifest.counts,
        rejected=manifest.rejected,
        examples=manifest.examples,
        min_valid_share=min_valid_share,
        split=manifest.split,
        outputs={
            "train": str(manifest.train_path),
            "test": str(manifest.test_path),
            "manifest": str(manifest.manifest_path),
            "manifest sha256": manifest.sha256,
        },
    )


def prepare_dataset(config: DataConfig, output_root: Path, *, cache_dir: Path | None = None) -> DatasetManifest:
    """Read, validate, de-duplicate, split and write the dataset; return its manifest.

    Raises :class:`DatasetError` (with the report) when the valid share is below ``config.min_valid_share`` or
    too few rows are left, and for a missing file or an unreachable hub. ``cache_dir`` is where ``datasets``
    keeps hub downloads (default: its own, under ``HF_HOME``).
    """
    output_root = Path(output_root)
    spec = source_spec(config)  # checks a local path exists before any work
    rows, tally = _collect(_rows(config, cache_dir))
    counts = {
        "input": tally.input,
        "invalid": tally.invalid,
        "valid": tally.input - tally.invalid,
        "duplicates": tally.duplicates,
        "unique": len(rows),
        "train": 0,
        "test": 0,
    }
    split = _split_params(config)

    def failure(why: str) -> DatasetError:
        text = render_report(
            source=_describe_source(config),
            counts=counts,
            rejected=tally.ordered_rejected(),
            examples=tally.ordered_examples(),
            min_valid_share=config.min_valid_share,
        )
        return DatasetError(f"dataset preparation failed: {why}\n{text}")

    if tally.input == 0:
        raise failure("the source holds no rows; point data.path or data.hub at a non-empty dataset")
    share = counts["valid"] / counts["input"]  # duplicates count as valid here: they are removed, not wrong
    if share < config.min_valid_share:
        raise failure(
            f"only {share:.1%} of the rows are valid, below data.min_valid_share {config.min_valid_share:.1%}; "
            "fix the rejected rows listed below, or lower data.min_valid_share (e.g. --set data.min_valid_share=0.5)"
        )
    if len(rows) < 2:
        raise failure(f"only {len(rows)} usable row(s) left; a train/test split needs at least 2")
    train, test = split_rows(rows, seed=config.seed, test_share=config.test_share)
    counts["train"], counts["test"] = len(train), len(test)

    output_root.mkdir(parents=True, exist_ok=True)
    staging = output_root / f".staging-{uuid.uuid4().hex}"
    try:
        staging.mkdir()  # not mkdtemp: its 0700 would stick to the published folder
        files = {
            "train.jsonl": _write_jsonl(staging / "train.jsonl", train),
            "test.jsonl": _write_jsonl(staging / "test.jsonl", test),
        }
        body = {
            "format": FORMAT_VERSION,
            "source": spec,
            "split": split,
            "counts": counts,
            "rejected": tally.ordered_rejected(),
            "examples": tally.ordered_examples(),
            "files": files,
        }
        digest = _sha256(_canonical(body))
        body["sha256"] = digest
        atomic_write_json(staging / "manifest.json", body)
        final = output_root / digest[:16]
        _publish(staging, final, body)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return DatasetManifest.load(final / "manifest.json")


def _retry_hub_faults(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: only an unreachable hub, and not in offline mode, is worth another try."""
    try:
        state.result(raise_on_failure=True)
    except HubUnreachableError as exc:
        return exc.transient
    except Exception:
        return False
    return False


# huggingface_hub already retries HTTP 5 times (~25 s) inside one attempt: one more try after a pause is enough.
@task(
    name="prepare-data",
    retries=1,
    retry_delay_seconds=30,
    retry_condition_fn=_retry_hub_faults,
    cache_key_fn=content_key_fn,
    persist_result=True,
)
def prepare_dataset_task(
    config: DataConfig, output_root: Path, cache_dir: Path | None = None, content_key: str | None = None
) -> DatasetManifest:
    """Prefect wrapper of :func:`prepare_dataset`; logs the report. Cached on ``content_key`` when one is given."""
    manifest = prepare_dataset(config, output_root, cache_dir=cache_dir)
    get_run_logger().info(
        "dataset prepared\n%s",
        report(manifest, source=_describe_source(config), min_valid_share=config.min_valid_share),
    )
    return manifest


def prepare_data_step(settings: Settings, refresh: bool = False) -> StepResult:
    """The flow's data step, keyed on the source's content fingerprint and the data section; its value is the
    manifest as a plain dict. A cached manifest whose files were deleted is prepared again."""
    key = data_cache_key(settings, source_fingerprint(settings.data))
    step = run_cached(
        prepare_dataset_task,
        settings.data,
        Path(settings.state_dir) / "data",
        None,
        key,
        refresh=refresh,
        still_valid=lambda manifest: Path(manifest.train_path).is_file(),
        stale="the cached dataset's files are gone",
    )
    return StepResult(step.value.to_dict(), step.state)


# --------------------------------------------------------------------------- command line


def _prepare_data_command(args: argparse.Namespace) -> int:
    settings = load_config(args.config, args.overrides)
    paths = state_paths(settings.state_dir)
    output = Path(args.output) if args.output else paths.data
    manifest = prepare_dataset(settings.data, output, cache_dir=paths.hf / "datasets")
    print(report(manifest, source=_describe_source(settings.data), min_valid_share=settings.data.min_valid_share))
    return 0


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "prepare-data",
        help="validate, de-duplicate and split the dataset; print the report",
        description="Run the dataset step alone: read the source in the config, write train/test/manifest, "
        "print counts, rejected rows by reason, output paths and the manifest hash.",
    )
    parser.add_argument("--config", default="configs/local.yaml", help="run configuration (default: %(default)s)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a config field, e.g. --set data.seed=3 (repeatable)",
    )
    parser.add_argument("--output", default=None, help="output folder (default: <state_dir>/data)")
    parser.set_defaults(handler=_prepare_data_command)


__all__ = [
    "REASONS",
    "DatasetError",
    "DatasetManifest",
    "HubUnreachableError",
    "add_commands",
    "check_row",
    "prepare_data_step",
    "prepare_dataset",
    "prepare_dataset_task",
    "render_report",
    "report",
    "source_fingerprint",
    "source_spec",
    "split_rows",
]
