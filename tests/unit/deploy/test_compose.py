"""docker-compose.yml and .env.example: the one-box stack, parsed, never started."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.unit.deploy.files import (
    BEHALF_VARIABLE,
    COMPOSE_FILE,
    ENV_EXAMPLE,
    SECRET_NAME,
    behalf_subcommand,
    command_argv,
    environment_pairs,
    is_reference,
    load_compose,
    load_env_example,
    scalars,
    secret_literals,
)
from tests.unit.deploy.known import KNOWN_COMMANDS, KNOWN_VARIABLES

EXPECTED_SERVICES = {
    "postgres",
    "redis",
    "kms",
    "kms-init",
    "mailpit",
    "sandbox",
    "migrate",
    "api",
    "worker",
    "scheduler",
}
LONG_RUNNING_ROLES = ("api", "worker", "scheduler")
ONE_SHOTS = ("migrate", "kms-init")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """{dependency: condition}; the short list form means service_started."""
    value = service.get("depends_on") or {}
    if isinstance(value, list):
        return {name: "service_started" for name in value}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in value.items()}


def test_the_stack_has_every_service(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == EXPECTED_SERVICES


def test_every_behalf_command_is_a_known_cli_command(services: dict[str, dict[str, Any]]) -> None:
    used = {}
    for name, service in services.items():
        subcommand = behalf_subcommand(command_argv(service))
        if subcommand is not None:
            used[name] = subcommand
    assert used, "no service runs `behalf ...`"
    unknown = {name: sub for name, sub in used.items() if sub not in KNOWN_COMMANDS}
    assert not unknown, f"services run unknown behalf commands: {unknown}"


@pytest.mark.parametrize(
    ("service", "argv"),
    [
        ("sandbox", ["behalf", "sandbox", "--host", "0.0.0.0"]),
        ("migrate", ["behalf", "migrate"]),
        ("api", ["behalf", "api", "--host", "0.0.0.0", "--port", "8000"]),
        ("worker", ["behalf", "worker", "--concurrency", "4"]),
        ("scheduler", ["behalf", "scheduler"]),
    ],
)
def test_each_role_runs_its_command(
    services: dict[str, dict[str, Any]], service: str, argv: list[str]
) -> None:
    actual = command_argv(services[service])
    assert actual[: len(argv)] == argv


def test_behalf_variables_are_known_settings(services: dict[str, dict[str, Any]]) -> None:
    compose_text = COMPOSE_FILE.read_text(encoding="utf-8")
    env_names = {entry.name for entry in load_env_example()}
    used = set(BEHALF_VARIABLE.findall(compose_text)) | {
        name for name in env_names if name.startswith("BEHALF_")
    }
    assert used, "no BEHALF_ variable found at all"
    assert used <= KNOWN_VARIABLES, f"unknown settings: {sorted(used - KNOWN_VARIABLES)}"


def test_env_example_documents_every_setting() -> None:
    entries = {entry.name: entry for entry in load_env_example()}
    missing = sorted(KNOWN_VARIABLES - set(entries))
    assert not missing, f".env.example does not mention {missing}"
    undocumented = sorted(name for name, entry in entries.items() if not entry.documented)
    assert not undocumented, f"no comment explains {undocumented} in .env.example"


def test_env_example_holds_placeholders_not_secrets() -> None:
    for entry in load_env_example():
        if SECRET_NAME.search(entry.name) and entry.value:
            assert "change-me" in entry.value, (
                f"{entry.name} in .env.example must be empty or a change-me placeholder"
            )
        for password in re.findall(r"://[^/\s:@]*:([^@\s/]+)@", entry.value):
            assert "change-me" in password, f"{entry.name} embeds a password that is no placeholder"
        if "change-me" not in entry.value:
            assert not secret_literals(entry.value), f"{entry.name} looks like a real secret"


def test_env_example_passwords_agree_with_the_containers() -> None:
    values = {entry.name: entry.value for entry in load_env_example() if not entry.commented_out}
    assert f":{values['POSTGRES_PASSWORD']}@postgres:" in values["BEHALF_DATABASE_URL"]
    for name in ("BEHALF_REDIS_URL", "BEHALF_BROKER_URL"):
        assert f":{values['REDIS_PASSWORD']}@redis:" in values[name]


def test_every_compose_interpolation_is_defined_in_env_example(compose: dict[str, Any]) -> None:
    referenced = {
        name
        for _, text in scalars(compose)
        for name in re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", text)
    }
    assert referenced, "compose reads its passwords from .env through ${...}"
    defined = {entry.name for entry in load_env_example() if not entry.commented_out}
    assert referenced <= defined, f"not in .env.example: {sorted(referenced - defined)}"


def test_no_secret_literal_in_compose(compose: dict[str, Any]) -> None:
    problems = []
    for path, text in scalars(compose):
        problems += [f"{path}: {reason}" for reason in secret_literals(text)]
    for name, service in compose["services"].items():
        for variable, value in environment_pairs(service):
            if SECRET_NAME.search(variable) and value and not is_reference(value):
                problems.append(f"services.{name}.environment.{variable} is written in clear")
    assert not problems, "\n".join(problems)


def test_secret_detection_catches_the_usual_leaks() -> None:
    # The detector itself: a check that finds nothing proves nothing.
    assert secret_literals("postgresql://behalf:hunter2@db/behalf")
    assert secret_literals("redis-server --requirepass hunter2")
    assert secret_literals("AKIAABCDEFGHIJKLMNOP")
    assert secret_literals("token 9f8Kq2LmZx7Wv4Rt1Yb6Nc3Pd5Se0Ua8")
    assert not secret_literals("postgresql://behalf:${POSTGRES_PASSWORD}@db/behalf")
    assert not secret_literals('redis-server --requirepass "$$REDIS_PASSWORD"')


@pytest.mark.parametrize("service", ["postgres", "redis", "api"])
def test_core_services_have_healthchecks(services: dict[str, dict[str, Any]], service: str) -> None:
    healthcheck = services[service].get("healthcheck")
    assert healthcheck, f"{service} has no healthcheck"
    assert not healthcheck.get("disable", False)
    test = healthcheck["test"]
    assert test and test != ["NONE"]


def test_waiting_on_health_means_there_is_a_healthcheck(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        for dependency, condition in depends_on(service).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if condition == "service_healthy":
                assert services[dependency].get("healthcheck"), (
                    f"{name} waits for {dependency} to be healthy, but it has no healthcheck"
                )
            if condition == "service_completed_successfully":
                assert services[dependency].get("restart") == "no", (
                    f"{dependency} is a one-shot: it must not restart"
                )


def test_start_order(services: dict[str, dict[str, Any]]) -> None:
    assert depends_on(services["migrate"]) == {"postgres": "service_healthy"}
    assert depends_on(services["kms-init"]) == {"kms": "service_healthy"}
    for role in LONG_RUNNING_ROLES:
        deps = depends_on(services[role])
        assert deps.get("postgres") == "service_healthy", role
        assert deps.get("redis") == "service_healthy", role
        assert deps.get("migrate") == "service_completed_successfully", role
        assert deps.get("kms-init") == "service_completed_successfully", role


def test_one_shots_do_not_restart(services: dict[str, dict[str, Any]]) -> None:
    for name in ONE_SHOTS:
        assert services[name].get("restart") == "no", name


def test_worker_is_scalable(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert "container_name" not in worker
    assert not worker.get("ports"), "a fixed host port stops `--scale worker=N`"


def test_scheduler_runs_two_replicas(services: dict[str, dict[str, Any]]) -> None:
    scheduler = services["scheduler"]
    assert scheduler.get("deploy", {}).get("replicas") == 2
    assert "container_name" not in scheduler
    assert not scheduler.get("ports")


def test_behalf_services_share_one_image_built_from_the_dockerfile(
    services: dict[str, dict[str, Any]],
) -> None:
    behalf_services = {
        name: service
        for name, service in services.items()
        if behalf_subcommand(command_argv(service)) or service.get("image") == "behalf:local"
    }
    assert set(behalf_services) >= {"sandbox", "migrate", "api", "worker", "scheduler", "kms-init"}
    for name, service in behalf_services.items():
        build = service.get("build")
        assert isinstance(build, dict), f"{name} is not built from the Dockerfile"
        assert build.get("context") == "."
        assert build.get("dockerfile", "Dockerfile") == "Dockerfile"
        assert service.get("image") == "behalf:local"
        env_files = service.get("env_file")
        env_files = [env_files] if isinstance(env_files, str) else env_files
        assert env_files and ".env" in [
            item if isinstance(item, str) else item.get("path") for item in env_files
        ], f"{name} does not read .env"


def test_kms_init_creates_the_alias_behalf_uses(services: dict[str, dict[str, Any]]) -> None:
    values = {entry.name: entry.value for entry in load_env_example() if not entry.commented_out}
    assert values["BEHALF_KMS_KEY_ID"] == "alias/behalf-local"
    assert "alias/behalf-local" in " ".join(command_argv(services["kms-init"]))
    assert services["kms"]["image"].startswith("motoserver/moto")
    assert values["BEHALF_KMS_ENDPOINT_URL"] == "http://kms:5000"


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        image = service.get("image", "")
        if image and image != "behalf:local":
            assert ":" in image and not image.endswith(":latest"), f"{name} image is not pinned"
    assert services["postgres"]["image"].split(":")[1].startswith("16")
    assert services["redis"]["image"].split(":")[1].startswith("7")


def test_env_file_stays_out_of_git_and_images() -> None:
    root = ENV_EXAMPLE.parent
    gitignore = (root / ".gitignore").read_text(encoding="utf-8").splitlines()
    dockerignore = (root / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert ".env" in gitignore
    assert ".env" in dockerignore
