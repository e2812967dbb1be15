"""What the deployment files may name: the real CLI's commands and the real settings."""

from __future__ import annotations

import click

from behalf.cli import cli
from behalf.settings import KNOWN_VARIABLES as SETTINGS_VARIABLES

KNOWN_COMMANDS: frozenset[str] = frozenset(cli.list_commands(click.Context(cli)))
KNOWN_VARIABLES: frozenset[str] = SETTINGS_VARIABLES
