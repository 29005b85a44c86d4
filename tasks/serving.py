"""Every run ends with the champion verified as serving, whatever the gate decided.

After the gate (and the rollout, when there was one) the run reconciles the endpoint to the ``champion`` alias:
the endpoint is created or started when it is down (on the local backend a reboot stops the server), the
champion's deployment is created when the endpoint has none that is ready, and traffic goes to it; the flow's
unpinned smoke test then proves users get answers. When it cannot, the run fails with the reason in one sentence.
:class:`ServingReport` lists what was checked and done, for the summary: never what was assumed.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.backends.base import Backend, BackendError, ModelVersion
from tasks.config import Settings
from tasks.rollout import CHAMPION, fresh_name, full_traffic, live_traffic, reconcile, version_of

_LOG = logging.getLogger("finetune_phi.serving")


class ChampionNotServing(BackendError):
    """The champion could not be brought back to serving, or it answered its smoke test wrongly."""


@dataclass
class ServingReport:
    champion: str | None  # the champion's version; None: no rollout ever completed, nothing to serve
    deployment: str | None = None
    checked: list[str] = field(default_factory=list)  # what was looked at and what it showed or what was done

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ready_champion_deployment(backend: Backend, champion: ModelVersion) -> str | None:
    endpoint = backend.get_endpoint()
    if endpoint is None:
        return None
    traffic = live_traffic(endpoint)
    ready = [
        d.name for d in endpoint.deployments if d.state == "ready" and version_of(d.name) == int(champion.version)
    ]
    return max(ready, key=lambda n: traffic.get(n, 0), default=None)


def ensure_champion_serving(backend: Backend, settings: Settings) -> ServingReport:
    """Bring the endpoint back to the champion (the smoke test follows in the flow); raises
    :class:`ChampionNotServing` with the reason when it cannot."""
    champion = backend.get_model_by_alias(CHAMPION)
    if champion is None or not champion.version.isdigit():
        return ServingReport(None, checked=["no champion yet (no rollout ever completed): nothing to serve"])
    report = ServingReport(champion.version)
    was_up = _endpoint_answers(backend)
    try:
        backend.ensure_endpoint()
    except BackendError as exc:
        raise ChampionNotServing(f"the endpoint could not be started for champion v{champion.version}: {exc}") from exc
    report.checked.append("endpoint up" if was_up else "endpoint was down: started it")
    actions = reconcile(backend, champion, settings).actions
    report.checked += [f"reconciled: {action}" for action in actions]
    name = _ready_champion_deployment(backend, champion)
    if name is None:
        name = _deploy_champion(backend, champion, settings)
        report.checked.append(f"champion v{champion.version} had no ready deployment: created {name}")
    endpoint = backend.get_endpoint()
    if endpoint is not None and live_traffic(endpoint) != {name: 100}:
        backend.set_traffic(full_traffic(endpoint, {name: 100}))
        report.checked.append(f"traffic set to {{{name}: 100}}")
        # Now that the champion serves again, what is left broken (its old failed deployment) can go.
        report.checked += [f"reconciled: {action}" for action in reconcile(backend, champion, settings).actions]
    else:
        report.checked.append(f"deployment {name} of champion v{champion.version} ready with all traffic")
    report.deployment = name
    return report


def _endpoint_answers(backend: Backend) -> bool:
    try:
        return backend.get_endpoint() is not None
    except BackendError:
        return False


def _deploy_champion(backend: Backend, champion: ModelVersion, settings: Settings) -> str:
    """A fresh deployment of the champion (its old one is gone or broken), ready, before traffic moves to it."""
    endpoint = backend.get_endpoint()
    name = fresh_name(endpoint, champion.version)
    try:
        backend.create_deployment(name, champion)
        info = backend.wait_deployment_ready(name, settings.rollout.ready_timeout_s)
        if info.state != "ready":
            raise BackendError(f"deployment {name} is {info.state}: {info.error or 'no reason given'}")
    except Exception as exc:  # a missing model folder surfaces as the registry's or the loader's own error
        try:  # a failed deployment must not linger: the next run would find it half-made
            backend.delete_deployment(name)
        except Exception as cleanup:
            _LOG.warning("could not delete the failed deployment %s (%s)", name, cleanup)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ChampionNotServing(
            f"champion v{champion.version} cannot be served again: deploying it as {name} failed "
            f"({type(exc).__name__}: {reason}), so its model files are gone or broken; restore them, or train and "
            "promote a new model"
        ) from exc
    return name


@task(name="verify-champion-serving", cache_policy=NO_CACHE, persist_result=False)
def verify_champion_serving_task(backend: Backend, settings: Settings) -> dict[str, Any]:
    report = ensure_champion_serving(backend, settings)
    get_run_logger().info(
        "champion %s serving on %s: %s",
        f"v{report.champion}" if report.champion else "(none)", report.deployment or "-", "; ".join(report.checked),
    )  # fmt: skip
    return report.to_dict()


__all__ = ["ChampionNotServing", "ServingReport", "ensure_champion_serving", "verify_champion_serving_task"]
