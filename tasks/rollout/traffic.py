"""Deployment names and traffic weights: pure functions of the endpoint's state, no calls.

Deployment names are ``model-v<registry version>`` (e.g. ``model-v3``): the name says which model a deployment
serves, so a re-run can tell "already live" from "unfinished", and keeping the N previous deployments needs no
bookkeeping. (Plain ``blue``/``green`` slots cannot keep more than one previous deployment; ``v3`` alone is too
short for Azure ML, whose deployment names need 3 to 32 characters.)
"""

from __future__ import annotations

import re

from tasks.backends.base import EndpointInfo

DEPLOYMENT_PREFIX = "model-v"


def deployment_name(version: str, redeploy: int = 0) -> str:
    """``model-v3``; a forced redeploy of a version already live gets ``model-v3-1``, ``model-v3-2``..."""
    return f"{DEPLOYMENT_PREFIX}{version}" + (f"-{redeploy}" if redeploy else "")


_NAME = re.compile(rf"^{DEPLOYMENT_PREFIX}(\d+)(?:-(\d+))?$")


def version_of(name: str) -> int | None:
    """The registry version a deployment name stands for, or None for a name we did not make."""
    match = _NAME.match(name)
    return int(match.group(1)) if match else None


def rollout_order(name: str) -> tuple[int, int] | None:
    """(version, redeploy) of a deployment name we made, in the order rollouts created them; None otherwise."""
    match = _NAME.match(name)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


def fresh_name(endpoint: EndpointInfo | None, version: str) -> str:
    """A deployment name for ``version`` after every one the endpoint has of it, so that names sort in the order
    rollouts created them (reconcile tells a kept previous deployment from an unfinished one by that order)."""
    orders = [rollout_order(d.name) for d in endpoint.deployments] if endpoint else []
    taken = [order[1] for order in orders if order is not None and order[0] == int(version)]
    return deployment_name(version, max(taken) + 1 if taken else 0)


def deployments_of(endpoint: EndpointInfo | None, version: str) -> set[str]:
    if endpoint is None:
        return set()
    return {d.name for d in endpoint.deployments if version_of(d.name) == int(version)}


def live_traffic(endpoint: EndpointInfo | None) -> dict[str, int]:
    """Traffic weights without the zero entries."""
    return {} if endpoint is None else {k: int(v) for k, v in endpoint.traffic.items() if int(v) > 0}


def is_live(endpoint: EndpointInfo | None, version: str) -> bool:
    """True when this model version already takes all traffic on one ready deployment."""
    if endpoint is None or not version.isdigit():
        return False
    traffic = live_traffic(endpoint)
    ready = {d.name for d in endpoint.deployments if d.state == "ready"}
    return len(traffic) == 1 and next(iter(traffic)) in ready & deployments_of(endpoint, version)


def split_traffic(previous: dict[str, int], new: str, percent: int) -> dict[str, int]:
    """Give ``new`` ``percent`` and share the rest among the previous deployments in proportion (sums to 100)."""
    previous = {k: v for k, v in previous.items() if v > 0 and k != new}
    if not previous or percent >= 100:
        return {new: 100}
    rest = 100 - percent
    total = sum(previous.values())
    exact = {k: rest * v / total for k, v in previous.items()}
    shares = {k: int(x) for k, x in exact.items()}
    # Largest remainder, so the integer weights still sum to 100.
    for k in sorted(exact, key=lambda k: exact[k] - shares[k], reverse=True)[: rest - sum(shares.values())]:
        shares[k] += 1
    return {**{k: v for k, v in shares.items() if v > 0}, new: percent}


def full_traffic(endpoint: EndpointInfo | None, weights: dict[str, int]) -> dict[str, int]:
    """Weights for every existing deployment (zeros included), so replace and merge semantics agree."""
    names = [d.name for d in endpoint.deployments] if endpoint else []
    return {**dict.fromkeys(names, 0), **weights}


__all__ = [
    "DEPLOYMENT_PREFIX",
    "deployment_name",
    "deployments_of",
    "fresh_name",
    "full_traffic",
    "is_live",
    "live_traffic",
    "rollout_order",
    "split_traffic",
    "version_of",
]
