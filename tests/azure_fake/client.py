"""The real ``MLClient`` pointed at :class:`~tests.azure_fake.server.AzureMLFake`: a custom cloud whose endpoints
are the fake's base URL, a static bearer token, the fake's certificate trusted for ``requests`` and ``httpx``.

Gotchas of azure-ai-ml 1.23.1 handled here: the cloud registry is process-wide and never overwrites a name (a new
name per server), and constructing a client sets ``AZUREML_CURRENT_CLOUD`` (restored by :func:`fake_cloud`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
from collections.abc import Iterator
from typing import Any

from azure.core.credentials import AccessToken

from tests.azure_fake.server import STORAGE_DOMAIN, AzureMLFake

_CLOUD_NAMES = itertools.count(1)
# What constructing a client or trusting the fake's certificate changes in the environment.
_ENV_KEYS = ("AZUREML_CURRENT_CLOUD", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE")


class StaticToken:
    """A credential: one fixed bearer token (the fake accepts any); counts the tokens handed out."""

    def __init__(self, token: str = "fake-arm-token", fail: Exception | None = None) -> None:
        self.token, self.fail, self.issued = token, fail, 0

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        if self.fail is not None:
            raise self.fail
        self.issued += 1
        return AccessToken(self.token, 2**31 - 1)


def cloud_options(fake: AzureMLFake) -> dict[str, Any]:
    """``MLClient`` keyword arguments that send every request of a new custom cloud to the fake."""
    base = fake.base_url + "/"
    return {
        "cloud": f"FinetunePhiFake{os.getpid()}x{next(_CLOUD_NAMES)}",
        "cloud_metadata": {
            "resource_manager": base,
            "active_directory": base,
            "azure_portal": base,
            "aml_resource_id": base,
            "registry_discovery_endpoint": base,
            "storage_endpoint": f"{STORAGE_DOMAIN}:{fake.port}",
        },
    }


@contextlib.contextmanager
def storage_hosts_on_loopback() -> Iterator[None]:
    """Resolve ``*.blob.<STORAGE_DOMAIN>`` to 127.0.0.1 (blob storage is addressed by account host name)."""
    real = socket.getaddrinfo

    def resolve(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.endswith("." + STORAGE_DOMAIN):
            host = "127.0.0.1"
        return real(host, *args, **kwargs)

    socket.getaddrinfo = resolve
    try:
        yield
    finally:
        socket.getaddrinfo = real


@contextlib.contextmanager
def fake_cloud(fake: AzureMLFake) -> Iterator[dict[str, Any]]:
    """Trust the fake's certificate, resolve its storage host names, and yield its cloud options; the environment
    and the resolver are restored afterwards."""
    saved = {key: os.environ.get(key) for key in _ENV_KEYS}
    os.environ["REQUESTS_CA_BUNDLE"] = os.environ["SSL_CERT_FILE"] = str(fake.cert_path)
    try:
        with storage_hosts_on_loopback():
            yield cloud_options(fake)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
