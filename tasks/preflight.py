"""Preflight: what would stop a run, checked before anything costs money or GPU time.

``finetune-phi azureml check --config configs/azureml.yaml`` prints one row per check (✔ or ✗, what was found, and
for each ✗ what to do) and exits 1 on any ✗; the flow runs the same checks before it submits training, so a run
that cannot deploy stops before an hour of GPU time.

- azureml: the credential gets a token; the workspace exists (and where); the training VM size and the deployment
  SKU exist in that region; the vCPU quota covers both (the deployment with Azure's upgrade reserve); the
  user-assigned identity exists (an ARM GET); the endpoint name is valid and free or already ours; the environment's
  base image and conda file are set.
- local: the recipe exists and parses with the training script's own parser; the data source is readable; the
  endpoint port is free or our endpoint server's; the state folder's disk has room for checkpoints.

Each check is a plain function returning a :class:`Check`; one that raises becomes a ✗ with the error's sentence,
so one failure never hides the others.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.backends.base import BackendError
from tasks.config import Settings
from tasks.state import atomic_write_text, sha256_file, sha256_text

REPO_ROOT = Path(__file__).resolve().parents[1]
IDENTITY_API_VERSION = "2023-01-31"
# Room for a few checkpoints of the tiny CPU recipe and a LoRA run; a full fine-tune of Phi-3.5 needs far more,
# which the training log reports when it runs out.
MIN_FREE_BYTES = 2 * 1024**3
RECIPE_CHECK_TIMEOUT_S = 300.0
OK, FAIL = "✔", "✗"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str  # what was found
    fix: str = ""  # what to do, for a ✗

    @property
    def sentence(self) -> str:
        return f"{self.name}: {self.detail}" + (f"; {self.fix}" if self.fix else "")


class PreflightError(BackendError):
    """A run that would fail later: the failed checks, one sentence each. Never retried."""


def _guarded(name: str, check: Callable[[], Check]) -> Check:
    try:
        return check()
    except Exception as exc:  # a check that cannot run is a failed check, with its reason
        return Check(name, False, f"could not check ({type(exc).__name__}: {exc})", "fix the cause and run again")


# ---------------------------------------------------------------------------------------------- azureml


def _size_check(name: str, size: str, field: str, sizes: dict[str, tuple[str, int]], region: str) -> Check:
    if size.lower() in sizes:
        family, vcpus = sizes[size.lower()]
        return Check(name, True, f"{size} ({family}, {vcpus} vCPUs) is offered in {region}")
    return Check(name, False, f"{size} is not offered in {region}", f"choose another {field}")


def _quota_check(
    name: str, size: str, instances: int, sizes: dict[str, tuple[str, int]], quota: dict[str, tuple[int, int]]
) -> Check:
    if size.lower() not in sizes:
        return Check(name, False, f"not checked: {size} is not offered in the region", "choose another VM size")
    family, vcpus = sizes[size.lower()]
    if family.lower() not in quota:
        return Check(name, False, f"the region reports no quota for {family}", f"request {family} quota")
    used, limit = quota[family.lower()]
    need, free = instances * vcpus, limit - used
    detail = f"{need} vCPUs of {family} needed ({instances} x {vcpus}), {free} of {limit} free"
    if need > free:
        return Check(name, False, detail, f"request a quota increase for {family} in the Azure portal (Quotas)")
    return Check(name, True, detail)


def azureml_checks(settings: Settings, backend: Any) -> list[Check]:
    """Every azureml check, in the order a run needs them; ``backend`` is an :class:`AzureMLBackend`."""
    from tasks.backends.azureml_entities import azure_config

    cfg = azure_config(settings)
    checks: list[Check] = []

    def token() -> Check:
        backend.arm_token()
        return Check("credential", True, f"{cfg.credential} credential got a token for Azure Resource Manager")

    checks.append(_guarded("credential", token))
    if not checks[-1].ok:
        checks[-1] = Check(
            "credential",
            False,
            checks[-1].detail.replace("could not check", "no token"),
            "run `az login` (or set azureml.credential / azureml.managed_identity_client_id)",
        )
        rest = ("workspace", "training VM size", "deployment SKU", "training quota", "deployment quota", "identity")
        checks += [Check(n, False, "not checked: no credential", "fix the credential first") for n in rest]
        return [*checks, _endpoint_name_check(settings, None), _image_check(cfg)]

    region = ""

    def workspace() -> Check:
        nonlocal region
        try:
            region = backend.workspace_location()
        except BackendError as exc:
            return Check(
                "workspace",
                False,
                str(exc),
                "check azureml.subscription_id, resource_group and workspace (az ml workspace list)",
            )
        return Check("workspace", True, f"{cfg.workspace} in {region} (resource group {cfg.resource_group})")

    checks.append(_guarded("workspace", workspace))
    if not region:
        rest = ("training VM size", "deployment SKU", "training quota", "deployment quota")
        checks += [Check(n, False, "not checked: no workspace", "fix the workspace first") for n in rest]
    else:
        sizes = backend.vm_sizes()
        quota = backend.vcpu_quota()
        d = cfg.deployment
        checks.append(_size_check("training VM size", cfg.compute.size, "azureml.compute.size", sizes, region))
        checks.append(
            _size_check("deployment SKU", d.instance_type, "azureml.deployment.instance_type", sizes, region)
        )
        checks.append(_quota_check("training quota", cfg.compute.size, cfg.compute.max_instances, sizes, quota))
        reserved = math.ceil(d.instance_count * (1 + d.quota_upgrade_reserve))
        deployment_quota = _quota_check("deployment quota", d.instance_type, reserved, sizes, quota)
        checks.append(
            Check(
                deployment_quota.name,
                deployment_quota.ok,
                deployment_quota.detail + f", with Azure's {d.quota_upgrade_reserve:.0%} upgrade reserve",
                deployment_quota.fix or "",
            )
        )
    checks.append(_guarded("identity", lambda: _identity_check(cfg, backend)))
    checks.append(_guarded("endpoint name", lambda: _endpoint_name_check(settings, backend)))
    checks.append(_image_check(cfg))
    return checks


def _identity_check(cfg: Any, backend: Any) -> Check:
    identity = cfg.user_assigned_identity_id
    if not identity:
        return Check("identity", True, "none configured: the endpoint gets a system-assigned identity")
    name = identity.rstrip("/").rsplit("/", 1)[-1]
    if backend.arm_resource_exists(identity, IDENTITY_API_VERSION):
        return Check("identity", True, f"user-assigned identity {name} exists")
    return Check(
        "identity",
        False,
        f"user-assigned identity {identity} does not exist",
        "create it (az identity create) or fix azureml.user_assigned_identity_id",
    )


def _endpoint_name_check(settings: Settings, backend: Any) -> Check:
    from deployments.names import name_problem
    from tasks.backends.azureml_entities import OWNER_TAG

    name = settings.endpoint.name
    problem = name_problem(name, "endpoint")
    if problem is not None:
        return Check("endpoint name", False, f"endpoint.name {problem}", "choose another endpoint.name")
    if backend is None:
        return Check("endpoint name", True, f"{name} is a valid name (not looked up: no credential)")
    tags = backend.endpoint_tags()
    if tags is None:
        return Check("endpoint name", True, f"{name} is free in the workspace (names are unique per region)")
    if all(tags.get(k) == v for k, v in OWNER_TAG.items()):
        return Check("endpoint name", True, f"{name} exists and is ours (tag created_by=finetune-phi)")
    return Check(
        "endpoint name",
        False,
        f"{name} exists in the workspace and was not created by finetune-phi",
        "choose another endpoint.name (a rollout would take over its traffic)",
    )


def _image_check(cfg: Any) -> Check:
    env = cfg.environment
    if not (env.image or "").strip():
        return Check(
            "environment",
            False,
            "no base image set",
            "set azureml.environment.image (e.g. an mcr.microsoft.com/azureml image)",
        )
    conda = REPO_ROOT / env.conda_file
    if not conda.is_file():
        return Check("environment", False, f"conda file {conda} is missing", "fix azureml.environment.conda_file")
    return Check("environment", True, f"{env.image} with {env.conda_file}")


# ---------------------------------------------------------------------------------------------- local


def _repo_path(path: Path) -> Path:
    return path if path.is_absolute() else REPO_ROOT / path


def recipe_check(settings: Settings) -> Check:
    """The recipe parsed by ``training/sft.py``'s own parser (its ``check_recipe``), in a child process: the same
    interpreter, environment and imports the training job gets. A pass is remembered in the state folder under the
    hash of recipe and script (importing TRL takes seconds; an unchanged recipe need not pay them every run)."""
    recipe = _repo_path(Path(settings.training.recipe))
    if not recipe.is_file():
        return Check(
            "recipe",
            False,
            f"{settings.training.recipe} does not exist",
            "set training.recipe to a file in training/recipes/",
        )
    script = REPO_ROOT / "training" / "sft_args.py"  # the script's recipe and argument types
    key = sha256_text(f"{sys.executable}\n{sha256_file(recipe)}\n{sha256_file(script)}")[:24]
    passed = Path(settings.state_dir).expanduser() / "preflight" / f"recipe-{key}.ok"
    if passed.is_file():
        return Check("recipe", True, f"{settings.training.recipe} parses with training/sft.py's parser")
    code = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import sft_args as a; "
        "a.check_recipe(a.TrlParser(a.DATACLASSES), Path(sys.argv[2]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(REPO_ROOT / "training"), str(recipe)],
        capture_output=True,
        text=True,
        timeout=RECIPE_CHECK_TIMEOUT_S,
        env={**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")},
    )
    if proc.returncode == 0:
        passed.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(passed, str(recipe))
        return Check("recipe", True, f"{settings.training.recipe} parses with training/sft.py's parser")
    last = (proc.stderr.strip().splitlines() or ["the parser failed"])[-1]
    return Check(
        "recipe", False, last.removeprefix("sft_args.UsageError: ").removeprefix("UsageError: "), "fix the recipe"
    )


def data_check(settings: Settings) -> Check:
    data = settings.data
    if data.hub is not None:
        return Check("data", True, f"hub dataset {data.hub.id} (read when the data is prepared)")
    path = _repo_path(Path(data.path))
    if not path.exists():
        return Check(
            "data", False, f"{data.path} does not exist", "set data.path to a JSONL/JSON/Parquet file or folder"
        )
    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        return Check("data", False, f"{data.path} is not readable", "fix its permissions")
    if path.is_file():
        with open(path, "rb") as handle:
            handle.read(1)
    return Check("data", True, f"{data.path} is readable")


def port_check(settings: Settings) -> Check:
    from deployments.service import server_status

    host, port = settings.endpoint.host, settings.endpoint.port
    if server_status(settings).healthy:
        return Check("endpoint port", True, f"{host}:{port} is our endpoint server")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            return Check(
                "endpoint port",
                False,
                f"{host}:{port} is in use by another program ({exc.strerror})",
                "stop it or set endpoint.port",
            )
    return Check("endpoint port", True, f"{host}:{port} is free")


def disk_check(settings: Settings, min_free_bytes: int = MIN_FREE_BYTES) -> Check:
    folder = Path(settings.state_dir).expanduser().resolve()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    detail = f"{free / 1024**3:.1f} GiB free for {settings.state_dir}"
    if free < min_free_bytes:
        return Check(
            "disk",
            False,
            detail + f" (under {min_free_bytes / 1024**3:.1f} GiB)",
            "free some space or set state_dir elsewhere",
        )
    return Check("disk", True, detail)


def local_checks(settings: Settings) -> list[Check]:
    return [
        _guarded("recipe", lambda: recipe_check(settings)),
        _guarded("data", lambda: data_check(settings)),
        _guarded("endpoint port", lambda: port_check(settings)),
        _guarded("disk", lambda: disk_check(settings)),
    ]


# ---------------------------------------------------------------------------------------------- both


def run_checks(settings: Settings, backend: Any) -> list[Check]:
    """The checks of the run's backend. The recipe comes first on both: a usage error is the cheapest to catch."""
    if getattr(backend, "name", settings.backend) == "azureml":
        return [_guarded("recipe", lambda: recipe_check(settings)), *azureml_checks(settings, backend)]
    return local_checks(settings)


def table(checks: list[Check]) -> str:
    """One row per check: mark, name, what was found; a ✗ row is followed by what to do."""
    width = max((len(c.name) for c in checks), default=0)
    rows = []
    for c in checks:
        rows.append(f"{OK if c.ok else FAIL} {c.name:<{width}}  {c.detail}")
        if not c.ok and c.fix:
            rows.append(f"  {'':<{width}}  fix: {c.fix}")
    return "\n".join(rows)


def require(checks: list[Check]) -> None:
    """Raise :class:`PreflightError` naming every failed check, one sentence each."""
    failed = [c for c in checks if not c.ok]
    if failed:
        raise PreflightError(
            f"preflight stopped the run before it spent anything: {'. '.join(c.sentence for c in failed)}"
        )


@task(name="preflight", cache_policy=NO_CACHE)
def preflight_task(settings: Settings, backend: Any) -> list[dict[str, Any]]:
    """The flow's first step: the same checks as ``finetune-phi azureml check``, before any cost."""
    from prefect import get_run_logger

    checks = run_checks(settings, backend)
    get_run_logger().info("preflight:\n%s", table(checks))
    require(checks)
    return [asdict(c) for c in checks]


__all__ = [
    "Check",
    "PreflightError",
    "azureml_checks",
    "data_check",
    "disk_check",
    "local_checks",
    "port_check",
    "preflight_task",
    "recipe_check",
    "require",
    "run_checks",
    "table",
]
