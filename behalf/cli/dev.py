"""`behalf dev`: the whole product in one process on its embedded defaults."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import click
import uvicorn

from behalf.cli.common import AppContext, pass_app
from behalf.deps import Deps
from behalf.web import build_api
from models import migrate as migrations

STATE_DIR = Path(".behalf")


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--reset", is_flag=True, help="Forget all local state and start over.")
@pass_app
def dev(app: AppContext, host: str, port: int, reset: bool) -> None:
    """Run everything in one process: SQLite, in-process Redis and broker, a local key file."""
    settings = app.settings
    if settings.production:
        raise click.UsageError("BEHALF_ENV: `behalf dev` runs on the embedded defaults only")
    if reset:
        _reset(settings.database_url)
    public_url = f"http://{host}:{port}"
    settings = dataclasses.replace(settings, public_url=public_url)
    deps = Deps.from_settings(settings)
    migrations.upgrade(deps.engine)
    click.echo(
        "\n".join(
            [
                "",
                "behalf dev is running (embedded defaults: SQLite, in-process Redis, "
                "local key file - DEV ONLY)",
                f"  open      {public_url}/healthz",
                f"  API docs  {public_url}/api/docs",
                "  stop      Ctrl-C (state is kept in behalf-dev.sqlite3; --reset starts over)",
                "",
            ]
        )
    )
    try:
        uvicorn.run(build_api(deps), host=host, port=port,
                    log_level="warning")
    finally:
        deps.close()


def _reset(database_url: str) -> None:
    if database_url.startswith("sqlite:///"):
        path = Path(database_url.removeprefix("sqlite:///"))
        for suffix in ("", "-wal", "-shm"):
            candidate = Path(os.fspath(path) + suffix)
            if candidate.exists():
                candidate.unlink()
    click.echo("local state reset")
