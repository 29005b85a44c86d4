"""Blue/green rollout with rollback, on any :class:`~tasks.backends.base.Backend`; one module per concern.

- :mod:`~tasks.rollout.traffic`: deployment names and traffic weights (pure functions);
- :mod:`~tasks.rollout.reconcile`: repair the endpoint to what the ``champion`` alias says, retire old deployments;
- :mod:`~tasks.rollout.approval`: pause for a person's approval before traffic moves;
- :mod:`~tasks.rollout.steps`: the Prefect tasks of a rollout with their ``on_rollback`` hooks;
- :mod:`~tasks.rollout.result`: what a rollout did and what its rollback left;
- :mod:`~tasks.rollout.run`: the rollout as one transaction (:func:`run_rollout`) and the flow's step.

The order of a rollout, each step a Prefect task inside one transaction:

1. reconcile: bring the endpoint back to what the ``champion`` alias says (a crash mid-rollout leaves traffic
   split and a deployment nobody owns; the alias only moves after a rollout completed);
2. create the new deployment next to the live one (traffic 0) and wait until it is ready;
3. optionally (``rollout.mirror_percent``, backends that can mirror: Azure ML) mirror that share of live traffic to
   it for ``rollout.mirror_duration_s`` (its answers are discarded: users see only the live deployment's), so it
   meets real load before any user depends on it; the mirror is dropped before live traffic moves;
4. smoke-test it pinned with the ``azureml-model-deployment`` header (after the mirror window, while still
   mirrored): no traffic moves to a deployment that failed this;
   with ``rollout.require_approval``, the flow run then pauses until a person resumes it (``await_approval``);
5. shift traffic in steps (``rollout.strategy``: the explicit ``rollout.traffic_steps``, default 10/50/100,
   ``all_at_once``, ``canary`` or ``linear``); each step bakes for ``rollout.bake_s`` (``final_bake_s`` at 100%,
   while the old deployment still exists) with live alarms on both deployments' own requests, rolling back the
   moment one fires (:mod:`tasks.guardrails`); without a bake, or with too little live traffic, a pinned smoke
   test and an error-rate check of unpinned requests (what users get at that split) decide;
6. move the ``champion`` alias; after the transaction commits, retire older deployments beyond
   ``rollout.keep_previous``.

Any failure once the new deployment exists rolls the transaction back: the ``on_rollback`` hooks restore the
previous traffic weights and delete the new deployment; the alias stays; the flow run fails with the reason.
The endpoint itself is never deleted.
"""

from tasks.rollout.approval import await_approval, check_approval_possible
from tasks.rollout.reconcile import ReconcileReport, reconcile, retire_old
from tasks.rollout.result import CHAMPION, Rollback, RolloutFailed, RolloutResult, read_rollback
from tasks.rollout.run import rollout_step, run_rollout
from tasks.rollout.steps import StepCheck, can_mirror, default_step_check
from tasks.rollout.traffic import (
    deployment_name,
    fresh_name,
    full_traffic,
    is_live,
    live_traffic,
    rollout_order,
    split_traffic,
    version_of,
)

__all__ = [
    "CHAMPION",
    "ReconcileReport",
    "Rollback",
    "RolloutFailed",
    "RolloutResult",
    "StepCheck",
    "await_approval",
    "can_mirror",
    "check_approval_possible",
    "default_step_check",
    "deployment_name",
    "fresh_name",
    "full_traffic",
    "is_live",
    "live_traffic",
    "read_rollback",
    "reconcile",
    "retire_old",
    "rollout_order",
    "rollout_step",
    "run_rollout",
    "split_traffic",
    "version_of",
]
