"""The Dockerfile: python:3.11-slim, `pip install .`, and the final image runs as non-root."""

from __future__ import annotations

import json
import shlex

import pytest

from tests.unit.deploy.files import DOCKERFILE, DOCKERIGNORE, behalf_subcommand
from tests.unit.deploy.known import KNOWN_COMMANDS

ROOT_USERS = {"root", "0"}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, arguments = line.partition(" ")
        result.append((keyword.upper(), arguments.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return result


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def test_every_stage_is_python_311_slim() -> None:
    bases = [args.split()[0] for keyword, args in instructions() if keyword == "FROM"]
    assert bases
    for base in bases:
        assert base.startswith("python:3.11-slim"), base


def test_the_package_is_installed_with_pip() -> None:
    runs = [args for keyword, args in instructions() if keyword == "RUN"]
    assert any("pip install" in run and shlex.split(run)[-1] == "." for run in runs)


def test_final_image_runs_as_non_root() -> None:
    stage = final_stage()
    users = [args for keyword, args in stage if keyword == "USER"]
    assert users, "the final stage never switches away from root"
    user = users[-1].split(":")[0]
    assert user not in ROOT_USERS, f"final USER is {users[-1]}"
    # Nothing after the last USER switches back, and the process starts after it.
    last_user = max(i for i, (keyword, _) in enumerate(stage) if keyword == "USER")
    starts = [i for i, (keyword, _) in enumerate(stage) if keyword in ("CMD", "ENTRYPOINT")]
    assert starts and min(starts) > last_user


def test_default_command_is_a_known_behalf_command() -> None:
    commands = [args for keyword, args in final_stage() if keyword == "CMD"]
    assert commands
    argv = json.loads(commands[-1])
    subcommand = behalf_subcommand(argv)
    assert subcommand in KNOWN_COMMANDS


@pytest.mark.parametrize("pattern", [".env", ".git", ".venv", "tests", "terraform"])
def test_dockerignore_keeps_secrets_and_clutter_out(pattern: str) -> None:
    lines = {line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()}
    assert pattern in lines
