"""The azureml metrics source: the real ``MetricsQueryClient`` against a loopback HTTPS Azure Monitor, and the same
alarm logic as locally deciding a bake on its numbers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from azure.monitor.query import MetricsQueryClient

from tasks.backends.azureml import AzureMLBackend
from tasks.config import Settings
from tasks.guardrails.step import Watch, judge_step
from tests.tasks.guardrails.monitor_fake import MonitorFake, StaticToken
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


@pytest.fixture()
def monitor(tmp_path: Path) -> Iterator[MonitorFake]:
    with MonitorFake(tmp_path) as fake:
        yield fake


def _source(monitor: MonitorFake):
    client = MetricsQueryClient(
        StaticToken(), endpoint=monitor.base_url, connection_verify=str(monitor.cert_path), retry_total=0
    )
    return AzureMLBackend(SETTINGS, ml_client=object(), credential=StaticToken()).live_metrics(client=client)


def _live(monitor: MonitorFake, candidate_errors: int) -> None:
    monitor.series = {
        "RequestsPerMinute": [
            ({"deployment": "model-v2", "statusCode": "200"}, 40.0),
            ({"deployment": "model-v2", "statusCode": "503"}, float(candidate_errors)),
            ({"deployment": "model-v1", "statusCode": "200"}, 400.0),
            ({"deployment": "model-v1", "statusCode": "404"}, 7.0),  # a client's mistake, not the champion's
        ],
        "RequestLatency_P95": [({"deployment": "model-v2"}, 450.0), ({"deployment": "model-v1"}, 400.0)],
    }


def test_requests_by_status_and_p95_latency_per_deployment_come_from_azure_monitor(monitor: MonitorFake) -> None:
    _live(monitor, candidate_errors=10)
    source = _source(monitor)
    windows = source.since(source.mark())
    assert dict(windows["model-v2"].statuses) == {200: 40, 503: 10}
    assert windows["model-v2"].request_p95_s == pytest.approx(0.45)
    champion = windows["model-v1"].stats()
    assert (champion.requests, champion.errors, champion.p95_s_per_token) == (407, 0, None)
    requests, latency = monitor.queries
    assert requests["metricnames"] == ["RequestsPerMinute"] and requests["aggregation"] == ["Total"]
    assert requests["$filter"] == ["deployment eq '*' and statusCode eq '*'"]
    assert latency["metricnames"] == ["RequestLatency_P95"] and latency["interval"] == ["PT1M"]
    assert source.resource_id.endswith("/workspaces/ws-1/onlineEndpoints/phi-endpoint")


@pytest.mark.parametrize(("errors", "passed"), [(10, False), (0, True)])
def test_a_bake_on_azure_monitor_numbers_fires_the_same_alarm_as_locally(
    monitor: MonitorFake, errors: int, passed: bool
) -> None:
    _live(monitor, candidate_errors=errors)
    clock = Clock()
    watch = Watch(_source(monitor), "model-v2", "model-v1", origin=clock.now)

    def probe() -> tuple[bool, str, float]:
        raise AssertionError("live numbers decide")

    step = judge_step(SETTINGS, 10, {"model-v1": 90, "model-v2": 10}, watch, probe, clock=clock, sleep=clock.sleep)
    assert step["passed"] is passed and step["decided_by"] == "live"
    if not passed:
        assert step["verdict"]["alarm"] == "error_rate" and step["waited_s"] == 0  # at the first reading
        assert step["candidate"]["error_rate"] == pytest.approx(0.2)
    else:
        assert step["waited_s"] == pytest.approx(600)  # the whole bake, read every check_interval_s
        assert step["verdict"]["compared"] == ["error_rate", "latency"]  # no finish reasons on Azure
