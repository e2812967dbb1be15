"""Loading the deployment files, shared by the tests in this package."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[3]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
TERRAFORM_DIR = ROOT / "terraform"

BEHALF_VARIABLE = re.compile(r"\bBEHALF_[A-Z0-9_]+\b")


# --- docker compose -----------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    with COMPOSE_FILE.open(encoding="utf-8") as handle:
        document = yaml.safe_load(handle)
    assert isinstance(document, dict), "docker-compose.yml is not a mapping"
    return document


def command_argv(service: dict[str, Any]) -> list[str]:
    """A service's command as an argv list (a string command is split like a shell would)."""
    command = service.get("command")
    if command is None:
        return []
    if isinstance(command, str):
        return command.split()
    return [str(part) for part in command]


def behalf_subcommand(argv: list[str]) -> str | None:
    """`behalf X ...` -> "X"; anything else -> None."""
    if len(argv) >= 2 and Path(argv[0]).name == "behalf":
        return argv[1]
    return None


def scalars(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every (path, text) pair of a YAML document: mapping keys' values and list items."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from scalars(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from scalars(value, f"{path}[{index}]")
    elif node is not None:
        yield path, str(node)


def environment_pairs(service: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """A service's `environment` as (name, value), from either the mapping or the list form."""
    environment = service.get("environment") or {}
    if isinstance(environment, dict):
        for name, value in environment.items():
            yield str(name), "" if value is None else str(value)
    else:
        for item in environment:
            name, _, value = str(item).partition("=")
            yield name, value


# --- .env.example -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnvEntry:
    name: str
    value: str
    commented_out: bool  # "# NAME=value": documented, left to its default
    documented: bool  # a comment right above it, or above the group of lines it belongs to


ENV_LINE = re.compile(r"^(?P<hash>#\s*)?(?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)$")


def load_env_example() -> list[EnvEntry]:
    """Every assignment in .env.example, commented out or not, and whether a comment explains it."""
    entries: list[EnvEntry] = []
    under_comment = False
    for raw in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        match = ENV_LINE.match(line)
        if match:
            entries.append(
                EnvEntry(
                    name=match["name"],
                    value=match["value"],
                    commented_out=bool(match["hash"]),
                    documented=under_comment,
                )
            )
        elif line.startswith("#"):
            under_comment = True
        else:
            under_comment = False
    return entries


# --- secrets ------------------------------------------------------------------------------------

SECRET_NAME = re.compile(
    r"(PASSWORD|PASSWD|SECRET|TOKEN|PRIVATE|CREDENTIAL|API_?KEY|ACCESS_KEY)", re.I
)
INTERPOLATION = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:?[-?+][^}]*)?\}$")
URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]*:(?P<password>[^@\s/]+)@", re.I)
SECRET_FLAG = re.compile(r"--?[\w-]*(pass|secret|token)[\w-]*[=\s]+(?P<value>\S+)", re.I)
AWS_ACCESS_KEY = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
LONG_TOKEN = re.compile(r"[A-Za-z0-9+/=_\-]{32,}")


def is_reference(value: str) -> bool:
    """A value taken from the environment, not written down: ${NAME}, $$NAME, "$$NAME"."""
    value = value.strip().strip("\"'")
    return bool(INTERPOLATION.match(value)) or bool(
        re.match(r"^\$\$?[A-Za-z_][A-Za-z0-9_]*$", value)
    )


def entropy(text: str) -> float:
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def secret_literals(text: str) -> list[str]:
    """Reasons `text` looks like it carries a secret written in clear."""
    reasons = []
    for match in URL_PASSWORD.finditer(text):
        if not is_reference(match["password"]):
            reasons.append(f"password in URL: {match.group(0)!r}")
    for match in SECRET_FLAG.finditer(text):
        if not is_reference(match["value"]):
            reasons.append(f"secret on a command line: {match.group(0)!r}")
    if AWS_ACCESS_KEY.search(text):
        reasons.append("AWS access key id")
    if PRIVATE_KEY.search(text):
        reasons.append("private key")
    for token in LONG_TOKEN.findall(text):
        if (
            any(c.isdigit() for c in token)
            and any(c.isalpha() for c in token)
            and entropy(token) > 4.0
        ):
            reasons.append(f"high-entropy string {token[:6]}...")
    return reasons
