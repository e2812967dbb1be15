"""Long-running processes: `behalf api` (and, as they land, worker, scheduler, dev)."""

from __future__ import annotations

import click
import uvicorn

from behalf.cli.common import AppContext, pass_app
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
