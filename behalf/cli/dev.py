"""`behalf dev`: the whole product in one process on its embedded defaults."""

from __future__ import annotations

import os
from pathlib import Path

import click

from behalf.cli.common import AppContext, pass_app
from behalf.devmode import DevConfig, DevServer


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65533),
              help="The app's port; the sandbox AS and API take the next two.")
@click.option("--fast", is_flag=True, help="Run the example job every minute, not nightly.")
@click.option("--reset", is_flag=True, help="Forget all local state and start over.")
@pass_app
def dev(app: AppContext, host: str, port: int, fast: bool, reset: bool) -> None:
    """Run everything in one process: SQLite, in-process Redis and broker, a local key file,
    a worker, the scheduler, and a sandbox AS + API with an example agent."""
    settings = app.settings
    if settings.production:
        raise click.UsageError("BEHALF_ENV: `behalf dev` runs on the embedded defaults only")
    for name, url in (("BEHALF_REDIS_URL", settings.redis_url),
                      ("BEHALF_BROKER_URL", settings.broker_url)):
        if url != "memory://":
            raise click.UsageError(f"{name}: `behalf dev` runs its own in-process stand-in; "
                                   "unset it")
    config = DevConfig(host=host, port=port, fast=fast,
                       state_dir=Path(settings.local_key_file).parent)
    if reset:
        _reset(settings.database_url, config.state_dir)
    server = DevServer(settings, config)
    server.start()
    click.echo(server.banner())
    server.serve()


def _reset(database_url: str, state_dir: Path) -> None:
    if database_url.startswith("sqlite:///"):
        path = Path(database_url.removeprefix("sqlite:///"))
        for suffix in ("", "-wal", "-shm"):
            candidate = Path(os.fspath(path) + suffix)
            if candidate.exists():
                candidate.unlink()
    for name in ("sandbox.sqlite3", "sandbox.sqlite3-wal", "sandbox.sqlite3-shm"):
        candidate = state_dir / name
        if candidate.exists():
            candidate.unlink()
    click.echo("local state reset")
