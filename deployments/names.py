"""Azure ML's naming rule for online endpoints and deployments, in one place for both backends.

Azure ML ("Manage and increase quotas", endpoint limits) and azure-ai-ml's own check
(``validate_endpoint_or_deployment_name``, ``EndpointConfigurations.NAME_REGEX_PATTERN``) agree: an endpoint or
deployment name begins with a letter, is 3 to 32 characters long, and holds only ASCII letters, digits and '-',
ending with a letter or digit. The endpoint name also becomes part of the scoring host name on Azure
(``<endpoint>.<region>.inference.ml.azure.com``), which is why the same rule cannot be relaxed locally.
"""

from __future__ import annotations

import re
from typing import Literal

MIN_LENGTH = 3
MAX_LENGTH = 32
_PATTERN = re.compile(r"[a-zA-Z](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?")
NameKind = Literal["endpoint", "deployment"]


class InvalidNameError(ValueError):
    """A name Azure ML would refuse; the message says the rule."""


def name_problem(name: object, kind: NameKind) -> str | None:
    """Why Azure ML would refuse ``name`` for an endpoint or deployment, or None when it is valid."""
    article = "an endpoint" if kind == "endpoint" else "a deployment"
    if not isinstance(name, str) or not MIN_LENGTH <= len(name) <= MAX_LENGTH:
        return (
            f"{name!r} is not a valid name for {article}: Azure ML needs {MIN_LENGTH} to {MAX_LENGTH} characters "
            "(letters, digits and '-', starting with a letter and ending with a letter or digit)"
        )
    if not _PATTERN.fullmatch(name) or not name.isascii():
        return (
            f"{name!r} is not a valid name for {article}: Azure ML allows only letters (a-z, A-Z), digits and '-', "
            "starting with a letter and ending with a letter or digit"
        )
    return None


def check_name(name: object, kind: NameKind) -> str:
    """``name`` itself when Azure ML accepts it; :class:`InvalidNameError` naming the rule otherwise."""
    problem = name_problem(name, kind)
    if problem is not None:
        raise InvalidNameError(problem)
    assert isinstance(name, str)
    return name
