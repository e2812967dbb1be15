"""terraform/: parsed with python-hcl2 and scanned with checkov; no provider, no AWS account.

checkov runs from its own virtualenv (its pins clash with ours):

    python3 -m venv .venv-checkov && .venv-checkov/bin/pip install checkov
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import hcl2
import pytest

from tests.support.services import unavailable
from tests.unit.deploy.files import BEHALF_VARIABLE, ROOT, TERRAFORM_DIR
from tests.unit.deploy.known import KNOWN_COMMANDS, KNOWN_VARIABLES

TF_FILES = sorted(TERRAFORM_DIR.glob("*.tf"))
SKIP_COMMENT = re.compile(r"#\s*checkov:skip=(?P<id>[A-Z0-9_]+)(?::(?P<reason>.*))?")


def parse(path: Path) -> dict[str, Any]:
    """One .tf file as python-hcl2 sees it, with plain (unquoted) strings on every version."""
    text = path.read_text(encoding="utf-8")
    try:
        from hcl2.utils import SerializationOptions  # python-hcl2 >= 6
    except ImportError:  # pragma: no cover - older python-hcl2 already strips quotes
        return hcl2.loads(text)
    options = SerializationOptions(
        strip_string_quotes=True, explicit_blocks=False, with_comments=False
    )
    return hcl2.loads(text, serialization_options=options)


@pytest.fixture(scope="module")
def config() -> dict[str, list[dict[str, Any]]]:
    """All files merged: {"resource": [...], "variable": [...], ...}."""
    merged: dict[str, list[dict[str, Any]]] = {}
    for path in TF_FILES:
        for block_type, blocks in parse(path).items():
            merged.setdefault(block_type, []).extend(blocks)
    return merged


def blocks(config: dict[str, list[dict[str, Any]]], block_type: str) -> dict[str, dict[str, Any]]:
    """{name: body} of single-label blocks (variable, output)."""
    return {name: body for block in config.get(block_type, []) for name, body in block.items()}


def resources(
    config: dict[str, list[dict[str, Any]]], kind: str = "resource"
) -> dict[tuple[str, str], dict[str, Any]]:
    """{(type, name): body} of resources or data sources."""
    return {
        (rtype, name): body
        for block in config.get(kind, [])
        for rtype, named in block.items()
        for name, body in named.items()
    }


def unwrap(value: Any) -> Any:
    """HCL attributes and nested blocks may come back as one-element lists."""
    while isinstance(value, list) and len(value) == 1:
        value = value[0]
    return value


def all_text() -> str:
    return "\n".join(path.read_text(encoding="utf-8") for path in TF_FILES)


# --- structure ----------------------------------------------------------------------------------


def test_the_expected_files_exist() -> None:
    names = {path.name for path in TF_FILES}
    assert {"versions.tf", "variables.tf", "outputs.tf"} <= names
    assert (TERRAFORM_DIR / "README.md").is_file()


@pytest.mark.parametrize("path", TF_FILES, ids=lambda path: path.name)
def test_every_tf_file_parses(path: Path) -> None:
    assert parse(path)


def test_every_variable_has_a_description(config: dict[str, list[dict[str, Any]]]) -> None:
    variables = blocks(config, "variable")
    assert variables
    missing = sorted(
        name for name, body in variables.items() if not str(body.get("description", "")).strip()
    )
    assert not missing, f"variables without a description: {missing}"


def test_every_output_has_a_description(config: dict[str, list[dict[str, Any]]]) -> None:
    outputs = blocks(config, "output")
    assert outputs
    missing = sorted(
        name for name, body in outputs.items() if not str(body.get("description", "")).strip()
    )
    assert not missing, f"outputs without a description: {missing}"


def test_the_aws_provider_is_pinned(config: dict[str, list[dict[str, Any]]]) -> None:
    terraform = unwrap(config["terraform"])
    providers = unwrap(terraform["required_providers"])
    aws = unwrap(providers["aws"])
    assert aws["source"] == "hashicorp/aws"
    assert re.match(r"^(~>|=|>=)\s*\d+\.\d+", aws["version"]), aws["version"]
    assert terraform.get("required_version")


# --- what behalf is told ------------------------------------------------------------------------


def test_behalf_variables_are_known_settings() -> None:
    text = all_text()
    literal = set(BEHALF_VARIABLE.findall(text))
    # Secrets are injected as "BEHALF_${name}" for each name in the roles' secrets lists.
    secret_names = set(
        re.findall(r'"([A-Z_]+)"', "".join(re.findall(r"secrets\s*=\s*tolist\(\[[^\]]*\]", text)))
    )
    injected = {f"BEHALF_{name}" for name in secret_names}
    assert literal and injected
    unknown = sorted((literal | injected) - KNOWN_VARIABLES)
    assert not unknown, f"unknown settings in terraform/: {unknown}"


def test_secrets_never_travel_as_plain_environment(config: dict[str, list[dict[str, Any]]]) -> None:
    local_values: dict[str, Any] = {}
    for block in config["locals"]:
        local_values.update(block)
    environment = local_values["environment"]
    secret_like = {name for name in environment if re.search(r"SECRET|TOKEN|PASSWORD|_URL$", name)}
    assert secret_like <= {"BEHALF_PUBLIC_URL"}, (
        f"secret settings in plain environment: {secret_like}"
    )
    secret_names = set(re.findall(r'"([A-Z_]+)"', local_values["secret_names"]))
    assert {
        "DATABASE_URL",
        "REDIS_URL",
        "BROKER_URL",
        "SECRET_KEY",
        "OPS_TOKEN",
        "SMTP_URL",
    } <= secret_names


def test_every_behalf_command_is_a_known_cli_command() -> None:
    commands = re.findall(r'"behalf"\s*,\s*"([a-z-]+)"', all_text())
    assert {"api", "worker", "scheduler", "migrate"} <= set(commands)
    assert set(commands) <= KNOWN_COMMANDS


# --- security properties the design relies on ---------------------------------------------------


def policy_statements(config: dict[str, list[dict[str, Any]]], name: str) -> list[dict[str, Any]]:
    document = resources(config, "data")[("aws_iam_policy_document", name)]
    statements = document["statement"]
    return statements if isinstance(statements, list) else [statements]


def conditions(statement: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = statement.get("condition", [])
    found = found if isinstance(found, list) else [found]
    return {item["variable"]: item for item in found}


def test_token_key_rotates(config: dict[str, list[dict[str, Any]]]) -> None:
    key = resources(config)[("aws_kms_key", "tokens")]
    assert key["enable_key_rotation"] is True
    assert "aws_iam_policy_document.tokens_key" in key["policy"]


def test_token_key_is_used_only_with_behalf_encryption_context(
    config: dict[str, list[dict[str, Any]]],
) -> None:
    crypto = {
        "kms:Decrypt",
        "kms:GenerateDataKey",
        "kms:ReEncryptFrom",
        "kms:ReEncryptTo",
        "kms:Encrypt",
    }
    using = []
    for statement in policy_statements(config, "tokens_key"):
        actions = set(statement["actions"])
        assert "kms:*" not in actions and "kms:CreateGrant" not in actions, statement.get("sid")
        if actions & crypto:
            using.append(statement)
            found = conditions(statement)
            keys = found["kms:EncryptionContextKeys"]
            assert keys["test"] == "ForAllValues:StringEquals"
            assert "local.token_context_keys" in str(keys["values"])
            # ForAllValues is vacuously true for an empty context: purpose must be present.
            assert found["kms:EncryptionContext:purpose"] == {
                "test": "Null",
                "variable": "kms:EncryptionContext:purpose",
                "values": ["false"],
            }
            principals = str(statement["principals"])
            assert "aws_iam_role.task" in principals and ":root" not in principals
    sids = {statement["sid"]: set(statement["actions"]) for statement in using}
    assert sids == {
        "EnvelopeEncryptionWithBehalfContext": {"kms:GenerateDataKey", "kms:Decrypt"},
        "RewrapDataKeysWithBehalfContext": {
            "kms:GenerateDataKey",
            "kms:Decrypt",
            "kms:ReEncryptFrom",
            "kms:ReEncryptTo",
        },
    }
    context_keys = next(
        block["token_context_keys"] for block in config["locals"] if "token_context_keys" in block
    )
    assert sorted(context_keys) == ["agent", "delegation", "purpose", "user"]


def test_key_policy_admits_the_encryption_contexts_the_vault_uses(
    config: dict[str, list[dict[str, Any]]],
) -> None:
    # Given the contexts behalf's vault really sends to KMS
    from delegation.vault import agent_context, delegation_context

    contexts = [delegation_context("user", "delegation", "agent"), agent_context("agent")]
    # Then the key policy's conditions let exactly those through
    context_keys = set(
        next(
            block["token_context_keys"]
            for block in config["locals"]
            if "token_context_keys" in block
        )
    )
    purposes = blocks(config, "variable")["kms_encryption_purposes"]["default"]
    for context in contexts:
        assert set(context) <= context_keys, f"KMS would deny context keys {sorted(context)}"
        assert "purpose" in context and "agent" in context
        assert context["purpose"] in purposes, f"purpose {context['purpose']!r} is not allowed"


def test_database_is_private_encrypted_and_protected(
    config: dict[str, list[dict[str, Any]]],
) -> None:
    db = resources(config)[("aws_db_instance", "this")]
    assert db["engine"] == "postgres"
    assert db["storage_encrypted"] is True
    assert "aws_kms_key" in db["kms_key_id"]
    assert db["publicly_accessible"] is False
    assert db["deletion_protection"] == "${var.db_deletion_protection}"
    assert db["multi_az"] == "${var.db_multi_az}"
    assert db["backup_retention_period"] == "${var.db_backup_retention_days}"
    variables = blocks(config, "variable")
    assert variables["db_deletion_protection"]["default"] is True
    assert variables["db_backup_retention_days"]["default"] >= 7


def test_redis_is_encrypted_in_transit_and_at_rest(config: dict[str, list[dict[str, Any]]]) -> None:
    redis = resources(config)[("aws_elasticache_replication_group", "this")]
    assert redis["transit_encryption_enabled"] is True
    assert redis["at_rest_encryption_enabled"] is True
    assert "random_password" in redis["auth_token"]
    assert "aws_kms_key" in redis["kms_key_id"]


def test_each_role_has_its_own_task_and_execution_role(
    config: dict[str, list[dict[str, Any]]],
) -> None:
    definition = resources(config)[("aws_ecs_task_definition", "this")]
    assert definition["task_role_arn"] == "${aws_iam_role.task[each.key].arn}"
    assert definition["execution_role_arn"] == "${aws_iam_role.execution[each.key].arn}"
    for name in ("api", "worker", "scheduler"):
        service = resources(config)[("aws_ecs_service", name)]
        assert f'aws_ecs_task_definition.this["{name}"]' in service["task_definition"]


def test_log_groups_are_encrypted_and_expire(config: dict[str, list[dict[str, Any]]]) -> None:
    groups = {
        key: body for key, body in resources(config).items() if key[0] == "aws_cloudwatch_log_group"
    }
    assert groups
    for key, body in groups.items():
        assert "aws_kms_key" in body.get("kms_key_id", ""), key
        assert body.get("retention_in_days"), key


def test_api_is_served_over_https_with_the_given_certificate(
    config: dict[str, list[dict[str, Any]]],
) -> None:
    listeners = {
        key: body for key, body in resources(config).items() if key[0] == "aws_lb_listener"
    }
    assert listeners
    for key, listener in listeners.items():
        assert listener["protocol"] == "HTTPS", key
        assert listener["certificate_arn"] == "${var.certificate_arn}"


def test_worker_scales_on_the_queue_depth_metric(config: dict[str, list[dict[str, Any]]]) -> None:
    policy = resources(config)[("aws_appautoscaling_policy", "worker_backlog")]
    assert policy["policy_type"] == "TargetTrackingScaling"
    assert "aws_ecs_service.worker" in str(
        resources(config)[("aws_appautoscaling_target", "worker")]
    )
    variables = blocks(config, "variable")
    assert variables["queue_depth_metric_namespace"]["default"] == "behalf"
    assert variables["queue_depth_metric_name"]["default"] == "QueueDepth"
    assert "var.queue_depth_metric_name" in str(policy)


# --- checkov ------------------------------------------------------------------------------------


def checkov_binary() -> str:
    local = ROOT / ".venv-checkov" / "bin" / "checkov"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    on_path = shutil.which("checkov")
    if on_path:
        return on_path
    unavailable(
        "checkov is not installed: python3 -m venv .venv-checkov && "
        ".venv-checkov/bin/pip install checkov"
    )


def skip_comments() -> list[tuple[str, str, str]]:
    """(file, check id, reason) of every checkov skip in terraform/."""
    found = []
    for path in TF_FILES:
        for line in path.read_text(encoding="utf-8").splitlines():
            match = SKIP_COMMENT.search(line)
            if match:
                found.append((path.name, match["id"], (match["reason"] or "").strip()))
    return found


def test_every_checkov_skip_is_justified() -> None:
    for file, check, reason in skip_comments():
        assert len(reason) >= 20, f"{file}: skip of {check} needs a real reason"


@pytest.fixture(scope="module")
def checkov_report() -> dict[str, Any]:
    """checkov --framework terraform --compact over terraform/, as JSON (all results)."""
    result = subprocess.run(
        [
            checkov_binary(),
            "--directory",
            str(TERRAFORM_DIR),
            "--framework",
            "terraform",
            "--compact",
            "--skip-download",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
        env={**os.environ, "LOG_LEVEL": "WARNING"},
    )
    assert result.returncode in (0, 1), f"checkov crashed:\n{result.stderr[-4000:]}"
    report = json.loads(result.stdout)
    return (
        report
        if isinstance(report, dict)
        else next(r for r in report if r["check_type"] == "terraform")
    )


def test_checkov_passes(checkov_report: dict[str, Any]) -> None:
    summary = checkov_report["summary"]
    assert summary["resource_count"] > 0 and summary["passed"] > 0
    assert summary["parsing_errors"] == 0
    failures = [
        f"{check['check_id']} {check['resource']} ({check['file_path']}): {check['check_name']}"
        for check in checkov_report["results"]["failed_checks"]
    ]
    assert not failures, "checkov failures:\n" + "\n".join(failures)


def test_every_checkov_skip_is_still_needed(checkov_report: dict[str, Any]) -> None:
    skipped = {check["check_id"] for check in checkov_report["results"]["skipped_checks"]}
    stale = sorted({(file, check) for file, check, _ in skip_comments() if check not in skipped})
    assert not stale, f"skip comments that suppress nothing (remove them): {stale}"
