"""The product: one flow run takes a chat dataset to a live, tested model.

    prepare data -> train (submit + wait) -> register -> evaluate -> gate -> roll out (blue/green, baked with
    live alarms) -> the champion verified as serving (started, reconciled, smoke-tested) -> summary

Every step is a Prefect task over a plain function in ``tasks/``; every call to jobs, registry and endpoint goes
through :class:`tasks.backends.base.Backend`, so the same flow drives ``local`` and ``azureml``. The two expensive
steps are cached on content hashes (:mod:`tasks.caching`): an unchanged re-run skips data, training and, as the
same model is already live with all traffic, deployment. ``refresh=["data", "training", "deploy"]`` forces a step.

The model is registered (alias ``candidate``) before the gate, so rejected candidates keep their lineage in the
registry too; only a model that passed the gate and the whole rollout becomes ``champion``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow

from tasks.backends import get_backend
from tasks.backends.base import Backend, EndpointInfo
from tasks.batch_eval import maybe_evaluate_chat_flow
from tasks.caching import check_refresh
from tasks.config import Settings, load_config
from tasks.data import prepare_data_step
from tasks.evaluate import evaluate_candidate_step, evaluate_champion_task
from tasks.gate import gate_task
from tasks.preflight import preflight_task
from tasks.register import register_step
from tasks.rollout import CHAMPION, check_approval_possible, rollout_step
from tasks.serving import ChampionNotServing, verify_champion_serving_task
from tasks.smoke import SmokeTestFailed, smoke_test_task
from tasks.state import configure_environment
from tasks.summary import how_to_chat, publish_summary_task, render_summary
from tasks.train import train_step


def load_settings(config_path: str, overrides: dict[str, Any] | None) -> Settings:
    """The run's settings, with the environment (Prefect home, MLflow store) pointed at its state folder."""
    settings = load_config(config_path, overrides)
    configure_environment(settings.state_dir)
    return settings


@dataclass(frozen=True)
class Serving:
    """What serves after the rollout step: the endpoint, its smoke test, how to chat, the optional chat-flow eval,
    what the serving check looked at and did (``checked``), and why the champion is not serving (``failure``)."""

    endpoint: EndpointInfo | None
    smoke: dict[str, Any] | None = None
    chat: str | None = None
    chat_eval: dict[str, Any] | None = None
    checked: dict[str, Any] | None = None
    failure: Exception | None = None

    def endpoint_dict(self) -> dict[str, Any] | None:
        if self.endpoint is None:
            return None
        return {"scoring_uri": self.endpoint.scoring_uri, "traffic": self.endpoint.traffic}


def check_serving(
    settings: Settings, backend: Backend, config_path: str, test_path: str, rolled_back: bool
) -> Serving:
    """Whatever the gate and the rollout did, the champion must serve when the run ends, and be shown to: the
    endpoint started and reconciled to it (:mod:`tasks.serving`), then smoke-tested unpinned. Then how to chat with
    it, and the Prompt flow chat over the test split where ``evaluation.chat_flow_eval`` asks for it (not after a
    rollout that was rolled back: the run fails with that)."""
    checked: dict[str, Any] | None = None
    try:
        checked = verify_champion_serving_task(backend, settings)
        smoke = smoke_test_task(settings, None, "smoke-test") if checked["champion"] is not None else None
    except (ChampionNotServing, SmokeTestFailed) as exc:
        return Serving(backend.get_endpoint(), checked=checked, failure=exc)
    if smoke is not None and checked is not None:
        checked["checked"].append(f"unpinned smoke test passed ({len(smoke['cases'])} prompts)")
    endpoint = backend.get_endpoint()
    if rolled_back or endpoint is None or not endpoint.traffic:
        return Serving(endpoint, smoke=smoke, checked=checked)
    return Serving(
        endpoint,
        smoke=smoke,
        chat=how_to_chat(
            endpoint.openai_base_url, endpoint.scoring_uri, config=config_path, chat_page_url=endpoint.chat_page_url
        ),
        chat_eval=maybe_evaluate_chat_flow(settings, test_path),
        checked=checked,
    )


@flow(name="finetune-and-deploy")
def finetune_and_deploy(
    config_path: str = "configs/local.yaml",
    overrides: dict[str, Any] | None = None,
    refresh: list[str] | None = None,
) -> dict[str, Any]:
    """Data to a live, tested model. Returns the run's summary as a dict (also published as artifacts)."""
    settings = load_settings(config_path, overrides)
    wanted = check_refresh(refresh)
    check_approval_possible(settings)  # before training, not after it
    backend = get_backend(settings)
    preflight_task(settings, backend)  # what would stop the run later (recipe, quota, names...), before any cost

    data = prepare_data_step(settings, refresh="data" in wanted)
    dataset = data.value
    trained = train_step(settings, dataset, refresh="training" in wanted)
    training = trained.value
    version = register_step(settings, training, dataset)
    candidate, version = evaluate_candidate_step(settings, training["job_id"], version, dataset)
    champion_version = backend.get_model_by_alias(CHAMPION)
    champion = evaluate_champion_task(settings, champion_version, version, dataset)
    decision = gate_task(
        candidate, champion, settings.gate, version.version, champion_version.version if champion_version else None
    )
    rollout, failure = rollout_step(backend, version, decision, settings, force="deploy" in wanted)
    serving = check_serving(settings, backend, config_path, dataset["test_path"], rolled_back=failure is not None)

    summary = {"dataset": dataset, "training": training, "version": version.version, "candidate": candidate}
    summary.update(champion=champion, gate=decision, rollout=rollout, smoke=serving.smoke)
    markdown = render_summary(
        **summary,
        chat=serving.chat,
        cached={"data": data.cached, "training": trained.cached},
        failure=str(failure) if failure is not None else None,
        chat_page_url=serving.endpoint.chat_page_url if serving.chat and serving.endpoint else None,
        serving=serving.checked,
        not_serving=str(serving.failure) if serving.failure is not None else None,
    )
    output_dir = training.get("output_dir")
    publish_summary_task(markdown, str(Path(output_dir) / "loss_curve.png") if output_dir else None)
    if failure is not None:
        raise failure
    if serving.failure is not None:
        raise serving.failure
    states = {"data": data.state, "training": trained.state}
    return {
        **summary, "serving": serving.checked, "chat_eval": serving.chat_eval, "endpoint": serving.endpoint_dict(),
        "states": states,
    }  # fmt: skip


__all__ = ["Serving", "check_serving", "finetune_and_deploy", "load_settings"]
