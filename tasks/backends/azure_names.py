"""Azure ML's rules for the names we choose, checked before any request, with azure-ai-ml's own validator.

The SDK applies them only deep inside ``begin_create_or_update`` (a ``ValidationException`` after the workspace
and endpoint reads); here a bad name is one sentence naming the config field, before anything is sent.
"""

from __future__ import annotations

from azure.ai.ml.entities._endpoint._endpoint_helpers import validate_endpoint_or_deployment_name
from azure.ai.ml.exceptions import ValidationException


def name_problem(name: str, field: str, *, deployment: bool = False) -> str | None:
    """Why ``name`` is not a valid Azure ML endpoint (or deployment) name, or None when it is."""
    try:
        validate_endpoint_or_deployment_name(name, is_deployment=deployment)
    except ValidationException as exc:
        rule = " ".join(str(exc.message).split())
        return f"{field} {name!r} is not a valid Azure ML {'deployment' if deployment else 'endpoint'} name: {rule}"
    return None


__all__ = ["name_problem"]
