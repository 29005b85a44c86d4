"""``finetune-phi azureml check``: every ✗ through the real SDK against the REST fake on loopback HTTPS."""

from __future__ import annotations

import pytest
from azure.core.exceptions import ClientAuthenticationError

from tasks.backends.azureml import AzureMLBackend
from tasks.backends.azureml_cli import check
from tasks.preflight import PreflightError, azureml_checks, require, table
from tests.azure_fake.client import StaticToken, fake_cloud


def _rows(checks) -> dict[str, tuple[bool, str, str]]:
    return {c.name: (c.ok, c.detail, c.fix) for c in checks}


def test_every_check_passes_on_a_ready_workspace(rest_backend, azure, settings) -> None:
    checks = azureml_checks(settings, rest_backend)
    assert [c.name for c in checks] == [
        "credential", "workspace", "training VM size", "deployment SKU", "training quota", "deployment quota",
        "identity", "endpoint name", "environment",
    ]  # fmt: skip
    assert all(c.ok for c in checks), table(checks)
    rows = _rows(checks)
    assert rows["workspace"][1] == "my-aml-workspace in eastus2 (resource group my-resource-group)"
    assert "8 vCPUs of standardESv3Family needed (2 x 4)" in rows["deployment quota"][1]  # 1 instance + 20% reserve
    assert azure.sent("GET", r"/providers/Microsoft\.ManagedIdentity/userAssignedIdentities/finetune-phi-uai$")
    require(checks)  # nothing to raise


def test_the_endpoint_name_is_ours_after_a_rollout_created_it(rest_backend, azure, settings) -> None:
    rest_backend.ensure_endpoint()
    assert _rows(azureml_checks(settings, rest_backend))["endpoint name"][:2] == (
        True,
        "finetune-phi-ep exists and is ours (tag created_by=finetune-phi)",
    )


@pytest.mark.parametrize(
    ("breaks", "failed", "says"),
    [
        (lambda a, s: setattr(a, "workspace_exists", False), "workspace", "check azureml.subscription_id"),
        (lambda a, s: a.sizes.pop(2), "training VM size", "Standard_NC24ads_A100_v4 is not offered in eastus2"),
        (lambda a, s: a.sizes.pop(0), "deployment SKU", "Standard_E4s_v3 is not offered in eastus2"),
        (lambda a, s: a.usage.update(StandardNCADSA100v4Family=(12, 24)), "training quota", "12 of 24 free"),
        (lambda a, s: a.usage.update(standardESv3Family=(6, 8)), "deployment quota", "2 of 8 free"),
        (lambda a, s: a.identities.clear(), "identity", "does not exist"),
        # The config refuses such a name when it is loaded; preflight checks it again for a Settings built in code.
        (lambda a, s: s.endpoint.__dict__.update(name="ep"), "endpoint name", "needs 3 to 32 characters"),
        (lambda a, s: a.add_endpoint(s.endpoint.name, {"team": "x"}), "endpoint name", "not created by finetune-phi"),
        (lambda a, s: s.azureml.environment.__setattr__("image", ""), "environment", "no base image set"),
    ],
    ids=["workspace", "vm-size", "sku", "training-quota", "deployment-quota", "identity", "name-rule", "name-taken",
         "image"],
)  # fmt: skip
def test_each_failure_is_a_cross_with_what_to_do(rest_backend, azure, settings, capsys, breaks, failed, says) -> None:
    breaks(azure, settings)
    checks = azureml_checks(settings, rest_backend)
    rows = _rows(checks)
    ok, detail, fix = rows[failed]
    assert not ok and says in f"{detail} {fix}" and fix, table(checks)
    # One cause, one cross; the checks that need what failed say they were not checked.
    crossed = [c for c in checks if not c.ok]
    assert crossed[0].name == failed and all(c.detail.startswith("not checked") for c in crossed[1:])
    with pytest.raises(PreflightError, match=f"{failed}: "):
        require(checks)
    printed = table(checks)
    assert f"✗ {failed}" in printed and f"fix: {fix}" in printed


def test_no_token_fails_the_credential_and_sends_nothing(settings, azure, clock, training_dir) -> None:
    with fake_cloud(azure) as cloud:
        backend = AzureMLBackend(
            settings, credential=StaticToken(fail=ClientAuthenticationError("AADSTS700016: no such app")), cloud=cloud
        )
        checks = azureml_checks(settings, backend)
        backend.close()
    ok, detail, fix = _rows(checks)["credential"]
    assert not ok and "AADSTS700016" in detail and "az login" in fix
    assert all(not c.ok for c in checks[1:7]) and azure.requests == []


def test_the_check_command_prints_the_table_and_exits_1_on_a_cross(rest_backend, azure, settings, capsys) -> None:
    azure.usage["standardESv3Family"] = (6, 8)
    assert check(settings, rest_backend) == 1
    out = capsys.readouterr().out
    assert "✔ recipe" in out and "✗ deployment quota" in out and "1 of 10 checks failed: deployment quota" in out
    azure.usage["standardESv3Family"] = (0, 100)
    assert check(settings, rest_backend) == 0
    assert capsys.readouterr().out.rstrip().endswith("ready to run")


def test_a_missing_recipe_stops_the_azure_preflight(rest_backend, settings, capsys) -> None:
    settings.training.recipe = settings.training.recipe.parent / "nope.yaml"
    assert check(settings, rest_backend) == 1
    assert "✗ recipe" in capsys.readouterr().out


def test_the_cli_has_the_check_command() -> None:
    from flows.cli import build_parser

    args = build_parser().parse_args(["azureml", "check", "--config", "configs/azureml.yaml"])
    assert args.handler.__name__ == "_check_command"
