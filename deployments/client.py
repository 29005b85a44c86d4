"""A small client for the endpoint's admin API, used by the local backend.

    client = EndpointAdminClient("http://127.0.0.1:8765", admin_key)
    client.create_deployment("model-v3", "/path/to/hf-model", "3")   # returns at once; the model loads
    client.wait_ready("model-v3", timeout_s=600)                      # TimeoutError if not ready in time
    client.set_traffic({"model-v2": 90, "model-v3": 10})
    client.get_state()  # {"deployments": {name: {"state", "error", "model_version", ...}}, "traffic": {...}}
    client.delete_deployment("model-v2")                              # refused (409) while it has traffic

Errors: connection refused, timeouts, HTTP 429 and 5xx are transient: with a ``retry`` policy the client retries
them itself (the only retry layer for a local backend call) and raises :class:`RetriesExhaustedError` when they
outlast it; without one it raises :class:`TransientBackendError` at once;
a deployment that failed to load raises :class:`DeploymentFailedError` with the load error; other 4xx raise
:class:`BackendError` with the server's message.
"""

from __future__ import annotations

from typing import Any

import httpx

from tasks.backends.base import BackendError, DeploymentFailedError, RetriesExhaustedError, TransientBackendError
from tasks.config import RetryConfig
from tasks.polling import PollTimeout, every, poll_until
from tasks.retry import call_with_retry


class EndpointAdminClient:
    def __init__(
        self, base_url: str, admin_key: str, *, timeout_s: float = 30.0, retry: RetryConfig | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {admin_key}"}
        self.timeout_s = timeout_s
        self.retry = retry

    def __repr__(self) -> str:  # never show the key
        return f"EndpointAdminClient({self.base_url!r})"

    def _call(self, method: str, path: str, json: Any = None) -> dict[str, Any]:
        """One admin request, its transient faults retried as ``retry`` says (every admin request is idempotent)."""
        if self.retry is None:
            return self._request(method, path, json)
        try:
            return call_with_retry(self._request, method, path, json, policy=self.retry, what=f"{method} {path}")
        except TransientBackendError as exc:
            raise RetriesExhaustedError(f"{exc} (still failing after retry.attempts={self.retry.attempts})") from exc

    def _request(self, method: str, path: str, json: Any = None) -> dict[str, Any]:
        url = f"{self.base_url}{path}"
        try:
            response = httpx.request(method, url, json=json, headers=self._headers, timeout=self.timeout_s)
        except httpx.TransportError as exc:
            raise TransientBackendError(
                f"the endpoint server at {self.base_url} did not answer ({type(exc).__name__}); "
                "is it running? (`finetune-phi endpoint status`)"
            ) from exc
        if response.status_code < 400:
            return response.json()
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:300]
        text = f"{method} {path} answered {response.status_code}: {message}"
        if response.status_code == 429 or response.status_code >= 500:
            raise TransientBackendError(text)
        raise BackendError(text)

    def get_state(self) -> dict[str, Any]:
        return self._call("GET", "/admin/state")

    def arm_rescue(self, candidate: str, champion: str, ttl_s: float) -> dict[str, Any]:
        """Retry ``candidate``'s server-side failures once on ``champion`` for ``ttl_s`` (a rollout in progress)."""
        return self._call("PUT", "/admin/rescue", {"candidate": candidate, "champion": champion, "ttl_s": ttl_s})

    def disarm_rescue(self) -> dict[str, Any]:
        return self._call("DELETE", "/admin/rescue")

    def get_metrics(self) -> dict[str, Any]:
        """Per-deployment live numbers (``GET /admin/metrics``: the router's counters as JSON)."""
        return self._call("GET", "/admin/metrics")

    def create_deployment(
        self,
        name: str,
        model_path: str,
        model_version: str | None = None,
        *,
        memory_limit_mb: int | None = None,
        instance_count: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        engine: str | None = None,
    ) -> dict[str, Any]:
        """Create (or replace) deployment ``name`` serving the model folder ``model_path``; its processes start in
        the background. ``memory_limit_mb``, ``instance_count``, ``device``, ``dtype`` and ``engine`` left None take
        the endpoint's config."""
        body: dict[str, Any] = {"model_path": model_path, "model_version": model_version}
        body |= {"memory_limit_mb": memory_limit_mb, "instance_count": instance_count}
        body.update({k: v for k, v in {"device": device, "dtype": dtype, "engine": engine}.items() if v is not None})
        return self._call("PUT", f"/admin/deployments/{name}", body)

    def delete_deployment(self, name: str) -> dict[str, Any]:
        return self._call("DELETE", f"/admin/deployments/{name}")

    def set_traffic(self, traffic: dict[str, int]) -> dict[str, Any]:
        return self._call("PUT", "/admin/traffic", {"traffic": traffic})

    def wait_ready(self, name: str, timeout_s: float, poll_s: float = 0.5) -> dict[str, Any]:
        """The deployment's state once ready. DeploymentFailedError if it failed, TimeoutError past ``timeout_s``."""
        try:
            deployment = poll_until(
                lambda: self.get_state().get("deployments", {}).get(name),
                lambda d: d is None or d["state"] in ("ready", "failed"),
                timeout_s=timeout_s,
                schedule=every(poll_s),
            )
        except PollTimeout:
            raise TimeoutError(f"deployment {name} was not ready within {timeout_s:.0f} s") from None
        if deployment is None:
            raise DeploymentFailedError(f"deployment {name} does not exist on {self.base_url}")
        if deployment["state"] == "failed":
            raise DeploymentFailedError(f"deployment {name} failed to load: {deployment.get('error')}")
        return deployment
