"""Cache keys for the flow's expensive steps, built from content hashes only, and the cached-step runner.

Keys built from Python objects (a model, a client, a config object's repr) break or, worse, hit for different
inputs (PrefectHQ/prefect#16049, #15861, #17547). So each key is the sha256 of a small JSON document of
strings: file hashes, the relevant config section as JSON, the state folder. The flow computes the key with
these plain functions and passes it to the task as its ``content_key`` parameter; :func:`content_key_fn` makes
Prefect use exactly that as the cache key. :func:`run_cached` runs such a task and repairs a cache hit whose files
are gone (a deleted state folder must not turn into a run that points at nothing).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger

from tasks.config import Settings
from tasks.state import sha256_file, sha256_text, sha256_tree

# Bump when the meaning of a cached result changes (its fields, the way it is computed).
CACHE_VERSION = "1"
TRAINING_CODE = Path(__file__).resolve().parent.parent / "training"
# The steps ``refresh=[...]`` can force to run again even where their cache would hit.
REFRESHABLE = ("data", "training", "deploy")


def _digest(kind: str, parts: dict[str, Any]) -> str:
    document = json.dumps({"kind": kind, "version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return f"{kind}-{sha256_text(document)}"


def data_cache_key(settings: Settings, source_fingerprint: str) -> str:
    """The source's content fingerprint (from ``tasks.data.source_fingerprint``) + the data section + the state
    folder the files land in."""
    return _digest(
        "data",
        {
            "source": source_fingerprint,
            "config": settings.data.model_dump(mode="json"),
            "state_dir": str(Path(settings.state_dir).resolve()),
        },
    )


def training_cache_key(settings: Settings, manifest_sha256: str, code_root: Path | None = None) -> str:
    """Manifest hash + recipe file hash + training code hash + overrides + where the job runs."""
    code_root = code_root or TRAINING_CODE
    recipe = Path(settings.training.recipe)
    return _digest(
        "training",
        {
            "manifest": manifest_sha256,
            "recipe": sha256_file(recipe) if recipe.is_file() else f"missing:{recipe}",
            "code": sha256_tree(code_root),
            "overrides": settings.training.overrides,
            "backend": settings.backend,
            "state_dir": str(Path(settings.state_dir).resolve()),
        },
    )


def evaluation_cache_key(settings: Settings, job_id: str, manifest_sha256: str) -> str:
    """A finished job's model never changes, so its id, the test split and the evaluation settings suffice."""
    return _digest(
        "evaluation",
        {"job": job_id, "manifest": manifest_sha256, "config": settings.evaluation.model_dump(mode="json")},
    )


def content_key_fn(context: Any, parameters: dict[str, Any]) -> str | None:
    """Prefect ``cache_key_fn``: the task's ``content_key`` parameter, computed by the functions above (none: the
    task is called outside the flow and is not cached)."""
    key = parameters.get("content_key")
    return str(key) if key else None


def check_refresh(refresh: list[str] | None) -> set[str]:
    """The steps to force, refusing a name that is not one (before anything runs)."""
    wanted = set(refresh or [])
    unknown = wanted - set(REFRESHABLE)
    if unknown:
        raise ValueError(f"cannot refresh {sorted(unknown)}: choose from {', '.join(REFRESHABLE)}")
    return wanted


@dataclass(frozen=True)
class StepResult:
    """A cached step's result and the Prefect state it ended in (``Cached`` when the cache served it)."""

    value: Any
    state: str

    @property
    def cached(self) -> bool:
        return self.state == "Cached"


def run_cached(step: Any, *args: Any, refresh: bool, still_valid: Callable[[Any], bool], stale: str) -> StepResult:
    """Run the task ``step`` (its cache forced off by ``refresh``); a cache hit whose result fails ``still_valid``
    (its files were deleted) is logged with ``stale`` and computed again."""
    state = step.with_options(refresh_cache=refresh)(*args, return_state=True)
    value = state.result()
    if state.name == "Cached" and not still_valid(value):
        get_run_logger().warning("%s; running the step again", stale)
        state = step.with_options(refresh_cache=True)(*args, return_state=True)
        value = state.result()
    return StepResult(value, state.name)


__all__ = [
    "REFRESHABLE",
    "StepResult",
    "check_refresh",
    "content_key_fn",
    "data_cache_key",
    "evaluation_cache_key",
    "run_cached",
    "training_cache_key",
]
