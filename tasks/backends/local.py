"""The ``local`` backend: everything on this machine, state in one folder.

- jobs: :class:`tasks.backends.local_jobs.LocalJobRunner` (the training script as a subprocess in its own process
  group), one job per set of inputs (:func:`~tasks.backends.local_jobs.submit_or_resume`: a re-run after a crash
  waits for, reuses or resumes that job);
- registry: MLflow on SQLite in the state folder (:mod:`tasks.registry`), or any tracking URI from the config;
- endpoint: the loopback endpoint server of :mod:`deployments` through its admin API
  (:class:`deployments.client.EndpointAdminClient`); :meth:`LocalBackend.ensure_endpoint` starts the server
  when it is not running and leaves it running for the user.

The admin client retries the endpoint server's transient faults (connection failures, HTTP 429/5xx) as
``settings.retry`` says, the one retry layer of an endpoint call; other library faults that may pass become
:class:`TransientBackendError` (a Prefect step retries them whole) and everything else a :class:`BackendError` that
says what to do.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.backends.base import (
    BackendError,
    DeploymentFailedError,
    DeploymentInfo,
    EndpointInfo,
    JobInfo,
    ModelVersion,
    TrainingJobSpec,
    TransientBackendError,
)
from tasks.backends.local_jobs import LocalJobRunner, submit_or_resume
from tasks.config import Settings
from tasks.polling import PollTimeout, every, poll_until
from tasks.retry import is_transient
from tasks.state import StatePaths, configure_environment, read_json

_LOG = logging.getLogger("finetune_phi.local")


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """Map library errors to the backend's two kinds: transient (retry) or final (a sentence for a person)."""
    try:
        yield
    except BackendError:
        raise
    except Exception as exc:
        if is_transient(exc):
            raise TransientBackendError(f"{what} failed for now ({type(exc).__name__}: {exc}); retrying") from exc
        raise


class LocalBackend:
    """Subprocess jobs, MLflow on SQLite, the loopback endpoint server."""

    name = "local"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.paths: StatePaths = configure_environment(settings.state_dir)
        self._runner: LocalJobRunner | None = None
        self._admin: Any = None

    # ------------------------------------------------------------------ jobs
    @property
    def runner(self) -> LocalJobRunner:
        if self._runner is None:
            self._runner = LocalJobRunner(self.paths.jobs)
        return self._runner

    def submit_training(self, spec: TrainingJobSpec) -> JobInfo:
        return submit_or_resume(self.runner, spec)

    def get_job(self, job_id: str) -> JobInfo:
        return self.runner.get(job_id)

    def cancel_job(self, job_id: str) -> None:
        self.runner.cancel(job_id)

    def job_log_since(self, job_id: str, offset: int = 0) -> tuple[list[str], int]:
        return self.runner.log_since(job_id, offset)

    def job_metrics(self, job_id: str) -> dict[str, Any]:
        job = self.get_job(job_id)
        if job.output_dir is None:
            return {}
        return read_json(Path(job.output_dir) / "metrics.json", default={}) or {}

    # -------------------------------------------------------------- registry
    @property
    def tracking_uri(self) -> str:
        return self.settings.registry.tracking_uri or self.paths.mlflow_tracking_uri

    def register_model(self, job_id: str, tags: dict[str, str]) -> ModelVersion:
        """Register the job's model (the same job always gets the same version) and merge ``tags`` onto it."""
        from tasks import registry

        job = self.get_job(job_id)
        name = self.settings.registry.model_name
        with _translated("registering the model"):
            version = registry.register_job_model(
                self.tracking_uri, name, job_id, job_output_dir=job.output_dir, tags=tags
            )
            missing = {k: str(v) for k, v in tags.items() if version.tags.get(k) != str(v)}
            if missing:  # an earlier registration of this job: add the new tags (e.g. the evaluation's numbers)
                from mlflow import MlflowClient

                client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
                for key, value in missing.items():
                    client.set_model_version_tag(name, version.version, key, value)
                version = registry.get_version(name, version.version, tracking_uri=self.tracking_uri)
        return version

    def get_model_by_alias(self, alias: str) -> ModelVersion | None:
        from tasks import registry

        with _translated(f"reading the {alias!r} alias"):
            return registry.get_version_by_alias(
                self.settings.registry.model_name, alias, tracking_uri=self.tracking_uri
            )

    def set_alias(self, alias: str, version: ModelVersion) -> None:
        from tasks import registry

        with _translated(f"moving the {alias!r} alias"):
            registry.set_alias(version.name, alias, version.version, tracking_uri=self.tracking_uri)

    def model_folder(self, version: ModelVersion) -> Path:
        if version.local_path is not None and Path(version.local_path).is_dir():
            return Path(version.local_path)
        from tasks import registry

        with _translated("fetching the model folder"):
            return Path(registry.model_folder(version, tracking_uri=self.tracking_uri))

    # -------------------------------------------------------------- endpoint
    @property
    def base_url(self) -> str:
        return f"http://{self.settings.endpoint.host}:{self.settings.endpoint.port}"

    def _client(self) -> Any:
        if self._admin is None:
            from deployments.client import EndpointAdminClient
            from deployments.keys import read_admin_key

            self._admin = EndpointAdminClient(
                self.base_url, read_admin_key(self.paths.endpoint), retry=self.settings.retry
            )
        return self._admin

    def _server_running(self) -> bool:
        from deployments.service import server_status

        return server_status(self.settings).healthy

    def ensure_endpoint(self) -> EndpointInfo:
        """Start the endpoint server if it is not running (it keeps running after the flow, for the user)."""
        if not self._server_running():
            from deployments.service import start_server

            with _translated("starting the endpoint server"):
                start_server(self.settings)
            self._admin = None
            self._wait_loaded(self.settings.endpoint.startup_timeout_s)
        info = self.get_endpoint()
        if info is None:
            raise BackendError(
                f"the endpoint server on {self.base_url} did not come up; see `finetune-phi endpoint logs`"
            )
        return info

    def _wait_loaded(self, timeout_s: float) -> None:
        """After a (re)start the server reloads its deployments: wait until none is still loading (past
        ``timeout_s`` the rollout's own readiness wait says which one is stuck)."""
        with contextlib.suppress(PollTimeout):
            poll_until(
                self.get_endpoint,
                lambda info: info is not None and all(d.state != "creating" for d in info.deployments),
                timeout_s=timeout_s,
                schedule=every(0.5),
            )

    def get_endpoint(self) -> EndpointInfo | None:
        if not self._server_running():
            return None
        with _translated("reading the endpoint state"):
            state = self._client().get_state()
        return self._endpoint_info(state)

    def _endpoint_info(self, state: dict[str, Any]) -> EndpointInfo:
        deployments = [
            DeploymentInfo(
                name=name,
                model_version=(d.get("model_version") if isinstance(d, dict) else None),
                state=(d.get("state", "ready") if isinstance(d, dict) else str(d)),
                error=(d.get("error") if isinstance(d, dict) else None),
            )
            for name, d in _deployments_of(state).items()
        ]
        return EndpointInfo(
            name=self.settings.endpoint.name,
            scoring_uri=f"{self.base_url}/score",
            openai_base_url=f"{self.base_url}/v1",
            traffic={k: int(v) for k, v in (state.get("traffic") or {}).items()},
            deployments=deployments,
            chat_page_url=f"{self.base_url}/chat",  # deployments/chat_page.py serves it
        )

    def create_deployment(self, name: str, version: ModelVersion) -> DeploymentInfo:
        folder = self.model_folder(version)
        with _translated(f"creating deployment {name}"):
            self._client().create_deployment(name, str(folder), version.version)
        return DeploymentInfo(name=name, model_version=version.version, state="creating")

    def wait_deployment_ready(self, name: str, timeout_s: float) -> DeploymentInfo:
        """The deployment once ready; :class:`DeploymentFailedError` when it failed to load, vanished or was not
        ready within ``timeout_s`` (the contract of every backend)."""
        with _translated(f"waiting for deployment {name}"):
            try:
                self._client().wait_ready(name, timeout_s)
            except TimeoutError as exc:
                raise DeploymentFailedError(
                    f"deployment {name} was not ready within rollout.ready_timeout_s={timeout_s:.0f} s; "
                    "see `finetune-phi endpoint logs`"
                ) from exc
        endpoint = self.get_endpoint()
        found = next((d for d in endpoint.deployments if d.name == name), None) if endpoint else None
        if found is None:
            raise DeploymentFailedError(f"deployment {name} vanished while loading")
        if found.state != "ready":
            raise DeploymentFailedError(f"deployment {name} failed to load: {found.error or found.state}")
        return found

    def delete_deployment(self, name: str) -> None:
        with _translated(f"deleting deployment {name}"):
            self._client().delete_deployment(name)

    def set_traffic(self, traffic: dict[str, int]) -> dict[str, int]:
        with _translated("setting traffic"):
            self._client().set_traffic(traffic)
        endpoint = self.get_endpoint()
        return endpoint.traffic if endpoint else {}

    def live_metrics(self) -> Any:
        """The router's per-deployment counters (``GET /admin/metrics``) for the rollout's alarms."""
        from tasks.guardrails.sources import RouterMetrics

        return RouterMetrics(lambda: self._client().get_metrics())

    def arm_rescue(self, candidate: str, champion: str, ttl_s: float) -> None:
        """While a rollout runs: the router answers the candidate's failed requests with the champion."""
        with _translated("arming the rescue"):
            self._client().arm_rescue(candidate, champion, ttl_s)

    def disarm_rescue(self) -> None:
        with _translated("disarming the rescue"):
            self._client().disarm_rescue()

    def scoring_key(self) -> str:
        from deployments.keys import read_keys

        return read_keys(self.paths.endpoint)["primary"]


def _deployments_of(state: dict[str, Any]) -> dict[str, Any]:
    deployments = state.get("deployments") or {}
    if isinstance(deployments, list):
        return {d["name"]: d for d in deployments}
    return dict(deployments)


__all__ = ["LocalBackend"]
