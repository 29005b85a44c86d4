"""Bring the endpoint back to what the ``champion`` alias says, and retire old deployments.

A crash mid-rollout leaves traffic split and a deployment nobody owns; the alias only moves after a rollout
completed, so it is the truth the next run repairs the endpoint to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tasks.backends.base import Backend, ModelVersion
from tasks.config import Settings
from tasks.rollout.traffic import deployments_of, full_traffic, live_traffic, rollout_order, version_of


@dataclass
class ReconcileReport:
    actions: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.actions)


def reconcile(backend: Backend, champion: ModelVersion | None, settings: Settings) -> ReconcileReport:
    """Make the endpoint agree with the ``champion`` alias after a crash; a no-op on a consistent endpoint.

    Consistent means: all traffic on the champion's ready deployment, and no deployment newer than the champion
    (those are unfinished rollouts) or in a failed state.
    """
    report = ReconcileReport()
    endpoint = backend.get_endpoint()
    if endpoint is None:
        return report
    states = {d.name: d.state for d in endpoint.deployments}
    traffic_now = live_traffic(endpoint)
    candidates = [n for n in deployments_of(endpoint, champion.version) if states[n] == "ready"] if champion else []
    # Of several deployments of the champion's version (a redeploy cut short), keep the one with most traffic.
    champion_name = max(candidates, key=lambda n: (traffic_now.get(n, 0), -len(n)), default=None)

    if champion_name:
        if live_traffic(endpoint) != {champion_name: 100}:
            backend.set_traffic(full_traffic(endpoint, {champion_name: 100}))
            report.actions.append(f"traffic {live_traffic(endpoint)} -> {{{champion_name}: 100}}")
        champion_order = rollout_order(champion_name)
        for name, state in states.items():
            # Created after the champion's deployment: an unfinished rollout. An older deployment of the same
            # version (the one a forced redeploy replaced) is a kept previous one: retire_old's keep_previous rules.
            order = rollout_order(name)
            unfinished = order is not None and champion_order is not None and order > champion_order
            if name != champion_name and (unfinished or state in ("failed", "creating")):
                backend.delete_deployment(name)
                report.actions.append(f"deleted {name} ({'unfinished rollout' if unfinished else state})")
        return report

    if champion is None:
        # No rollout ever completed: whatever exists is left over from an unfinished first rollout.
        ours = [name for name in states if version_of(name) is not None]
        if ours and live_traffic(endpoint):
            backend.set_traffic(full_traffic(endpoint, {}))
            report.actions.append("traffic cleared (no champion yet)")
        for name in ours:
            backend.delete_deployment(name)
            report.actions.append(f"deleted {name} (unfinished first rollout)")
        return report

    # The champion's deployment is gone or broken: keep traffic on ready deployments only, and say so.
    ready = {n for n, s in states.items() if s == "ready"}
    traffic = live_traffic(endpoint)
    if any(n not in ready for n in traffic) and ready:
        keep = max(ready, key=lambda n: version_of(n) or -1)
        backend.set_traffic(full_traffic(endpoint, {keep: 100}))
        report.actions.append(f"champion deployment {champion_name} missing; traffic -> {{{keep}: 100}}")
    for name, state in states.items():
        if state in ("failed", "creating") and name not in live_traffic(backend.get_endpoint()):
            backend.delete_deployment(name)
            report.actions.append(f"deleted {name} ({state})")
    return report


def retire_old(backend: Backend, live: str, keep: int, settings: Settings) -> list[str]:
    """Delete our zero-traffic deployments beyond the ``keep`` newest ones (never the live one)."""
    endpoint = backend.get_endpoint()
    if endpoint is None:
        return []
    traffic = live_traffic(endpoint)
    old = sorted(
        (d.name for d in endpoint.deployments if d.name != live and d.name not in traffic and version_of(d.name)),
        key=lambda n: rollout_order(n) or (0, 0),
        reverse=True,
    )
    retired = old[keep:]
    for name in retired:
        backend.delete_deployment(name)
    return retired


__all__ = ["ReconcileReport", "reconcile", "retire_old"]
