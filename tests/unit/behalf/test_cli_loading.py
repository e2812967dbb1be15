"""The command line loads its commands lazily: a worker process stays small."""

from __future__ import annotations

import subprocess
import sys

import click

from behalf.cli import cli

PROBE = """
import sys, click
from behalf.cli import cli
cli.get_command(click.Context(cli), "worker")
print(sorted(m for m in ("fastapi", "uvicorn", "api", "jinja2") if m in sys.modules))
"""


def test_every_listed_command_loads():
    ctx = click.Context(cli)
    assert all(cli.get_command(ctx, name) is not None for name in cli.list_commands(ctx))
    assert cli.get_command(ctx, "no-such-command") is None


def test_a_worker_does_not_import_the_http_stack():
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", PROBE], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"
