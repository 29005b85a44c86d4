"""A training job's identity and its command line: one function each, used by every backend.

Both read only the :class:`~tasks.backends.base.TrainingJobSpec` (plus where the backend runs the job), so the same
inputs give the same job id and the same ``python sft.py ...`` arguments on ``local`` and on ``azureml``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from tasks.backends.base import BackendError, TrainingJobSpec
from tasks.state import sha256_file, sha256_text, sha256_tree

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAINING_DIR = REPO_ROOT / "training"


class RecipeOutsideCodeError(BackendError, ValueError):
    """The recipe is not inside the job's code folder, so the job could not read it."""


def _resolved_recipe(recipe: Path) -> Path:
    return (recipe if recipe.is_absolute() else REPO_ROOT / recipe).resolve()


def recipe_in_code(recipe: Path, training_dir: Path = TRAINING_DIR) -> str:
    """The recipe's path relative to ``training/``: jobs run from there (locally as the working directory, on Azure
    ML as the uploaded code snapshot)."""
    resolved = _resolved_recipe(recipe)
    try:
        relative = resolved.relative_to(Path(training_dir).resolve()).as_posix()
    except ValueError:
        raise RecipeOutsideCodeError(
            f"recipe {recipe} is outside {training_dir}: jobs run from training/ (the code snapshot, all that "
            "Azure ML uploads), so put the recipe in training/recipes/"
        ) from None
    if not resolved.is_file():
        raise FileNotFoundError(f"recipe {recipe} not found; set training.recipe to a file in training/recipes/")
    return relative


def override_args(overrides: Mapping[str, object]) -> list[str]:
    """``--key value`` pairs, sorted by key, each value as the command line shows it (``5`` and ``"5"`` agree)."""
    args: list[str] = []
    for key, value in sorted((str(k), str(v)) for k, v in overrides.items()):
        args += [f"--{key}", value]
    return args


def training_args(
    spec: TrainingJobSpec, *, train_file: str, eval_file: str, output_dir: str, training_dir: Path = TRAINING_DIR
) -> list[str]:
    """``sft.py --config recipes/X.yaml --train_file ... --output_dir ... [--override value ...]``: the job's
    arguments after the interpreter, with each backend's own data and output locations filled in."""
    return [
        "sft.py",
        "--config",
        recipe_in_code(spec.recipe, training_dir),
        "--train_file",
        train_file,
        "--eval_file",
        eval_file,
        "--output_dir",
        output_dir,
        "--manifest_sha256",
        spec.manifest_sha256,
        *override_args(spec.overrides),
    ]


def job_identity(
    spec: TrainingJobSpec,
    *,
    data: tuple[str, str],
    target: Mapping[str, str],
    training_dir: Path = TRAINING_DIR,
) -> str:
    """12 hex digits from what the job computes: the data manifest, the recipe's bytes, the training code, the
    overrides as the command line shows them, the data locations (train, eval), the experiment, and ``target``:
    where and how the backend runs it (local: the MLflow store; Azure ML: cluster, nodes, environment).

    The same inputs give the same identity, so a flow re-run after a crash finds the job it already started.
    """
    recipe = _resolved_recipe(spec.recipe)
    document = {
        "manifest": spec.manifest_sha256,
        "recipe_sha256": sha256_file(recipe) if recipe.is_file() else f"missing:{spec.recipe}",
        "code": sha256_tree(training_dir) if Path(training_dir).is_dir() else "missing",
        "overrides": override_args(spec.overrides),
        "train_file": data[0],
        "eval_file": data[1],
        "experiment": spec.experiment,
        "target": dict(target),
    }
    return sha256_text(json.dumps(document, sort_keys=True))[:12]


__all__ = [
    "TRAINING_DIR",
    "RecipeOutsideCodeError",
    "job_identity",
    "override_args",
    "recipe_in_code",
    "training_args",
]
