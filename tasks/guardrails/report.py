"""The summary's rollout table: one row per traffic step, both deployments' numbers side by side."""

from __future__ import annotations

from typing import Any


def _pair(step: dict[str, Any], field: str, fmt: str, scale: float = 1.0) -> str:
    def one(who: str) -> str:
        value = (step.get(who) or {}).get(field)
        if value is None:
            return "-"
        return format(value * scale if scale != 1.0 else value, fmt)

    # The champion's earlier window (it takes no traffic at 100%) is marked, so nobody reads it as this one's.
    return f"{one('candidate')} / {one('champion')}" + (" (earlier)" if step.get("champion_earlier") else "")


def _traffic(weights: dict[str, int] | None) -> str:
    return ", ".join(f"{k} {v}%" for k, v in sorted((weights or {}).items())) or "none"


def _verdict(step: dict[str, Any]) -> str:
    if step.get("passed"):
        return "passed"
    alarm = (step.get("verdict") or {}).get("alarm")
    return f"**rolled back** ({alarm})" if alarm else "**rolled back**"


def step_table(steps: list[dict[str, Any]]) -> list[str]:
    """Markdown rows: traffic, requests seen per deployment, error rate, p95 per token, ended share, verdict
    (new / champion in each cell), who decided (live traffic or the synthetic probes) and for how long it baked.
    Steps judged by the probes alone have no live numbers."""
    if not steps:
        return []
    lines = [
        "| step | traffic | baked (s) | decided by | requests new / champion | errors | p95 per token (ms) | ended "
        "| verdict |",
        "| --- " * 9 + "|",
    ]
    for step in steps:
        live = step.get("candidate") is not None
        decided = step.get("decided_by", "probes")
        if decided == "probes" and step.get("error_rate") is not None:
            decided = f"probes (error rate {step['error_rate']:.0%})"
        lines.append(
            f"| {step['percent']}% | {_traffic(step.get('traffic'))} | {step.get('waited_s', 0):.0f} | {decided} | "
            + (
                f"{_pair(step, 'requests', 'd')} | {_pair(step, 'error_rate', '.1%')} | "
                f"{_pair(step, 'p95_s_per_token', '.1f', 1000.0)} | {_pair(step, 'ended_share', '.0%')} | "
                if live
                else "- | - | - | - | "
            )
            + f"{_verdict(step)} |"
        )
    return lines


def step_line(step: dict[str, Any]) -> str:
    """One bullet per step: passed or why not, and what decided it (live traffic or the probes, and why)."""
    line = f"- step {step['percent']}%: {'passed' if step['passed'] else step['reason']}"
    if step.get("error_rate") is not None:
        line += f" (error rate {step['error_rate']:.0%})"
    if step.get("passed") and step.get("note"):
        line += f"; {step['note']}"
    return line


__all__ = ["step_line", "step_table"]
