"""The run summary's markdown, from the plain dicts the steps return."""

from __future__ import annotations

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


def test_summary_has_the_gate_numbers_traffic_mirror_and_how_to_chat() -> None:
    chat = how_to_chat("http://127.0.0.1:8765/v1", "http://127.0.0.1:8765/score")
    text = render_summary(
        dataset={"sha256": "7343f8decb99e93b", "counts": {"train": 249, "test": 62}},
        training={"job_id": "train-abc", "metrics": {"eval_loss": 0.47, "steps": 300}},
        candidate=None,
        champion=None,
        gate=GATE,
        version="2",
        rollout=ROLLOUT,
        smoke=None,
        chat=chat,
    )
    assert "decision: **PROMOTE**" in text and "candidate 0.4700, champion 0.5000, tolerance 2.0%" in text
    assert "traffic before: " in text and "model-v1" in text and "retired: model-v1" in text
    assert "mirrored 10% of live traffic to `model-v2` for 300 s before its smoke test" in text
    assert "finetune-phi endpoint keys" in text and "--print-env" in text
