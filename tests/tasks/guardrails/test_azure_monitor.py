"""The azureml metrics source: the backend's own ``MetricsQueryClient`` against Azure Monitor's metrics route of the
loopback HTTPS Azure fake (tests/azure_fake), and the same alarm logic as locally deciding a bake on its numbers."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from azure.core.exceptions import ResourceNotFoundError

from tasks.backends.azureml import AzureMLBackend
from tasks.config import Settings
from tasks.guardrails.step import Watch, judge_step
from tests.azure_fake.client import StaticToken, fake_cloud
from tests.azure_fake.server import AzureMLFake
from tests.tasks.guardrails.scripted import Clock

SETTINGS = Settings.model_validate(
    {
        "backend": "azureml",
        "data": {"path": "x.jsonl"},
        "azureml": {"subscription_id": "sub-1", "resource_group": "rg-1", "workspace": "ws-1"},
        "endpoint": {"name": "phi-endpoint"},
        "rollout": {"bake_s": 600, "alarms": {"min_requests": 20, "check_interval_s": 30}},
    }
)
ENDPOINT_ID = (
    "/subscriptions/sub-1/resourceGroups/rg-1/providers/Microsoft.MachineLearningServices/workspaces/ws-1/"
    "onlineEndpoints/phi-endpoint"
)
METRICS_PATH = "/providers/Microsoft.Insights/metrics"
METRICS_ROUTE = r"/providers/Microsoft\.Insights/metrics$"


@pytest.fixture()
def azure() -> Iterator[AzureMLFake]:
    fake = AzureMLFake(subscription="sub-1", resource_group="rg-1", workspace="ws-1").start()
    fake.add_endpoint("phi-endpoint")
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture()
def backend(azure: AzureMLFake) -> Iterator[AzureMLBackend]:
    """The backend pointed at the fake's cloud, as ``rest_backend`` is: its live metrics need no injected client."""
    with fake_cloud(azure) as cloud:
        backend = AzureMLBackend(SETTINGS, credential=StaticToken(), cloud=cloud)
        try:
            yield backend
        finally:
            backend.close()


def _live(azure: AzureMLFake, candidate_errors: int) -> None:
    metrics = azure.metrics_of("phi-endpoint")
    metrics.requests = {
        "model-v2": {200: 40, 503: candidate_errors},
        "model-v1": {200: 400, 404: 7},  # a 404 is a client's mistake, not the champion's
    }
    metrics.latency_p95_ms = {"model-v2": 450.0, "model-v1": 400.0}


def test_requests_by_status_and_p95_latency_per_deployment_come_from_azure_monitor(azure, backend) -> None:
    _live(azure, candidate_errors=10)
    source = backend.live_metrics()
    windows = source.since(source.mark())
    assert dict(windows["model-v2"].statuses) == {200: 40, 503: 10}
    assert windows["model-v2"].request_p95_s == pytest.approx(0.45)
    champion = windows["model-v1"].stats()
    assert (champion.requests, champion.errors, champion.p95_s_per_token) == (407, 0, None)
    requests, latency = azure.sent("GET", METRICS_ROUTE)
    assert requests.path == latency.path == ENDPOINT_ID + METRICS_PATH
    assert requests.query["metricnames"] == "RequestsPerMinute" and requests.query["aggregation"] == "Total"
    assert requests.query["$filter"] == "deployment eq '*' and statusCode eq '*'"
    assert latency.query["metricnames"] == "RequestLatency_P95" and latency.query["aggregation"] == "Maximum"
    assert latency.query["$filter"] == "deployment eq '*'" and latency.query["interval"] == "PT1M"
    start, end = requests.query["timespan"].split("/")
    assert start < end  # the window from the mark to now
    assert latency.headers["authorization"] == "Bearer fake-arm-token"


def test_a_filter_that_does_not_split_a_dimension_merges_its_series(azure) -> None:
    """The fake answers the dimension split the query asks for, not whatever the test scripted: without
    ``statusCode eq '*'`` a deployment's codes come back as one series."""
    from azure.monitor.query import MetricAggregationType, MetricsQueryClient

    _live(azure, candidate_errors=10)
    client = MetricsQueryClient(
        StaticToken(), endpoint=azure.base_url, connection_verify=str(azure.cert_path), retry_total=0
    )
    with client:
        result = client.query_resource(
            ENDPOINT_ID,
            ["RequestsPerMinute"],
            timespan=(datetime.now(UTC) - timedelta(minutes=5), datetime.now(UTC)),
            aggregations=[MetricAggregationType.TOTAL, MetricAggregationType.MAXIMUM],
            filter="deployment eq '*'",
        )
    points = {s.metadata_values["deployment"]: s.data[0] for s in result.metrics[0].timeseries}
    assert {name: (p.total, p.maximum) for name, p in points.items()} == {"model-v2": (50, 40), "model-v1": (407, 400)}


def test_a_resource_id_that_is_no_endpoint_of_the_workspace_is_not_found(azure) -> None:
    other = SETTINGS.model_copy(update={"endpoint": SETTINGS.endpoint.model_copy(update={"name": "other"})})
    with fake_cloud(azure) as cloud:
        backend = AzureMLBackend(other, credential=StaticToken(), cloud=cloud)
        try:
            source = backend.live_metrics()
            with pytest.raises(ResourceNotFoundError) as missing:
                source.since(source.mark())
        finally:
            backend.close()
    assert missing.value.status_code == 404
    assert azure.sent("GET", METRICS_ROUTE)[0].path == ENDPOINT_ID.replace("phi-endpoint", "other") + METRICS_PATH


@pytest.mark.parametrize(("errors", "passed"), [(10, False), (0, True)])
def test_a_bake_on_azure_monitor_numbers_fires_the_same_alarm_as_locally(azure, backend, errors, passed) -> None:
    _live(azure, candidate_errors=errors)
    clock = Clock()
    watch = Watch(backend.live_metrics(), "model-v2", "model-v1", origin=clock.now)

    def probe() -> tuple[bool, str, float]:
        raise AssertionError("live numbers decide")

    step = judge_step(SETTINGS, 10, {"model-v1": 90, "model-v2": 10}, watch, probe, clock=clock, sleep=clock.sleep)
    assert step["passed"] is passed and step["decided_by"] == "live"
    if not passed:
        assert step["verdict"]["alarm"] == "error_rate" and step["waited_s"] == 0  # at the first reading
        assert step["candidate"]["error_rate"] == pytest.approx(0.2)
        assert len(azure.sent("GET", METRICS_ROUTE)) == 2  # one reading: requests, then latency
    else:
        assert step["waited_s"] == pytest.approx(600)  # the whole bake, read every check_interval_s
        assert step["verdict"]["compared"] == ["error_rate", "latency"]  # no finish reasons on Azure
        assert len(azure.sent("GET", METRICS_ROUTE)) == 2 * (600 // 30 + 1)
