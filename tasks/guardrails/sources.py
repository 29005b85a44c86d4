"""Where a bake's numbers come from: one small interface (:class:`~tasks.guardrails.bake.MetricsSource`), two
sources.

- :class:`RouterMetrics` (local backend): the router's JSON admin route ``GET /admin/metrics``, read twice and
  subtracted; the same counters ``/metrics`` exports, never scraped from its text.
- :class:`AzureMonitorMetrics` (azureml): the endpoint's platform metrics in Azure Monitor through
  ``azure-monitor-query``'s ``MetricsQueryClient``: ``RequestsPerMinute`` split by deployment and status code,
  ``RequestLatency_P95`` by deployment. Azure Monitor has neither a per-token histogram nor finish reasons, so on
  Azure the latency alarm compares request latency and the ended-share alarm has no numbers (the summary says
  which alarms were compared). Its numbers arrive with a delay of a minute or more: bakes on Azure want minutes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from tasks.guardrails.metrics import Counters, counters_from_json

REQUESTS_METRIC = "RequestsPerMinute"
LATENCY_P95_METRIC = "RequestLatency_P95"  # milliseconds


class RouterMetrics:
    """The local router's cumulative counters; ``read`` returns ``{deployment: payload}`` of ``GET /admin/metrics``
    (an :class:`~deployments.client.EndpointAdminClient`'s ``get_metrics``)."""

    name = "the endpoint router's /admin/metrics"

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def _reading(self) -> dict[str, Counters]:
        return {name: counters_from_json(entry) for name, entry in (self._read().get("deployments") or {}).items()}

    def mark(self) -> dict[str, Counters]:
        return self._reading()

    def since(self, mark: dict[str, Counters]) -> dict[str, Counters]:
        return {name: now.minus(mark.get(name, Counters())) for name, now in self._reading().items()}


def endpoint_resource_id(subscription_id: str, resource_group: str, workspace: str, endpoint: str) -> str:
    """The ARM id of an Azure ML online endpoint: the resource its platform metrics belong to."""
    return (
        f"/subscriptions/{subscription_id}/resourceGroups/{resource_group}/providers/"
        f"Microsoft.MachineLearningServices/workspaces/{workspace}/onlineEndpoints/{endpoint}"
    )


def _dimensions(series: Any) -> dict[str, str]:
    # Azure Monitor names dimensions in any case ("statusCode", "statuscode"): compare in lower case.
    return {str(k).lower(): str(v) for k, v in (getattr(series, "metadata_values", None) or {}).items()}


class AzureMonitorMetrics:
    """An Azure ML endpoint's per-deployment metrics over ``[mark, now]`` from Azure Monitor.

    ``client``: an ``azure.monitor.query.MetricsQueryClient`` (its ``endpoint`` is the cloud's resource manager).
    """

    name = "Azure Monitor"

    def __init__(self, client: Any, resource_id: str, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._client, self.resource_id, self._now = client, resource_id, now

    def mark(self) -> datetime:
        return self._now()

    def since(self, mark: datetime) -> dict[str, Counters]:
        from azure.monitor.query import MetricAggregationType

        end = max(self._now(), mark + timedelta(seconds=1))
        requests = self._client.query_resource(
            self.resource_id,
            [REQUESTS_METRIC],
            timespan=(mark, end),
            granularity=timedelta(minutes=1),
            aggregations=[MetricAggregationType.TOTAL],
            filter="deployment eq '*' and statusCode eq '*'",
        )
        statuses: dict[str, dict[int, int]] = defaultdict(dict)
        for metric in requests.metrics:
            for series in metric.timeseries:
                dims = _dimensions(series)
                code = dims.get("statuscode", "")
                if not code.isdigit() or "deployment" not in dims:
                    continue
                total = sum(point.total or 0 for point in series.data)
                by_code = statuses[dims["deployment"]]
                by_code[int(code)] = by_code.get(int(code), 0) + round(total)
        latency = self._client.query_resource(
            self.resource_id,
            [LATENCY_P95_METRIC],
            timespan=(mark, end),
            granularity=timedelta(minutes=1),
            aggregations=[MetricAggregationType.MAXIMUM],
            filter="deployment eq '*'",
        )
        p95_s: dict[str, float] = {}
        for metric in latency.metrics:
            for series in metric.timeseries:
                deployment = _dimensions(series).get("deployment")
                values = [point.maximum for point in series.data if point.maximum is not None]
                if deployment and values:
                    p95_s[deployment] = max(values) / 1000.0  # the window's worst minute, in seconds
        names = set(statuses) | set(p95_s)
        return {name: Counters(statuses=statuses.get(name, {}), request_p95_s=p95_s.get(name)) for name in names}


__all__ = ["AzureMonitorMetrics", "RouterMetrics", "endpoint_resource_id"]
