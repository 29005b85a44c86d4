"""Azure Monitor's metrics route of the fake: what an online endpoint's platform metrics answer.

azure-monitor-query 1.4.1's ``MetricsQueryClient.query_resource`` sends
``GET {resourceUri}/providers/Microsoft.Insights/metrics`` with ``metricnames`` (comma-separated), ``timespan``
(``start/end`` in ISO 8601), ``interval`` (an ISO duration, e.g. ``PT1M``), ``aggregation`` (e.g. ``Total``),
``$filter`` (``deployment eq '*' and statusCode eq '*'``: one series per value of each named dimension) and
``api-version``; it reads ``value[].timeseries[].metadatavalues`` and ``data[].{total,maximum,...}``.

The numbers are scripted by the test (:class:`EndpointMetrics`: requests by deployment and status code, p95
request latency by deployment), not derived from the fake's scoring routes: a bake reads wall-clock windows while
the tests run it on a fake clock, so counting served requests by time would make the window's numbers depend on
timing. They are the window's numbers whatever the timespan, as one data point per series.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

REQUESTS_METRIC = "RequestsPerMinute"
LATENCY_P95_METRIC = "RequestLatency_P95"
NAMESPACE = "Microsoft.MachineLearningServices/workspaces/onlineEndpoints"
UNITS = {REQUESTS_METRIC: "Count", LATENCY_P95_METRIC: "Milliseconds"}
# What each aggregation makes of the values one series gathers (several deployments or codes merged by the filter).
AGGREGATIONS: dict[str, Callable[[list[float]], float]] = {
    "total": sum,
    "maximum": max,
    "minimum": min,
    "average": lambda values: sum(values) / len(values),
    "count": lambda values: float(len(values)),
}

Series = list[tuple[dict[str, str], float]]  # (dimension values, value)
Groups = list[tuple[dict[str, str], list[float]]]  # (dimension values, the values merged into that series)


@dataclass
class EndpointMetrics:
    """One endpoint's metrics over the window a query asks for, as the test scripts them."""

    requests: dict[str, dict[int, int]] = field(default_factory=dict)  # deployment -> {status code: requests}
    latency_p95_ms: dict[str, float] = field(default_factory=dict)  # deployment -> p95 request latency

    def series(self, metric: str) -> Series:
        if metric == REQUESTS_METRIC:
            return [
                ({"deployment": name, "statusCode": str(code)}, float(count))
                for name, codes in self.requests.items()
                for code, count in codes.items()
            ]
        if metric == LATENCY_P95_METRIC:
            return [({"deployment": name}, ms) for name, ms in self.latency_p95_ms.items()]
        raise ValueError(f"Failed to find metric configuration for provider: {NAMESPACE}, metric: {metric}")


def parse_filter(text: str | None) -> dict[str, str]:
    """``a eq 'x' and b eq '*'`` -> ``{"a": "x", "b": "*"}`` (names in lower case: Azure ignores their case)."""
    clauses: dict[str, str] = {}
    for clause in re.split(r"\s+and\s+", text.strip(), flags=re.IGNORECASE) if text else []:
        match = re.fullmatch(r"(\w+)\s+eq\s+'([^']*)'", clause.strip(), flags=re.IGNORECASE)
        if match is None:
            raise ValueError(f"The $filter is invalid: {text}")
        clauses[match.group(1).lower()] = match.group(2)
    return clauses


def split(series: Series, wanted: dict[str, str]) -> Groups:
    """The series a filter asks for: one per combination of the named dimensions' values (``'*'``: every value,
    else only that one); the values of the dimensions it does not name are merged into one series."""
    groups: dict[tuple[tuple[str, str], ...], list[float]] = {}
    for dims, value in series:
        lowered = {name.lower(): (name, v) for name, v in dims.items()}
        unknown = sorted(set(wanted) - set(lowered))
        if unknown:
            raise ValueError(f"Metric does not support requested dimension combination: {unknown}")
        if any(v != "*" and lowered[name][1] != v for name, v in wanted.items()):
            continue
        key = tuple(lowered[name] for name in wanted)
        groups.setdefault(key, []).append(value)
    return [(dict(key), values) for key, values in groups.items()]


def parse_timespan(text: str) -> datetime.datetime:
    """The start of a ``start/end`` timespan (what the client sends for a (datetime, datetime) pair)."""
    try:
        start, end = (datetime.datetime.fromisoformat(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"Invalid timespan: {text!r}") from None
    if start >= end:
        raise ValueError(f"Invalid timespan: {text!r} ends before it starts")
    return start


def _metric(resource_id: str, name: str, groups: Groups, aggregations: list[str], stamp: str) -> dict[str, Any]:
    return {
        "id": f"{resource_id}/providers/Microsoft.Insights/metrics/{name}",
        "type": "Microsoft.Insights/metrics",
        "name": {"value": name, "localizedValue": name},
        "unit": UNITS[name],
        "timeseries": [
            {
                "metadatavalues": [
                    {"name": {"value": k.lower(), "localizedValue": k}, "value": v} for k, v in dims.items()
                ],
                "data": [{"timeStamp": stamp, **{a: AGGREGATIONS[a](values) for a in aggregations}}],
            }
            for dims, values in groups
        ],
        "errorCode": "Success",
    }


def metrics_answer(resource_id: str, region: str, metrics: EndpointMetrics, query: dict[str, str]) -> dict[str, Any]:
    """The body of a metrics query on ``resource_id``; ValueError for what Azure answers 400 to."""
    names = [n for n in query.get("metricnames", "").split(",") if n]
    if not names:
        raise ValueError("metricnames is required")
    timespan = query.get("timespan", "")
    start = parse_timespan(timespan)
    interval = query.get("interval", "PT1M")
    if not re.fullmatch(r"P(T(\d+H)?(\d+M)?(\d+S)?|\d+D)", interval):
        raise ValueError(f"Invalid interval: {interval!r}")
    aggregations = [a.strip().lower() for a in query.get("aggregation", "average").split(",")]
    unknown = sorted(set(aggregations) - set(AGGREGATIONS))
    if unknown:
        raise ValueError(f"Invalid aggregation: {unknown}")
    wanted = parse_filter(query.get("$filter"))
    stamp = start.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:00Z")  # the interval's first minute
    return {
        "cost": 0,
        "timespan": timespan,
        "interval": interval,
        "namespace": NAMESPACE,
        "resourceregion": region,
        "value": [
            _metric(resource_id, name, split(metrics.series(name), wanted), aggregations, stamp) for name in names
        ],
    }
