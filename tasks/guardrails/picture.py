"""The rollout's picture: each deployment's live error rate, p95 latency per token and traffic share over time,
the steps and the alarm marked; a PNG in ``<state_dir>/rollouts/`` and an image artifact (key
``rollout-live-metrics``, so the Prefect UI keeps a history)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tasks.config import Settings
from tasks.guardrails.bake import Sample

PICTURE_KEY = "rollout-live-metrics"
_LOG = logging.getLogger("finetune_phi.guardrails")


def _series(samples: list[Sample], deployment: str, field: str, scale: float = 1.0) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for sample in samples:
        value = (sample.stats.get(deployment) or {}).get(field)
        if value is not None:
            xs.append(sample.t)
            ys.append(value * scale)
    return xs, ys


def draw(samples: list[Sample], alarm: dict[str, Any] | None, path: Path, title: str) -> Path:
    """Write the picture of ``samples`` (the bakes' checks) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    deployments = sorted({name for s in samples for name in (*s.stats, *s.traffic)})
    fig, axes = plt.subplots(3, 1, figsize=(9, 7.5), sharex=True)
    panels = (
        ("error rate (%)", "error_rate", 100.0),
        ("p95 latency per token (ms)", "p95_s_per_token", 1000.0),
    )
    for axis, (label, field, scale) in zip(axes[:2], panels, strict=False):
        for name in deployments:
            xs, ys = _series(samples, name, field, scale)
            if xs:
                axis.plot(xs, ys, marker="o", markersize=4, label=name)
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    for name in deployments:
        axes[2].step([s.t for s in samples], [s.traffic.get(name, 0) for s in samples], where="post", label=name)
    axes[2].set_ylabel("traffic (%)")
    axes[2].set_ylim(-5, 105)
    axes[2].set_xlabel("seconds since the first traffic step")
    axes[2].grid(alpha=0.3)
    starts = [s for i, s in enumerate(samples) if i == 0 or samples[i - 1].percent != s.percent]
    for axis in axes:
        for start in starts:
            axis.axvline(start.t, color="grey", linestyle=":", linewidth=1)
        if alarm is not None:
            axis.axvline(alarm["t"], color="red", linewidth=2)
    for start in starts:
        axes[0].annotate(f"{start.percent}%", (start.t, 1), xycoords=("data", "axes fraction"), va="top")
    if alarm is not None:
        axes[0].annotate(
            f"alarm: {alarm['alarm']}", (alarm["t"], 0.5), xycoords=("data", "axes fraction"), color="red"
        )
    # With no live requests in a bake the metric panels are empty; the traffic panel always names every deployment.
    legend_axis = axes[0] if axes[0].get_legend_handles_labels()[0] else axes[2]
    legend_axis.legend(loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def publish_rollout_picture(watch: Any, result: Any, settings: Settings) -> dict[str, Any] | None:
    """Draw and publish the picture of a rollout's bakes; the live record for the result. Never raises: a picture
    that cannot be drawn must not fail a rollout (or hide why it failed)."""
    if not watch.samples:
        return None
    live: dict[str, Any] = {"samples": [asdict(s) for s in watch.samples], "alarm": watch.alarm, "picture": None}
    try:
        from prefect.artifacts import create_image_artifact

        from tasks.state import state_paths
        from tasks.summary import image_url

        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = state_paths(settings.state_dir).root / "rollouts" / f"{result.deployment}-{stamp}.png"
        title = f"rollout of {result.deployment} ({result.strategy or settings.rollout.strategy})"
        draw(watch.samples, watch.alarm, path, title)
        live["picture"] = str(path)
        description = f"live error rate, p95 per token and traffic share during the rollout of {result.deployment}"
        create_image_artifact(image_url(path), key=PICTURE_KEY, description=description)
    except Exception as exc:
        _LOG.warning("could not draw or publish the rollout's picture (%s: %s)", type(exc).__name__, exc)
    return live


__all__ = ["PICTURE_KEY", "draw", "publish_rollout_picture"]
