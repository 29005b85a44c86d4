"""The promotion gate compares like with like and says why."""

from __future__ import annotations

import pytest

from tasks.config import GateConfig
from tasks.evaluate import EvalResult, GenerationCheck, recorded_result
from tasks.gate import decide

ENDS = [GenerationCheck("q", "an answer", True, 5, 0.1)]
NEVER_ENDS = [GenerationCheck("q", "and and and", False, 64, 0.9)]


def _result(loss: float, label: str = "candidate v2", manifest: str = "abc", gens=ENDS) -> EvalResult:
    return EvalResult(label, manifest, loss, 2.718**loss, examples=10, tokens=500, generations=list(gens))


def test_no_champion_passes_and_says_so() -> None:
    decision = decide(_result(1.5), None, GateConfig())
    assert decision.promote
    assert "no champion" in decision.reason
    assert decision.champion_value is None


def test_within_tolerance_passes_and_beyond_fails_with_both_numbers() -> None:
    config = GateConfig(metric="eval_loss", tolerance=0.02)
    champion = _result(1.0, "champion v1")
    assert decide(_result(1.019), champion, config).promote
    rejected = decide(_result(1.03), champion, config)
    assert not rejected.promote
    assert rejected.candidate_value == pytest.approx(1.03)
    assert rejected.champion_value == pytest.approx(1.0)
    assert rejected.threshold == pytest.approx(1.02)
    assert "1.0300" in rejected.reason and "1.0000" in rejected.reason and "champion v1" in rejected.reason


def test_perplexity_metric_uses_perplexity() -> None:
    config = GateConfig(metric="perplexity", tolerance=0.0)
    decision = decide(_result(1.0), _result(1.1, "champion v1"), config)
    assert decision.promote
    assert decision.candidate_value == pytest.approx(2.718)


def test_a_model_that_never_stops_is_refused_even_with_a_better_loss() -> None:
    decision = decide(_result(0.1, gens=NEVER_ENDS), _result(2.0, "champion v1"), GateConfig(min_ended_share=0.5))
    assert not decision.promote
    assert "does not stop" in decision.reason


def test_evaluations_on_different_test_splits_are_refused() -> None:
    with pytest.raises(ValueError, match="different test splits"):
        decide(_result(1.0, manifest="aaa"), _result(1.0, "champion v1", manifest="bbb"), GateConfig())


def test_recorded_numbers_are_reused_only_on_the_same_manifest() -> None:
    tags = _result(1.25).registry_tags()
    reused = recorded_result(tags, "abc", "champion v1")
    assert reused is not None and reused.reused and reused.loss == pytest.approx(1.25)
    assert recorded_result(tags, "other-manifest", "champion v1") is None
    assert recorded_result({}, "abc", "champion v1") is None
