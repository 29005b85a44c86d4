"""The product: one flow run takes a chat dataset to a live, tested model.

    prepare data -> train (submit + wait) -> register -> evaluate -> gate -> roll out (blue/green) -> smoke test
    -> summary

Every step is a Prefect task over a plain function in ``tasks/``; every call to jobs, registry and endpoint goes
through :class:`tasks.backends.base.Backend`, so the same flow drives ``local`` and ``azureml``. The two expensive
steps are cached on content hashes (:mod:`tasks.caching`): an unchanged re-run skips data, training and, as the
same model is already live with all traffic, deployment. ``refresh=["data", "training", "deploy"]`` forces a step.

The model is registered (alias ``candidate``) before the gate, so rejected candidates keep their lineage in the
registry too; only a model that passed the gate and the whole rollout becomes ``champion``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.backends import get_backend
from tasks.backends.base import Backend, ModelVersion, TrainingJobSpec
from tasks.caching import content_key_fn, data_cache_key, evaluation_cache_key, training_cache_key
from tasks.config import Settings, load_config, normalise_overrides
from tasks.evaluate import EvalResult, evaluate_model, recorded_result
from tasks.gate import gate_task
from tasks.jobs import PollTiming, submit_training_job, wait_for_training_job
from tasks.retry import call_with_retry, prefect_delays, retry_condition_fn
from tasks.rollout import CHAMPION, RolloutFailed, check_approval_possible, run_rollout
from tasks.serving import ChampionNotServing, verify_champion_serving_task
from tasks.smoke import SmokeTestFailed, smoke_test_task
from tasks.state import configure_environment
from tasks.summary import how_to_chat, publish_summary_task, render_summary

REFRESHABLE = ("data", "training", "deploy")
CANDIDATE = "candidate"


# ------------------------------------------------------------------------------------------------ data
def prepare_data(settings: Settings) -> dict[str, Any]:
    """Run the dataset step and return its manifest as a plain dict (what the cache stores)."""
    from tasks.data import prepare_dataset

    manifest = prepare_dataset(settings.data, Path(settings.state_dir) / "data")
    return {
        "sha256": manifest.sha256,
        "train_path": str(manifest.train_path),
        "test_path": str(manifest.test_path),
        "manifest_path": str(manifest.manifest_path),
        "counts": dict(manifest.counts),
        "rejected": dict(manifest.rejected),
    }


@task(name="prepare-data", cache_key_fn=content_key_fn, persist_result=True)
def prepare_data_task(settings: Settings, content_key: str) -> dict[str, Any]:
    return prepare_data(settings)


# -------------------------------------------------------------------------------------------- training
def train(
    settings: Settings,
    dataset: dict[str, Any],
    fresh: bool = False,
    *,
    backend: Backend | None = None,
    timing: PollTiming | None = None,
) -> dict[str, Any]:
    """Submit the training job with the dataset's files and wait for it; return its id, folder and metrics.

    Both steps are Prefect tasks of ``tasks/jobs.py``; ``backend`` and ``timing`` are for tests (a fake client, a
    fake clock)."""
    backend = backend or get_backend(settings)
    spec = TrainingJobSpec(
        recipe=Path(settings.training.recipe),
        train_file=Path(dataset["train_path"]),
        eval_file=Path(dataset["test_path"]),
        manifest_sha256=dataset["sha256"],
        overrides=dict(settings.training.overrides),
        experiment=settings.registry.model_name,
        # The store the backend registers from (local: the state folder's SQLite unless registry.tracking_uri), never
        # a MLFLOW_TRACKING_URI left in the environment by another state folder: the model is registered from there.
        tracking_uri=getattr(backend, "tracking_uri", None) or settings.registry.tracking_uri,
        fresh=fresh,
    )
    # No retry loop around the submit: a transient fault fails the attempt and train_task's retries submit again
    # (the same inputs find the same job), so the attempts stay those of settings.retry.
    job = submit_training_job(backend, spec)
    job = wait_for_training_job(backend, job.job_id, settings, timing)
    metrics = call_with_retry(backend.job_metrics, job.job_id, policy=settings.retry, what="job metrics")
    return {
        "job_id": job.job_id,
        "url": job.url,
        "output_dir": str(job.output_dir) if job.output_dir else None,
        "metrics": metrics,
    }


@task(name="train-model", cache_key_fn=content_key_fn, persist_result=True, retry_condition_fn=retry_condition_fn)
def train_task(settings: Settings, dataset: dict[str, Any], content_key: str, fresh: bool = False) -> dict[str, Any]:
    return train(settings, dataset, fresh)


def training_task(settings: Settings, refresh: bool) -> Any:
    """``train_task`` as this run needs it: retries from ``settings.retry`` (transient faults only, never a training
    that failed or timed out) with our own jittered delays, and a timeout above the wait's own."""
    return train_task.with_options(
        refresh_cache=refresh,
        timeout_seconds=settings.training.timeout_s + 120,
        retries=settings.retry.attempts - 1,
        retry_delay_seconds=prefect_delays(settings.retry),
        retry_condition_fn=retry_condition_fn,
    )


# ------------------------------------------------------------------------------------ register, evaluate
@task(name="register-model", cache_policy=NO_CACHE, persist_result=False)
def register_task(settings: Settings, training: dict[str, Any], dataset: dict[str, Any]) -> ModelVersion:
    """Register the job's model (idempotent on the job) and point the ``candidate`` alias at it."""
    backend = get_backend(settings)
    tags = {"manifest_sha256": dataset["sha256"], "recipe": str(settings.training.recipe)}
    version = call_with_retry(
        backend.register_model, training["job_id"], tags, policy=settings.retry, what="register model"
    )
    call_with_retry(backend.set_alias, CANDIDATE, version, policy=settings.retry, what="set candidate alias")
    get_run_logger().info("registered %s version %s from job %s", version.name, version.version, training["job_id"])
    return version


@task(name="evaluate-candidate", cache_key_fn=content_key_fn, persist_result=True)
def evaluate_candidate_task(
    settings: Settings, version: ModelVersion, dataset: dict[str, Any], content_key: str
) -> dict[str, Any]:
    backend = get_backend(settings)
    folder = backend.model_folder(version)
    result = evaluate_model(
        folder,
        dataset["test_path"],
        dataset["sha256"],
        label=f"candidate v{version.version}",
        num_prompts=settings.evaluation.num_prompts,
        max_new_tokens=settings.evaluation.max_new_tokens,
    )
    return result.to_dict()


@task(name="evaluate-champion", cache_policy=NO_CACHE, persist_result=False)
def evaluate_champion_task(settings: Settings, champion: ModelVersion, dataset: dict[str, Any]) -> dict[str, Any]:
    """The champion's numbers on this test split: recorded ones if computed on the same manifest, else fresh."""
    label = f"champion v{champion.version}"
    recorded = recorded_result(champion.tags, dataset["sha256"], label)
    if recorded is not None:
        get_run_logger().info("reusing %s's numbers recorded on the same test split", label)
        return recorded.to_dict()
    folder = get_backend(settings).model_folder(champion)
    result = evaluate_model(
        folder,
        dataset["test_path"],
        dataset["sha256"],
        label=label,
        num_prompts=settings.evaluation.num_prompts,
        max_new_tokens=settings.evaluation.max_new_tokens,
    )
    return result.to_dict()


@task(name="record-evaluation", cache_policy=NO_CACHE, persist_result=False)
def record_evaluation_task(settings: Settings, training: dict[str, Any], evaluation: dict[str, Any]) -> ModelVersion:
    """Write the held-out numbers on the model version, so a later run on the same data can reuse them."""
    backend = get_backend(settings)
    tags = EvalResult.from_dict(evaluation).registry_tags()
    return call_with_retry(backend.register_model, training["job_id"], tags, policy=settings.retry, what="tag model")


# ------------------------------------------------------------------------------------------------ flow
def load_settings(config_path: str, overrides: dict[str, Any] | None) -> Settings:
    settings = load_config(config_path, overrides)
    configure_environment(settings.state_dir)
    return settings


def _check_refresh(refresh: list[str] | None) -> set[str]:
    wanted = set(refresh or [])
    unknown = wanted - set(REFRESHABLE)
    if unknown:
        raise ValueError(f"cannot refresh {sorted(unknown)}: choose from {', '.join(REFRESHABLE)}")
    return wanted


def _cached(state: Any) -> bool:
    return getattr(state, "name", "") == "Cached"


@flow(name="finetune-and-deploy")
def finetune_and_deploy(
    config_path: str = "configs/local.yaml",
    overrides: dict[str, Any] | None = None,
    refresh: list[str] | None = None,
) -> dict[str, Any]:
    """Data to a live, tested model. Returns the run's summary as a dict (also published as artifacts)."""
    logger = get_run_logger()
    settings = load_settings(config_path, overrides)
    wanted = _check_refresh(refresh)
    check_approval_possible(settings)  # before training, not after it
    backend = get_backend(settings)
    from tasks.data import source_fingerprint

    # Data: keyed on the source's content fingerprint and the data section.
    data_key = data_cache_key(settings, source_fingerprint(settings.data))
    data_state = prepare_data_task.with_options(refresh_cache="data" in wanted)(settings, data_key, return_state=True)
    dataset = data_state.result()
    if _cached(data_state) and not Path(dataset["train_path"]).is_file():
        logger.warning("cached dataset files are gone (%s); preparing the data again", dataset["train_path"])
        data_state = prepare_data_task.with_options(refresh_cache=True)(settings, data_key, return_state=True)
        dataset = data_state.result()

    # Training: keyed on the manifest hash, the recipe, the training code and the overrides.
    train_key = training_cache_key(settings, dataset["sha256"])
    trainer = training_task(settings, "training" in wanted)
    train_state = trainer(settings, dataset, train_key, "training" in wanted, return_state=True)
    training = train_state.result()
    if _cached(train_state) and training.get("output_dir") and not Path(training["output_dir"]).exists():
        logger.warning("cached training result points at a deleted job folder; training again")
        train_state = trainer.with_options(refresh_cache=True)(settings, dataset, train_key, return_state=True)
        training = train_state.result()

    version = register_task(settings, training, dataset)
    eval_key = evaluation_cache_key(settings, training["job_id"], dataset["sha256"])
    eval_state = evaluate_candidate_task(settings, version, dataset, eval_key, return_state=True)
    candidate = eval_state.result()
    if not _cached(eval_state):  # a cached evaluation's numbers are already on the model version
        version = record_evaluation_task(settings, training, candidate)

    champion_version = call_with_retry(
        backend.get_model_by_alias, CHAMPION, policy=settings.retry, what="get champion"
    )
    if champion_version is not None and champion_version.version == version.version:
        champion = None
        decision = {
            "promote": True,
            "reason": f"the candidate v{version.version} is already the champion (same job, same data)",
            "metric": settings.gate.metric,
            "candidate_value": candidate["loss"] if settings.gate.metric == "eval_loss" else candidate["perplexity"],
            "champion_value": None,
            "tolerance": settings.gate.tolerance,
        }
        logger.info("gate: %s", decision["reason"])
    else:
        champion = (
            evaluate_champion_task(settings, champion_version, dataset) if champion_version is not None else None
        )
        decision = gate_task(candidate, champion, settings.gate)

    rollout: dict[str, Any] | None = None
    smoke: dict[str, Any] | None = None
    chat: str | None = None
    chat_eval: dict[str, Any] | None = None
    failure: Exception | None = None
    if decision["promote"]:
        try:
            rollout = run_rollout(backend, version, settings, force="deploy" in wanted).to_dict()
        except RolloutFailed as exc:
            failure = exc
            # What the rollout did before it failed and what the rollback left, for the summary below.
            rollout = exc.rollout.to_dict() if exc.rollout is not None else None
    else:
        logger.warning("the candidate was not promoted (%s): checking that the champion serves", decision["reason"])

    # Whatever the gate and the rollout did: the champion must be serving when the run ends, and shown to be.
    serving: dict[str, Any] | None = None
    not_serving: Exception | None = None
    try:
        serving = verify_champion_serving_task(backend, settings)
        if serving["champion"] is not None:
            smoke = smoke_test_task(settings, None, "smoke-test")
            serving["checked"].append(f"unpinned smoke test passed ({len(smoke['cases'])} prompts)")
    except (ChampionNotServing, SmokeTestFailed) as exc:
        not_serving = exc
        logger.error("the champion is not serving: %s", exc)

    endpoint = backend.get_endpoint()
    if failure is None and not_serving is None and endpoint is not None and endpoint.traffic:
        chat = how_to_chat(endpoint.openai_base_url, endpoint.scoring_uri, config=config_path)
        # Optional (evaluation.chat_flow_eval): the Prompt flow chat over the test split; a failure only warns.
        from tasks.batch_eval import maybe_evaluate_chat_flow

        chat_eval = maybe_evaluate_chat_flow(settings, dataset["test_path"])

    markdown = render_summary(
        dataset=dataset,
        training=training,
        candidate=candidate,
        champion=champion,
        gate=decision,
        version=version.version,
        rollout=rollout,
        smoke=smoke,
        chat=chat,
        cached={"data": _cached(data_state), "training": _cached(train_state)},
        failure=str(failure) if failure is not None else None,
        serving=serving,
        not_serving=str(not_serving) if not_serving is not None else None,
    )
    loss_curve = Path(training["output_dir"]) / "loss_curve.png" if training.get("output_dir") else None
    publish_summary_task(markdown, str(loss_curve) if loss_curve else None)
    if failure is not None:
        raise failure
    if not_serving is not None:
        raise not_serving
    return {
        "dataset": dataset,
        "training": training,
        "version": version.version,
        "candidate": candidate,
        "champion": champion,
        "gate": decision,
        "rollout": rollout,
        "smoke": smoke,
        "serving": serving,
        "chat_eval": chat_eval,
        "endpoint": None if endpoint is None else {"scoring_uri": endpoint.scoring_uri, "traffic": endpoint.traffic},
        "states": {"data": data_state.name, "training": train_state.name},
    }


# ------------------------------------------------------------------------------------------------- CLI
def _prefect_ui_line() -> str:
    api = os.environ.get("PREFECT_API_URL")
    if api:
        ui = api.removesuffix("/api")
        return f"Prefect UI: {ui} (flow runs, logs, artifacts: run summary, loss curve, smoke table)"
    return (
        "Prefect: ran on a temporary local engine (no server). To browse runs and artifacts: `prefect server start`, "
        "then `export PREFECT_API_URL=http://127.0.0.1:4200/api` and run again"
    )


@contextlib.contextmanager
def prefect_home_of(settings: Settings) -> Iterator[None]:
    """Point Prefect at the state folder (``<state_dir>/prefect``) for this command.

    Prefect reads its settings once, on import, which the CLI does before it knows the config; so the home is
    applied here with ``temporary_settings`` (results, the ephemeral engine's database and logs all follow it).
    A ``PREFECT_HOME`` the user set in the environment wins, as ``configure_environment`` leaves it alone.
    """
    from prefect.settings import PREFECT_HOME, temporary_settings

    configure_environment(settings.state_dir)
    with temporary_settings(updates={PREFECT_HOME: os.environ["PREFECT_HOME"]}):
        yield


def _run_command(args: argparse.Namespace) -> int:
    refresh = [r.strip() for r in args.refresh.split(",") if r.strip()] if args.refresh else None
    _check_refresh(refresh)  # before load_settings, which creates the state folder
    settings = load_settings(args.config, args.set)  # fails fast on a bad config, before Prefect starts
    started = time.perf_counter()
    with prefect_home_of(settings):
        result = finetune_and_deploy(args.config, normalise_overrides(args.set) or None, refresh)
    took = time.perf_counter() - started
    print(f"\nfinetune-phi run: done in {took:.1f} s; model version {result['version']}")
    print(f"gate: {'PROMOTE' if result['gate']['promote'] else 'REJECT'}: {result['gate']['reason']}")
    print(_prefect_ui_line())
    endpoint = get_backend(settings).get_endpoint()
    if endpoint is not None:
        print(f"Endpoint: {endpoint.scoring_uri} (traffic {endpoint.traffic})")
        print(f"OpenAI-compatible base URL: {endpoint.openai_base_url}")
        print(how_to_chat(endpoint.openai_base_url, endpoint.scoring_uri, config=args.config))
        if settings.backend == "local":
            print("The local endpoint server keeps running; stop it with `finetune-phi endpoint stop`.")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run the whole pipeline: data, training, evaluation, gate, blue/green rollout, smoke test",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--config", default="configs/local.yaml", help="run configuration (default: %(default)s)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field, e.g. --set training.overrides.max_steps=20 (repeatable)",
    )
    parser.add_argument(
        "--refresh",
        default="",
        metavar="STEPS",
        help=f"comma-separated steps to redo even if cached: {','.join(REFRESHABLE)}",
    )
    parser.set_defaults(handler=_run_command)


__all__ = ["add_commands", "finetune_and_deploy", "prepare_data", "train", "train_task", "training_task"]
