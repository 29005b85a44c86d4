"""A loopback HTTPS server speaking Azure Monitor's metrics REST route, for the real ``MetricsQueryClient``.

``GET {resourceId}/providers/Microsoft.Insights/metrics?metricnames=...&timespan=...&$filter=...`` answers the
series the test put in :attr:`MonitorFake.series` for that metric: ``{metric: [(dimensions, total or maximum)]}``,
one data point per series (Azure returns one per minute; the client sums them the same way). The bearer token must
be there (the SDK refuses to send one over plain HTTP, hence HTTPS with a self-signed certificate for 127.0.0.1).
"""

from __future__ import annotations

import datetime
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from azure.core.credentials import AccessToken

from tests.azure_fake.tls import self_signed_certificate


class StaticToken:
    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken("fake-arm-token", 2**31 - 1)


class MonitorFake:
    def __init__(self, folder: Path) -> None:
        self.series: dict[str, list[tuple[dict[str, str], float]]] = {}
        self.queries: list[dict[str, list[str]]] = []
        self.cert_path, key_path = self_signed_certificate(folder)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlparse(self.path)
                if not self.headers.get("Authorization", "").startswith("Bearer "):
                    return self._send(401, {"error": {"code": "AuthenticationFailed", "message": "no token"}})
                if not url.path.endswith("/providers/Microsoft.Insights/metrics"):
                    return self._send(404, {"error": {"code": "ResourceNotFound", "message": url.path}})
                query = parse_qs(url.query)
                fake.queries.append(query)
                self._send(200, fake.answer(url.path, query))

            def _send(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_path, key_path)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self._server.server_port}"

    def answer(self, path: str, query: dict[str, list[str]]) -> dict[str, Any]:
        names = query.get("metricnames", [""])[0].split(",")
        aggregation = query.get("aggregation", ["Total"])[0].lower()
        resource = path.removesuffix("/providers/Microsoft.Insights/metrics")
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:00Z")
        metrics = []
        for name in names:
            timeseries = [
                {
                    "metadatavalues": [
                        {"name": {"value": k, "localizedValue": k}, "value": v} for k, v in dims.items()
                    ],
                    "data": [{"timeStamp": stamp, aggregation: value}],
                }
                for dims, value in self.series.get(name, [])
            ]
            metrics.append({
                "id": f"{resource}/providers/Microsoft.Insights/metrics/{name}",
                "type": "Microsoft.Insights/metrics",
                "name": {"value": name, "localizedValue": name},
                "unit": "Count" if name == "RequestsPerMinute" else "Milliseconds",
                "timeseries": timeseries,
                "errorCode": "Success",
            })  # fmt: skip
        return {
            "cost": 0,
            "timespan": query.get("timespan", [""])[0],
            "interval": query.get("interval", ["PT1M"])[0],
            "namespace": "Microsoft.MachineLearningServices/workspaces/onlineEndpoints",
            "resourceregion": "westeurope",
            "value": metrics,
        }

    def __enter__(self) -> MonitorFake:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
