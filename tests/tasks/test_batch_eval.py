"""Batch evaluation of the chat flow: test rows to flow inputs, the metrics, and the Prefect step with its artifact.

The Prefect tests (the task, and the main flow's optional step on and off) share one Prefect test server and run
real Prompt flow batch runs over the chat flow against a real loopback HTTP server that answers like the endpoint
(tests/flow_chat/test_flow_pf.py runs one against the endpoint serving the tiny model).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from tasks.batch_eval import aggregate, prepare_eval_data, score_rows, to_eval_row, token_f1
from tasks.config import Settings
from tests.flow_chat.helpers import REPO_ROOT, free_port, settings_for
from tests.flow_chat.recording_server import RecordingServer

SAMPLE = REPO_ROOT / "data" / "sample" / "chat_sample.jsonl"
KEY = "batch-key"


def _turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def test_multi_turn_row_splits_into_history_question_and_reference() -> None:
    row = {
        "prompt": "Hi",
        "prompt_id": "p1",
        "messages": [
            _turn("system", ""),
            _turn("user", "Hi"),
            _turn("assistant", "Hello!"),
            _turn("user", "What is MLflow?"),
            _turn("assistant", "A tracking server."),
        ],
    }
    assert to_eval_row(row, 7) == {
        "row_id": 7,
        "prompt_id": "p1",
        "question": "What is MLflow?",
        "chat_history": [{"inputs": {"question": "Hi"}, "outputs": {"answer": "Hello!"}}],
        "reference": "A tracking server.",
    }


def test_rows_without_a_question_answer_pair_are_skipped() -> None:
    assert to_eval_row({"messages": [_turn("user", "only a question")]}, 0) is None
    assert to_eval_row({"messages": [_turn("assistant", "only an answer")]}, 0) is None
    assert to_eval_row({"messages": []}, 0) is None
    # A trailing user turn after the last answer: the last complete pair is evaluated.
    row = to_eval_row({"messages": [_turn("user", "q"), _turn("assistant", "a"), _turn("user", "more?")]}, 0)
    assert row is not None and (row["question"], row["reference"], row["chat_history"]) == ("q", "a", [])


def test_prepare_writes_jsonl_and_honours_max_rows(tmp_path: Path) -> None:
    out = tmp_path / "eval" / "eval_input.jsonl"
    rows = prepare_eval_data(SAMPLE, out, max_rows=5)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == rows and len(rows) == 5
    assert all(r["question"] and r["reference"] for r in rows)
    assert not list(out.parent.glob(".*.tmp"))  # written atomically: no temporary file left
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"messages": []}\n')
    with pytest.raises(ValueError, match="no row ending in a user turn"):
        prepare_eval_data(empty, tmp_path / "x.jsonl")


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("A Prefect flow is a function.", "a prefect FLOW is a function", 1.0),
        ("the cat", "the dog", 0.5),
        ("", "", 1.0),
        ("something", "", 0.0),
        ("alpha beta", "gamma", 0.0),
        ("one two three four", "one two", 2 * (2 / 4) * 1.0 / ((2 / 4) + 1.0)),
    ],
)
def test_token_f1(prediction: str, reference: str, expected: float) -> None:
    assert token_f1(prediction, reference) == pytest.approx(expected)


def test_failed_rows_count_against_f1_and_ended_share() -> None:
    rows = [{"row_id": i, "question": f"q{i}", "reference": "the answer"} for i in range(4)]
    outputs = {
        0: {"answer": "the answer", "finish_reason": "stop", "latency_s": 0.2},
        1: {"answer": "the answer and more and more", "finish_reason": "length", "latency_s": 0.4},
        2: {"answer": "", "finish_reason": "stop", "latency_s": float("nan")},
    }  # row 3 failed in the flow
    scored = score_rows(rows, outputs)
    assert [r["ended"] for r in scored] == [True, False, True, False]
    assert scored[3]["error"] and scored[3]["answer"] is None and scored[3]["f1"] == 0.0
    metrics = aggregate(scored)
    assert (metrics["rows"], metrics["answered"], metrics["failed"]) == (4, 3, 1)
    assert metrics["ended_share"] == 0.5
    # 6 predicted tokens share 2 with the 2-token reference: P 1/3, R 1, F1 0.5.
    assert metrics["token_f1"] == pytest.approx((1.0 + 0.5 + 0 + 0) / 4)
    assert (metrics["latency_p50_s"], metrics["latency_max_s"]) == (0.2, 0.4)


@dataclass
class PrefectBatch:
    """A Prefect test server and a loopback endpoint stand-in that the Prompt flow connection points at."""

    settings: Settings
    server: RecordingServer
    api: Any  # a sync Prefect client for reading back artifacts


@pytest.fixture(scope="module")
def prefect_batch(tmp_path_factory: pytest.TempPathFactory, prefect_harness: str) -> Iterator[PrefectBatch]:
    """This module's flow runs on the suite's Prefect harness, with a recording endpoint and a connection to it."""
    from prefect.client.orchestration import get_client

    from tasks.chat_connection import EndpointTarget, configure_promptflow, create_or_update_connection

    saved = dict(os.environ)  # configure_promptflow's variables end with the module, not with its first test
    settings = settings_for(tmp_path_factory.mktemp("batch-eval"))
    configure_promptflow(settings.state_dir)
    with RecordingServer(key=KEY) as server:
        create_or_update_connection(settings, target=EndpointTarget(server.base_url, KEY, "local"))
        with get_client(sync_client=True) as api:
            yield PrefectBatch(settings=settings, server=server, api=api)
    os.environ.clear()
    os.environ.update(saved)


def _flagged(settings: Settings, *, port: int, max_rows: int = 2) -> Settings:
    """Settings as the main flow sees them with ``evaluation.chat_flow_eval: true``, the endpoint on ``port``."""
    flagged = settings.model_copy(deep=True)
    flagged.evaluation.chat_flow_eval = True
    flagged.evaluation.chat_flow_max_rows = max_rows
    flagged.endpoint.port = port
    return flagged


def _published_table(api: Any, flow_run_id: UUID) -> dict[str, Any]:
    """The ``chat-flow-eval`` table artifact that ``flow_run_id`` published, as ``{metric: value}``."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from tasks.batch_eval import ARTIFACT_KEY

    artifacts = api.read_artifacts(
        artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[ARTIFACT_KEY]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
        )
    )
    assert len(artifacts) == 1, artifacts
    table = json.loads(artifacts[0].data) if isinstance(artifacts[0].data, str) else artifacts[0].data
    return {row["metric"]: row["value"] for row in table}


def _shown(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k not in ("metrics_path", "rows_path", "test_file")}


@pytest.mark.slow
def test_prefect_task_runs_the_flow_in_batch_and_publishes_the_aggregate(
    prefect_batch: PrefectBatch, tmp_path: Path
) -> None:
    from prefect import flow

    from tasks.batch_eval import evaluate_chat_flow_task

    out_dir = tmp_path / "chat_eval"

    @flow
    def evaluate(test_file: str) -> dict:
        return evaluate_chat_flow_task(
            prefect_batch.settings, test_file, max_rows=6, out_dir=str(out_dir), refresh_connection=False
        )

    before = len(prefect_batch.server.bodies())
    state = evaluate(str(SAMPLE), return_state=True)
    metrics = state.result()
    assert len(prefect_batch.server.bodies()) - before == 6 and metrics["rows"] == 6 and metrics["failed"] == 0
    assert metrics["ended_share"] == 1.0  # the server always says finish_reason "stop"
    assert json.loads((out_dir / "metrics.json").read_text())["rows"] == 6
    assert len((out_dir / "rows.jsonl").read_text().splitlines()) == 6
    assert _published_table(prefect_batch.api, state.state_details.flow_run_id) == _shown(metrics)


@pytest.mark.slow
def test_main_flow_step_returns_the_metrics_and_publishes_them(
    prefect_batch: PrefectBatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``maybe_evaluate_chat_flow`` on, as the main flow calls it: it makes the connection from the endpoint's
    state (the local endpoint's address and its key), runs the batch, and hands back what it published."""
    from prefect import flow

    from tasks.batch_eval import maybe_evaluate_chat_flow

    flagged = _flagged(prefect_batch.settings, port=prefect_batch.server.port)
    monkeypatch.setenv("FINETUNE_PHI_ENDPOINT_KEY", KEY)  # the local key source chat-connection reads first

    @flow
    def main_flow_step(test_file: str) -> dict | None:
        return maybe_evaluate_chat_flow(flagged, test_file)

    before = len(prefect_batch.server.bodies())
    state = main_flow_step(str(SAMPLE), return_state=True)
    metrics = state.result()
    assert metrics is not None, state.message
    assert (metrics["rows"], metrics["answered"], metrics["failed"]) == (2, 2, 0)
    assert len(prefect_batch.server.bodies()) - before == 2  # chat_flow_max_rows
    assert 0.0 <= metrics["token_f1"] <= 1.0 and metrics["ended_share"] == 1.0
    assert json.loads(Path(metrics["metrics_path"]).read_text()) == {
        k: v for k, v in metrics.items() if k not in ("metrics_path", "rows_path")
    }
    assert _published_table(prefect_batch.api, state.state_details.flow_run_id) == _shown(metrics)


@pytest.mark.slow
def test_main_flow_step_is_off_by_default_and_never_fails_the_run(prefect_batch: PrefectBatch) -> None:
    from prefect import flow

    from tasks.batch_eval import maybe_evaluate_chat_flow

    off = prefect_batch.settings.model_copy(deep=True)
    off.evaluation.chat_flow_eval = False
    # On, with no endpoint at all: nothing listens on the port, so every row of the batch run fails.
    broken = _flagged(prefect_batch.settings, port=free_port())

    @flow
    def main_flow_step(flag: bool, test_file: str) -> dict | None:
        return maybe_evaluate_chat_flow(broken if flag else off, test_file)

    before = len(prefect_batch.server.bodies())
    assert main_flow_step(False, str(SAMPLE)) is None
    state = main_flow_step(True, str(SAMPLE), return_state=True)
    assert state.is_completed() and state.result() is None  # a warning, and the run goes on
    assert len(prefect_batch.server.bodies()) == before
