"""The promotion gate: promote the candidate only if it is no worse than the champion, and say why.

Both sides come from :func:`tasks.evaluate.evaluate_model` on the same test split. Lower is
better for both metrics (loss, perplexity). The tolerance is relative: 0.02 lets the candidate be at most 2%
worse. A candidate whose replies do not end is refused whatever its loss (a model that never stops generating is
the commonest complaint about fine-tuned Phi-3). A candidate that already is the champion (the same job on the
same data, an unchanged re-run) passes without a comparison.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from prefect import get_run_logger, task

from tasks.config import GateConfig
from tasks.evaluate import EvalResult


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    metric: str
    candidate_value: float
    champion_value: float | None
    tolerance: float
    threshold: float | None  # the largest candidate value that passes
    candidate_ended_share: float
    champion_label: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(
    candidate: EvalResult,
    champion: EvalResult | None,
    config: GateConfig,
    *,
    candidate_version: str | None = None,
    champion_version: str | None = None,
) -> GateDecision:
    """Compare two evaluations on ``config.metric``; with no champion, the candidate passes on its own merits; a
    candidate whose version is the champion's passes as it is."""
    value = candidate.metric(config.metric)
    ended = candidate.ended_share
    common = {"metric": config.metric, "candidate_value": value, "tolerance": config.tolerance}
    if candidate_version is not None and candidate_version == champion_version:
        return GateDecision(
            True,
            f"the candidate v{candidate_version} is already the champion (same job, same data)",
            champion_value=None,
            threshold=None,
            candidate_ended_share=ended,
            champion_label=f"champion v{champion_version}",
            **common,
        )
    if ended < config.min_ended_share:
        return GateDecision(
            False,
            f"only {ended:.0%} of the candidate's test replies ended with the end token before the limit "
            f"(gate.min_ended_share is {config.min_ended_share:.0%}): the model does not stop generating",
            champion_value=champion.metric(config.metric) if champion else None,
            threshold=None,
            candidate_ended_share=ended,
            champion_label=champion.label if champion else None,
            **common,
        )
    if champion is None:
        return GateDecision(
            True,
            f"no champion yet: the candidate ({config.metric} {value:.4f}) becomes the first",
            champion_value=None,
            threshold=None,
            candidate_ended_share=ended,
            **common,
        )
    if champion.manifest_sha256 != candidate.manifest_sha256:
        raise ValueError(
            "the gate was given evaluations on different test splits; evaluate the champion on the candidate's data"
        )
    reference = champion.metric(config.metric)
    threshold = reference * (1.0 + config.tolerance)
    promote = value <= threshold
    verdict = "no worse than" if promote else "worse than"
    reason = (
        f"candidate {config.metric} {value:.4f} is {verdict} {champion.label} {reference:.4f} "
        f"within {config.tolerance:.1%} (threshold {threshold:.4f})"
    )
    return GateDecision(
        promote,
        reason,
        champion_value=reference,
        threshold=threshold,
        candidate_ended_share=ended,
        champion_label=champion.label,
        **common,
    )


@task(name="gate", persist_result=False)
def gate_task(
    candidate: dict[str, Any],
    champion: dict[str, Any] | None,
    config: GateConfig,
    candidate_version: str | None = None,
    champion_version: str | None = None,
) -> dict[str, Any]:
    decision = decide(
        EvalResult.from_dict(candidate),
        EvalResult.from_dict(champion) if champion else None,
        config,
        candidate_version=candidate_version,
        champion_version=champion_version,
    )
    get_run_logger().info("gate: %s: %s", "PROMOTE" if decision.promote else "REJECT", decision.reason)
    return decision.to_dict()


__all__ = ["GateDecision", "decide", "gate_task"]
