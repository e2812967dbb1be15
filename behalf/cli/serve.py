"""Long-running processes: `behalf api` (and, as they land, worker, scheduler, dev)."""

from __future__ import annotations

import click
import uvicorn

from behalf.cli.common import AppContext, pass_app
from behalf.runtime import run_worker
from behalf.web import build_api


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@pass_app
def api(app: AppContext, host: str, port: int) -> None:
    """Serve the HTTP app (pages, JSON API, health, metrics)."""
    deps = app.deps
    uvicorn.run(build_api(deps), host=host, port=port,
                log_level=deps.settings.log_level.lower())


@click.command()
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(1, 256),
              help="Worker processes.")
@click.option("--pool", default="prefork", show_default=True,
              type=click.Choice(["prefork", "threads", "solo"]))
@pass_app
def worker(app: AppContext, concurrency: int, pool: str) -> None:
    """Run agent jobs: a Celery worker with the revocation listener in every process."""
    deps = app.deps
    if deps.settings.broker_url == "memory://":
        raise click.UsageError(
            "BEHALF_BROKER_URL: the in-memory broker only works inside `behalf dev`; "
            "set a redis:// or amqp:// URL for a separate worker"
        )
    run_worker(deps, concurrency=concurrency, pool=pool)
