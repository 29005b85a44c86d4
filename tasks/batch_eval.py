"""Batch evaluation of the chat flow: run ``flow_chat/`` over the test split and score what the users would get.

Each test row (``{"prompt", "prompt_id", "messages"}``) becomes one chat turn to answer: the last assistant turn
is the reference, the user turn before it the question, and everything earlier the chat history in Prompt flow's
shape (``[{"inputs": {"question"}, "outputs": {"answer"}}]``). The flow runs as a Prompt flow batch run
(``PFClient().run``), so the same tool, connection and endpoint serve chat and evaluation. Per row and in
aggregate: token-level F1 against the reference, whether the reply ended (``finish_reason == "stop"``, the end
token came before ``max_tokens``), and latency. ``metrics.json`` and ``rows.jsonl`` are written atomically.

``evaluate_chat_flow_task`` is the Prefect step (optional in the main flow: ``evaluation.chat_flow_eval``); it
publishes the aggregate as a table artifact.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import statistics
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.backends.base import BackendError
from tasks.config import Settings
from tasks.state import atomic_write_json, atomic_write_text

FLOW_DIR = Path(__file__).resolve().parent.parent / "flow_chat"
COLUMN_MAPPING = {"question": "${data.question}", "chat_history": "${data.chat_history}"}
ARTIFACT_KEY = "chat-flow-eval"
CHAT_NODE = "chat"  # the node in flow_chat/flow.dag.yaml whose output carries finish_reason and latency_s
_WORD = re.compile(r"\w+", re.UNICODE)


# ------------------------------------------------------------------------------------------- data
def to_eval_row(row: Mapping[str, Any], index: int) -> dict[str, Any] | None:
    """One test row as ``{"row_id", "prompt_id", "question", "chat_history", "reference"}``; None if unusable.

    System turns are dropped (the flow has no system input; training's system message is empty).
    """
    turns = [t for t in row.get("messages") or [] if isinstance(t, Mapping) and t.get("role") in ("user", "assistant")]
    last_answer = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
    if last_answer is None or last_answer == 0 or turns[last_answer - 1]["role"] != "user":
        return None
    history: list[dict[str, Any]] = []
    for turn in turns[: last_answer - 1]:
        if turn["role"] == "user":
            history.append({"inputs": {"question": str(turn.get("content", ""))}, "outputs": {}})
        elif history and "answer" not in history[-1]["outputs"]:
            history[-1]["outputs"]["answer"] = str(turn.get("content", ""))
    return {
        "row_id": index,
        "prompt_id": row.get("prompt_id"),
        "question": str(turns[last_answer - 1].get("content", "")),
        "chat_history": history,
        "reference": str(turns[last_answer].get("content", "")),
    }


def prepare_eval_data(
    test_file: str | Path, out_file: str | Path, max_rows: int | None = None
) -> list[dict[str, Any]]:
    """Convert the test split into the flow's inputs (JSONL, written atomically). Returns the rows written."""
    rows: list[dict[str, Any]] = []
    with open(test_file, encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if not line.strip():
                continue
            converted = to_eval_row(json.loads(line), index)
            if converted is not None:
                rows.append(converted)
            if max_rows is not None and len(rows) >= max_rows:
                break
    if not rows:
        raise ValueError(f"{test_file} has no row ending in a user turn followed by an assistant turn to evaluate")
    atomic_write_text(out_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


# ---------------------------------------------------------------------------------------- metrics
def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1: harmonic mean of precision and recall of the shared lower-cased word tokens."""
    predicted, expected = _tokens(prediction), _tokens(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def _percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


def score_rows(rows: Sequence[Mapping[str, Any]], outputs: Mapping[int, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per-row results. ``outputs`` maps ``row_id`` to the flow's outputs; a missing row failed in the flow."""
    scored = []
    for row in rows:
        out = outputs.get(row["row_id"])
        answer = out.get("answer") if out else None
        failed = not isinstance(answer, str)
        scored.append(
            {
                "row_id": row["row_id"],
                "prompt_id": row.get("prompt_id"),
                "question": row["question"],
                "reference": row["reference"],
                "answer": None if failed else answer,
                "finish_reason": None if failed else out.get("finish_reason"),
                "ended": (not failed) and out.get("finish_reason") == "stop",
                "f1": 0.0 if failed else round(token_f1(answer, row["reference"]), 4),
                "latency_s": None if failed else _number(out.get("latency_s")),
                "error": "the flow failed on this row (see the Prompt flow run log)" if failed else None,
            }
        )
    return scored


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def aggregate(scored: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means over all rows (a failed row counts as F1 0 and not ended); latency over the answered rows."""
    latencies = [r["latency_s"] for r in scored if r["latency_s"] is not None]
    total = len(scored)
    return {
        "rows": total,
        "answered": sum(r["answer"] is not None for r in scored),
        "failed": sum(r["answer"] is None for r in scored),
        "token_f1": round(statistics.fmean(r["f1"] for r in scored), 4) if total else 0.0,
        "ended_share": round(sum(bool(r["ended"]) for r in scored) / total, 4) if total else 0.0,
        "latency_mean_s": round(statistics.fmean(latencies), 4) if latencies else None,
        "latency_p50_s": round(_percentile(latencies, 0.5), 4) if latencies else None,
        "latency_p95_s": round(_percentile(latencies, 0.95), 4) if latencies else None,
        "latency_max_s": round(max(latencies), 4) if latencies else None,
    }


# ------------------------------------------------------------------------------------------ the run
def run_flow_batch(
    data_file: Path, *, flow_dir: Path = FLOW_DIR, connection: str | None = None, run_name: str | None = None
) -> tuple[dict[int, dict[str, Any]], str]:
    """Run the chat flow over ``data_file`` as a Prompt flow batch run. Returns outputs by row_id and the run name.

    Prompt flow must already point at the state folder (:func:`tasks.chat_connection.configure_promptflow`).
    """
    from promptflow.client import PFClient

    pf = PFClient()
    try:
        run = pf.run(
            flow=str(flow_dir.resolve()),  # the batch workers start elsewhere: a relative path would not resolve
            data=str(data_file.resolve()),
            column_mapping=COLUMN_MAPPING,
            connections={"chat": {"connection": connection}} if connection else None,
            name=run_name,
            stream=False,
        )
        details = pf.get_details(run, all_results=True)
    except Exception as exc:
        raise BackendError(
            f"the Prompt flow batch run over {data_file} failed ({type(exc).__name__}: {str(exc)[:300]}); "
            "check that the endpoint answers and `finetune-phi chat-connection` was run"
        ) from exc
    outputs: dict[int, dict[str, Any]] = {}
    data_rows = [json.loads(line) for line in data_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    node_outputs = chat_node_outputs(run_folder(run.name))
    for record in details.to_dict("records"):
        line = int(record["inputs.line_number"])
        answer = record.get("outputs.answer")
        if isinstance(answer, str):  # a failed line has NaN outputs
            node = node_outputs.get(line, {})
            outputs[int(data_rows[line]["row_id"])] = {
                "answer": answer,
                "finish_reason": node.get("finish_reason"),
                "latency_s": node.get("latency_s"),
            }
    return outputs, run.name


def run_folder(run_name: str) -> Path:
    """Where Prompt flow keeps a local batch run: ``$PF_HOME_DIRECTORY/.runs/<name>/``."""
    return Path(os.environ["PF_HOME_DIRECTORY"]) / ".runs" / run_name


def chat_node_outputs(folder: Path, node: str = CHAT_NODE) -> dict[int, dict[str, Any]]:
    """The chat node's own output per line of a batch run: ``{"answer", "finish_reason", "latency_s"}``.

    The flow's only output is the answer (so ``pf flow serve``'s page shows it as a chat message); the finish
    reason and latency that the evaluation scores are in the node's output, which Prompt flow records per line
    under ``node_artifacts/<node>/`` (one JSON record per line, its ``run_info`` holding the output).
    """
    found: dict[int, dict[str, Any]] = {}
    for record_file in sorted((folder / "node_artifacts" / node).glob("*.jsonl")):
        for text in record_file.read_text(encoding="utf-8").splitlines():
            if not text.strip():
                continue
            record = json.loads(text)
            output = (record.get("run_info") or {}).get("output")
            if isinstance(output, dict) and record.get("line_number") is not None:
                found[int(record["line_number"])] = output
    return found


def evaluate_chat_flow(
    settings: Settings,
    test_file: str | Path,
    *,
    out_dir: str | Path | None = None,
    max_rows: int | None = None,
    flow_dir: Path = FLOW_DIR,
    refresh_connection: bool = True,
) -> dict[str, Any]:
    """Prepare the rows, (re)make the connection, run the flow, score, write ``metrics.json`` and ``rows.jsonl``.

    Returns the aggregate plus ``metrics_path``, ``rows_path`` and the Prompt flow ``run_name``.
    """
    from tasks.chat_connection import configure_promptflow, create_or_update_connection

    paths = configure_promptflow(settings.state_dir)
    # The time for people, a random tail for uniqueness: Prompt flow refuses a second run of the same name, and two
    # evaluations may start in the same second (the main flow's step right after a manual one, tests).
    stamp = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
    out = Path(out_dir) if out_dir else paths.root / "chat_eval" / stamp
    rows = prepare_eval_data(test_file, out / "eval_input.jsonl", max_rows=max_rows)
    if refresh_connection:
        create_or_update_connection(settings)
    started = time.perf_counter()
    outputs, run_name = run_flow_batch(out / "eval_input.jsonl", flow_dir=flow_dir, run_name=f"chat_eval_{stamp}")
    scored = score_rows(rows, outputs)
    if not outputs:
        log = run_folder(run_name) / "logs.txt"
        raise BackendError(
            f"the chat flow failed on all {len(rows)} rows: the endpoint did not answer it (see {log}); "
            "check `finetune-phi endpoint status` and run `finetune-phi chat-connection` again"
        )
    metrics = {
        **aggregate(scored),
        "wall_s": round(time.perf_counter() - started, 2),
        "run_name": run_name,
        "test_file": str(test_file),
    }
    rows_path = atomic_write_text(
        out / "rows.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in scored)
    )
    metrics_path = atomic_write_json(out / "metrics.json", metrics)
    return {**metrics, "metrics_path": str(metrics_path), "rows_path": str(rows_path)}


@task(name="evaluate-chat-flow", cache_policy=NO_CACHE, persist_result=False)
def evaluate_chat_flow_task(
    settings: Settings,
    test_file: str,
    max_rows: int | None = None,
    out_dir: str | None = None,
    refresh_connection: bool = True,
) -> dict[str, Any]:
    """Batch-evaluate flow_chat/ against the live endpoint; the aggregate becomes a table artifact."""
    metrics = evaluate_chat_flow(
        settings, test_file, out_dir=out_dir, max_rows=max_rows, refresh_connection=refresh_connection
    )
    shown = {k: v for k, v in metrics.items() if k not in ("metrics_path", "rows_path", "test_file")}
    create_table_artifact(
        key=ARTIFACT_KEY,
        table=[{"metric": k, "value": v} for k, v in shown.items()],
        description=f"Chat flow batch evaluation over {metrics['rows']} test rows; per row: {metrics['rows_path']}",
    )
    get_run_logger().info(
        "chat flow evaluation: token F1 %.3f, %.0f%% of replies ended, p50 latency %s s, %d rows (%d failed)",
        metrics["token_f1"],
        100 * metrics["ended_share"],
        metrics["latency_p50_s"],
        metrics["rows"],
        metrics["failed"],
    )
    return metrics


def maybe_evaluate_chat_flow(settings: Settings, test_file: str | Path) -> dict[str, Any] | None:
    """The main flow's optional step (``evaluation.chat_flow_eval``): the metrics, or None when off or failed.

    It runs after the rollout, against what users now get: a failure is logged as a warning and never fails the
    run or undoes a good deployment. Call it inside a flow run.
    """
    if not settings.evaluation.chat_flow_eval:
        return None
    state = evaluate_chat_flow_task(
        settings, str(test_file), max_rows=settings.evaluation.chat_flow_max_rows, return_state=True
    )
    if state.is_completed():
        return state.result()
    get_run_logger().warning("the chat flow evaluation did not complete (%s); the deployment stands", state.message)
    return None


__all__ = [
    "aggregate",
    "chat_node_outputs",
    "evaluate_chat_flow",
    "evaluate_chat_flow_task",
    "maybe_evaluate_chat_flow",
    "prepare_eval_data",
    "run_flow_batch",
    "run_folder",
    "score_rows",
    "to_eval_row",
    "token_f1",
]
