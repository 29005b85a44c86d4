"""The run summary's markdown, from the plain dicts the steps return."""

from __future__ import annotations

import pickle

from tasks.rollout import Rollback, RolloutFailed, RolloutResult
from tasks.summary import how_to_chat, render_summary

ROLLOUT = {
    "deployment": "model-v2",
    "skipped": False,
    "traffic_before": {"model-v1": 100},
    "traffic_after": {"model-v2": 100},
    "reconcile": [],
    "steps": [],
    "retired": ["model-v1"],
    "mirror": {"percent": 10, "duration_s": 300.0, "deployment": "model-v2"},
}
GATE = {
    "promote": True,
    "reason": "candidate eval_loss 0.47 is no worse than champion v1 0.50 within 2.0%",
    "metric": "eval_loss",
    "candidate_value": 0.47,
    "champion_value": 0.5,
    "tolerance": 0.02,
}


def _summary(rollout: dict | None, failure: str | None = None, chat: str | None = None) -> str:
    return render_summary(
        dataset={"sha256": "7343f8decb99e93b", "counts": {"train": 249, "test": 62}},
        training={"job_id": "train-abc", "metrics": {"eval_loss": 0.47, "steps": 300}},
        candidate=None,
        champion=None,
        gate=GATE,
        version="2",
        rollout=rollout,
        smoke=None,
        chat=chat,
        failure=failure,
    )


def test_summary_has_the_gate_numbers_traffic_mirror_and_how_to_chat() -> None:
    chat = how_to_chat("http://127.0.0.1:8765/v1", "http://127.0.0.1:8765/score")
    text = _summary(ROLLOUT, chat=chat)
    assert "decision: **PROMOTE**" in text and "candidate 0.4700, champion 0.5000, tolerance 2.0%" in text
    assert "traffic before: " in text and "model-v1" in text and "retired: model-v1" in text
    assert "mirrored 10% of live traffic to `model-v2` for 300 s before its smoke test" in text
    assert "finetune-phi endpoint keys" in text and "--print-env" in text


def _failed_rollout(rollback: Rollback) -> dict:
    """A rollout of v2 that passed its 10% step, failed at 50% and was rolled back, as the flow hands it over."""
    result = RolloutResult(
        version="2",
        deployment="model-v2",
        skipped=False,
        traffic_before={"model-v1": 100},
        traffic_after={"model-v1": 100},
        steps=[{"percent": 10, "passed": True, "reason": None, "error_rate": 0.0}],
        previous_champion="1",
        rollback=rollback,
    )
    failed = RolloutFailed("rollout of model v2 rolled back (...): at 50% the pinned smoke test failed")
    failed.rollout = result
    # Prefect stores the flow run's exception as its result: the rollout must survive the round trip.
    again = pickle.loads(pickle.dumps(failed))
    assert str(again) == str(failed) and again.rollout is not None
    return again.rollout.to_dict()


def test_a_rolled_back_rollout_says_why_and_what_traffic_and_champion_it_left() -> None:
    reason = "rollout of model v2 rolled back (...): at 50% the pinned smoke test failed"
    text = _summary(_failed_rollout(Rollback({"model-v1": 100}, ["model-v1"], "1")), reason)
    section = text.split("## Rollout failed, rolled back\n", 1)[1].split("\n\n", 1)[0]
    assert f"- reason: {reason}" in section
    assert "- traffic before the rollout: model-v1 100%" in section
    assert "- traffic after the rollback: model-v1 100%" in section
    assert "- new deployment `model-v2`: deleted" in section
    assert "- champion unchanged: v1" in section
    assert "- step 10%: passed" in section
    assert "## Rollout (blue/green)" not in text and "traffic after: " not in text


def test_a_rollback_that_left_things_behind_is_not_reported_as_clean() -> None:
    left = _summary(_failed_rollout(Rollback({"model-v1": 90, "model-v2": 10}, ["model-v1", "model-v2"], "2")), "x")
    assert "traffic after the rollback: model-v1 90%, model-v2 10%" in left
    assert "`model-v2`: still there" in left and "champion alias moved: now 2, was 1" in left
    assert "champion unchanged" not in left and ": deleted" not in left
    unread = _summary(_failed_rollout(Rollback(None, [], None, "ConnectError: refused")), "x")
    assert "traffic after the rollback: could not be read (ConnectError: refused)" in unread


def test_a_rollout_refused_before_any_deployment_still_gets_the_failed_section() -> None:
    text = _summary(None, "rollout.mirror_percent is 10 but the local backend cannot mirror traffic")
    assert "## Rollout failed, rolled back\n- reason: rollout.mirror_percent is 10" in text
    assert "traffic after the rollback" not in text


def test_summary_reads_as_tables_with_readable_numbers_and_links_the_chat_page() -> None:
    text = render_summary(
        dataset={
            "sha256": "7343f8decb99e93b",
            "counts": {"input": 1311, "invalid": 2, "valid": 1309, "duplicates": 0, "unique": 1309, "train": 1047},
            "rejected": {"empty_turn": 2},
        },
        training={"job_id": "train-abc", "metrics": {"eval_loss": 0.47213, "tokens_per_second": 3192.6, "steps": 300}},
        candidate=None,
        champion=None,
        gate=None,
        version="2",
        rollout=None,
        smoke={
            "cases": [
                {"prompt": "Hi", "reply": "a | b", "finish_reason": "stop", "latency_s": 0.31234, "problem": None}
            ]
        },
        chat=how_to_chat(
            "http://127.0.0.1:8765/v1", "http://127.0.0.1:8765/score", chat_page_url="http://127.0.0.1:8765/chat"
        ),
        chat_page_url="http://127.0.0.1:8765/chat",
    )
    assert "| rows read | invalid | valid | duplicates removed | kept | train |" in text
    assert "| 1,311 | 2 | 1,309 | 0 | 1,309 | 1,047 |" in text and "- rejected rows: 2 empty turn" in text
    assert "| tokens per second | 3,193 |" in text and "| eval loss | 0.472 |" in text and "| steps | 300 |" in text
    # no raw dicts, no four-decimal throughput
    assert "{'input'" not in text and "{'empty_turn'" not in text and "3192.6000" not in text
    assert "| Hi | a \\| b | stop | 0.31 | ok |" in text  # a pipe in a reply keeps the table's shape
    assert "[http://127.0.0.1:8765/chat](http://127.0.0.1:8765/chat)" in text
    assert "In the browser: http://127.0.0.1:8765/chat" in text


def test_without_a_chat_page_the_summary_has_no_link() -> None:
    text = _summary(ROLLOUT, chat=how_to_chat("https://ep.inference.ml.azure.com/v1", "https://ep/score"))
    assert "/chat" not in text and "In the browser" not in text
