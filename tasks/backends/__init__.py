"""Backends: where the pipeline runs. ``get_backend(settings)`` picks one from ``settings.backend``.

The azureml backend is imported only when asked for, so the local default never pays for ``azure-ai-ml``.
"""

from __future__ import annotations

from tasks.backends.base import Backend
from tasks.config import Settings


def get_backend(settings: Settings) -> Backend:
    """The backend named by ``settings.backend`` (``local`` or ``azureml``), built from the same settings."""
    if settings.backend == "local":
        from tasks.backends.local import LocalBackend

        return LocalBackend(settings)
    if settings.backend == "azureml":
        try:
            from tasks.backends.azureml import AzureMLBackend
        except ImportError as exc:
            raise ImportError(
                f"the azureml backend cannot be loaded ({exc}); install the project with its pinned constraints"
            ) from exc
        return AzureMLBackend(settings)
    raise ValueError(f"unknown backend {settings.backend!r}: use 'local' or 'azureml'")


__all__ = ["Backend", "get_backend"]
