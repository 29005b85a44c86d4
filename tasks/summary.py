"""The run summary (a markdown artifact), the loss-curve image artifact, and the "how to chat" text.

The summary is what a person reads in the Prefect UI after a run: what data went in, how training went, what
the gate decided and why (both sides' numbers), which model version serves, traffic before and after, the
smoke test, and how to talk to the model. Keys never appear: commands read them from the keys file.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_image_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks.guardrails.picture import PICTURE_KEY
from tasks.guardrails.report import step_line, step_table

SUMMARY_KEY = "finetune-run-summary"
LOSS_CURVE_KEY = "loss-curve"
# A data: URI keeps the image in the artifact itself (the UI cannot read a local file); larger files get a link.
MAX_INLINE_IMAGE_BYTES = 400_000


def how_to_chat(
    openai_base_url: str,
    scoring_uri: str,
    model: str = "default",
    config: str | None = None,
    chat_page_url: str | None = None,
) -> str:
    """Copy-paste commands for the browser, the OpenAI client, curl on /score and Prompt flow. The key is read,
    never shown."""
    extra = f" --config {config}" if config and config != "configs/local.yaml" else ""
    # `finetune-phi endpoint keys` prints "primary: <key>" lines; the key goes straight into the header.
    key_cmd = f"finetune-phi endpoint keys{extra} | sed -n 's/^primary: //p'"
    key = f"$({key_cmd})"
    browser = (
        [f"In the browser: {chat_page_url} (it asks once for the key that `finetune-phi endpoint keys{extra}` prints)"]
        if chat_page_url
        else []
    )
    return "\n".join(
        [
            *browser,
            "OpenAI client (any OpenAI-compatible tool works the same way):",
            f'  OPENAI_API_KEY="{key}" python -c "from openai import OpenAI; '
            f"print(OpenAI(base_url='{openai_base_url}').chat.completions.create(model='{model}', "
            f"messages=[{{'role':'user','content':'What is a Prefect flow?'}}]).choices[0].message.content)\"",
            "curl, with the sample's body on /score:",
            f'  curl -s {scoring_uri} -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\',
            '    -d \'{"input_data": ["What is a Prefect flow?"], "params": {"max_new_tokens": 64}}\'',
            "Prompt flow (chat flow in flow_chat/):",
            f"  finetune-phi chat-connection{extra} && \\",
            f'    eval "$(finetune-phi chat-connection{extra} --print-env)" && \\',
            "    pf flow test --flow flow_chat --inputs question='What is a Prefect flow?'",
        ]
    )


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


# The dataset report's counts, in reading order, with the words people use; keys not listed follow as they are.
COUNT_LABELS = {
    "input": "rows read",
    "invalid": "invalid",
    "valid": "valid",
    "duplicates": "duplicates removed",
    "unique": "kept",
    "train": "train",
    "test": "test",
}
# Training metrics shown, each with its label and how to print it.
TRAINING_METRICS = {
    "train_loss": ("train loss", "{:.3f}"),
    "eval_loss": ("eval loss", "{:.3f}"),
    "eval_perplexity": ("eval perplexity", "{:.2f}"),
    "tokens_per_second": ("tokens per second", "{:,.0f}"),
    "steps": ("steps", "{:,}"),
    "wall_time_s": ("wall time", "{:.1f} s"),
}


def _number(value: Any, pattern: str) -> str:
    if value is None:
        return "-"
    try:
        return pattern.format(value)
    except (TypeError, ValueError):
        return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table; pipes and line breaks inside a cell are escaped so the table keeps its shape."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


def _counts_table(counts: dict[str, Any]) -> list[str]:
    keys = [k for k in COUNT_LABELS if k in counts] + [k for k in counts if k not in COUNT_LABELS]
    return _table([COUNT_LABELS.get(k, k.replace("_", " ")) for k in keys], [[f"{counts[k]:,}" for k in keys]])


def _rejected_line(rejected: dict[str, Any]) -> str:
    if not rejected:
        return "- rejected rows: none"
    parts = [f"{count:,} {reason.replace('_', ' ')}" for reason, count in rejected.items()]
    return f"- rejected rows: {', '.join(parts)}"


def _training_table(metrics: dict[str, Any]) -> list[str]:
    rows = [
        [label, _number(metrics[name], pattern)]
        for name, (label, pattern) in TRAINING_METRICS.items()
        if name in metrics
    ]
    return _table(["metric", "value"], rows) if rows else []


def _traffic(weights: dict[str, int] | None) -> str:
    return ", ".join(f"{k} {v}%" for k, v in sorted((weights or {}).items())) or "none"


def _rollout_step_lines(rollout: dict[str, Any]) -> list[str]:
    """Reconcile, mirror, traffic steps and retired deployments: the same for a rollout that failed or not."""
    lines = []
    if rollout.get("reconcile"):
        lines.append(f"- reconciled first: {'; '.join(rollout['reconcile'])}")
    if rollout.get("mirror"):
        mirror = rollout["mirror"]
        lines.append(
            f"- mirrored {mirror['percent']}% of live traffic to `{mirror['deployment']}` for "
            f"{mirror['duration_s']:.0f} s before its smoke test"
        )
    if rollout.get("strategy"):
        lines.append(f"- strategy: {rollout['strategy']}")
    lines += [step_line(step) for step in rollout.get("steps", [])]
    if any(step.get("candidate") for step in rollout.get("steps", [])):
        lines += ["", *step_table(rollout["steps"]), ""]
    alarm = (rollout.get("live") or {}).get("alarm")
    if alarm:
        lines.append(f"- alarm: {alarm['reason']}")
    if (rollout.get("live") or {}).get("picture"):
        lines.append(f"- picture (artifact `{PICTURE_KEY}`): {rollout['live']['picture']}")
    if rollout.get("retired"):
        lines.append(f"- retired: {', '.join(rollout['retired'])}")
    return lines


def _failed_rollout_lines(failure: str, rollout: dict[str, Any] | None) -> list[str]:
    """The heading and the state the rollback left; the steps that ran follow as for a rollout that succeeded."""
    lines = ["## Rollout failed, rolled back", f"- reason: {failure}"]
    rollback = (rollout or {}).get("rollback")
    if rollout is None or rollback is None:
        # Failed before any deployment was made (e.g. a configuration the backend refuses): nothing to roll back.
        return lines
    lines.append(f"- traffic before the rollout: {_traffic(rollout['traffic_before'])}")
    if rollback["error"] is not None:
        lines.append(f"- traffic after the rollback: could not be read ({rollback['error']}); the next run reconciles")
        return lines
    lines.append(f"- traffic after the rollback: {_traffic(rollback['traffic'])}")
    new = rollout["deployment"]
    left = "still there: the next run's reconcile step deletes it" if new in rollback["deployments"] else "deleted"
    lines.append(f"- new deployment `{new}`: {left}")
    before, after = rollout.get("previous_champion"), rollback["champion"]
    if before == after:
        lines.append(f"- champion unchanged: {f'v{after}' if after else 'none yet'}")
    else:  # the alias hook failed: say so loudly rather than claim it is unchanged
        lines.append(f"- champion alias moved: now {after or 'none'}, was {before or 'none'}; check the registry")
    return lines


def _serving_lines(serving: dict[str, Any] | None, not_serving: str | None) -> list[str]:
    """What the end-of-run check found and did; a champion that is not serving says so first."""
    lines = ["## Serving (checked at the end of the run)"]
    if not_serving is not None:
        lines.append(f"- **NOT SERVING**: {not_serving}")
    if serving is not None:
        if serving.get("champion"):
            lines.append(f"- champion v{serving['champion']} on `{serving.get('deployment') or '-'}`")
        lines += [f"- {item}" for item in serving.get("checked", [])]
    return [*lines, ""]


def render_summary(
    *,
    dataset: dict[str, Any],
    training: dict[str, Any],
    candidate: dict[str, Any] | None,
    champion: dict[str, Any] | None,
    gate: dict[str, Any] | None,
    version: str | None,
    rollout: dict[str, Any] | None,
    smoke: dict[str, Any] | None,
    chat: str | None,
    cached: dict[str, bool] | None = None,
    failure: str | None = None,
    chat_page_url: str | None = None,
    serving: dict[str, Any] | None = None,
    not_serving: str | None = None,
) -> str:
    """Markdown for the run-summary artifact; every argument is a plain dict from one step.

    ``failure`` is the reason a rollout failed (the flow run fails with it); ``rollout`` is then what the rollout
    did up to the failure, with ``rollout["rollback"]`` as read back after the rollback, when it got that far.
    ``chat_page_url``: the endpoint's browser chat page, linked at the top (only when the endpoint serves one).
    ``serving`` is what the check that the champion serves looked at and did (:mod:`tasks.serving`);
    ``not_serving`` the reason it is not serving, when it could not be brought back."""
    cached = cached or {}
    metrics = training.get("metrics", {})
    lines = ["# finetune-phi run summary", ""]
    training_table = _training_table(metrics)
    if chat_page_url:
        lines += [f"**Chat with the model in the browser: [{chat_page_url}]({chat_page_url})**", ""]
    lines += [
        "## Dataset" + (" (cached)" if cached.get("data") else ""),
        *_counts_table(dataset.get("counts") or {}),
        "",
        _rejected_line(dataset.get("rejected") or {}),
        f"- manifest sha256 `{dataset.get('sha256', '-')[:16]}`",
        "",
        "## Training" + (" (cached: same data, recipe and code)" if cached.get("training") else ""),
        f"- job `{training.get('job_id', '-')}` ({training.get('url') or 'no URL'})",
        "",
        *([*training_table, ""] if training_table else []),
    ]
    if candidate is not None:
        rows = []
        for row in (candidate, champion):
            if row:
                ended = "-" if row.get("reused") else f"{row.get('ended_share', 0):.0%}"
                latency = "-" if row.get("reused") else _number(row.get("mean_latency_s"), "{:.2f}")
                label = row["label"] + (" (recorded)" if row.get("reused") else "")
                rows.append(
                    [label, _number(row["loss"], "{:.3f}"), _number(row["perplexity"], "{:.2f}"), ended, latency]
                )
        lines += [
            "## Evaluation (same function, same test split for both)",
            *_table(["model", "loss", "perplexity", "replies that end", "mean latency (s)"], rows),
            "",
        ]
    if gate is not None:
        verdict = "PROMOTE" if gate["promote"] else "REJECT"
        lines += [
            "## Gate",
            f"- decision: **{verdict}**: {gate['reason']}",
            f"- metric {gate['metric']}: candidate {_fmt(gate['candidate_value'])}, "
            f"champion {_fmt(gate['champion_value'])}, tolerance {gate['tolerance']:.1%}",
            "",
        ]
    lines += ["## Model", f"- registered version: {version or '-'}", ""]
    if failure is not None:
        lines += [*_failed_rollout_lines(failure, rollout), *_rollout_step_lines(rollout or {}), ""]
    elif rollout is not None:
        lines += [
            "## Rollout (blue/green)",
            f"- deployment `{rollout['deployment']}`" + (" (already live: skipped)" if rollout["skipped"] else ""),
            f"- traffic before: {_traffic(rollout['traffic_before'])}",
            f"- traffic after: {_traffic(rollout['traffic_after'])}",
            *_rollout_step_lines(rollout),
            "",
        ]
    if serving is not None or not_serving is not None:
        lines += _serving_lines(serving, not_serving)
    if smoke is not None:
        rows = [
            [
                case["prompt"],
                (case.get("reply") or "")[:80],
                str(case.get("finish_reason") or "-"),
                _number(case.get("latency_s"), "{:.2f}"),
                "ok" if case.get("problem") is None else case["problem"],
            ]
            for case in smoke.get("cases", [])
        ]
        lines += ["## Smoke test", *_table(["prompt", "reply", "finish", "latency (s)", "result"], rows), ""]
    if chat:
        lines += ["## How to chat", "```", chat, "```", ""]
    return "\n".join(lines)


def image_url(path: Path) -> str:
    """A data: URI for a small PNG (shown inline by the Prefect UI), else a file:// URL."""
    data = path.read_bytes()
    if len(data) <= MAX_INLINE_IMAGE_BYTES:
        return "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return path.resolve().as_uri()


@task(name="publish-summary", cache_policy=NO_CACHE, persist_result=False)
def publish_summary_task(markdown: str, loss_curve: str | None) -> str:
    """The markdown summary artifact, and the loss curve as an image artifact when the job drew one."""
    create_markdown_artifact(markdown, key=SUMMARY_KEY, description="finetune-phi run summary")
    if loss_curve and Path(loss_curve).is_file():
        url = image_url(Path(loss_curve))
        create_image_artifact(url, key=LOSS_CURVE_KEY, description=f"training loss curve ({loss_curve})")
    return markdown


__all__ = ["how_to_chat", "image_url", "publish_summary_task", "render_summary"]
