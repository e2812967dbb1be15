"""Long-running processes: `behalf api` (and, as they land, worker, scheduler, dev)."""

from __future__ import annotations

import click

from behalf.cli.common import AppContext, pass_app
from behalf.runtime import METRICS_DIR_VARIABLE, multiprocess_metrics_dir, run_worker


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@pass_app
def api(app: AppContext, host: str, port: int) -> None:
    """Serve the HTTP app (pages, JSON API, health, metrics)."""
    import uvicorn

    from behalf.web import build_api

    deps = app.deps
    uvicorn.run(build_api(deps), host=host, port=port,
                log_level=deps.settings.log_level.lower())


@click.command()
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(1, 256),
              help="Worker processes.")
@click.option("--pool", default="prefork", show_default=True,
              type=click.Choice(["prefork", "threads", "solo"]))
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Serve Prometheus metrics of every job process on this port (prefork: "
                   "set PROMETHEUS_MULTIPROC_DIR to an empty directory).")
@click.option("--metrics-host", default="127.0.0.1", show_default=True)
@pass_app
def worker(app: AppContext, concurrency: int, pool: str, metrics_port: int | None,
           metrics_host: str) -> None:
    """Run agent jobs: a Celery worker with the revocation listener in every process."""
    deps = app.deps
    if deps.settings.broker_url == "memory://":
        raise click.UsageError(
            "BEHALF_BROKER_URL: the in-memory broker only works inside `behalf dev`; "
            "set a redis:// or amqp:// URL for a separate worker"
        )
    if metrics_port is not None and pool == "prefork" and multiprocess_metrics_dir() is None:
        raise click.UsageError(
            f"{METRICS_DIR_VARIABLE}: --metrics-port with the prefork pool needs it set to an "
            "empty directory the job processes can write (their figures meet there)"
        )
    run_worker(deps, concurrency=concurrency, pool=pool,
               metrics=None if metrics_port is None else (metrics_host, metrics_port))


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--issuer", default="http://127.0.0.1:9000", show_default=True,
              help="The sandbox AS's public URL (its port is the one served).")
@click.option("--api-base", default="http://127.0.0.1:9001", show_default=True,
              help="The sandbox API's public URL (another port).")
@click.option("--data", "data", default=".behalf/sandbox.sqlite3", show_default=True,
              type=click.Path(dir_okay=False), help="Where the sandbox keeps its state.")
def sandbox(host: str, issuer: str, api_base: str, data: str) -> None:
    """Serve only the sandbox AS and API (for trying behalf without an AS of your own; never
    for production)."""
    import asyncio
    from pathlib import Path

    import uvicorn

    from behalf.sandbox import create_sandbox

    try:
        box = create_sandbox(issuer=issuer, api_base=api_base, database_path=Path(data),
                             http_anywhere=host != "127.0.0.1")
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    Path(data).parent.mkdir(parents=True, exist_ok=True)
    servers = [uvicorn.Server(config) for config in box.uvicorn_configs(host)]
    click.echo(f"sandbox AS at {issuer}, sandbox API at {api_base} (demo users alice, bob; "
               "password demo)")

    async def serve_all() -> None:
        await asyncio.gather(*(server.serve() for server in servers))

    try:
        asyncio.run(serve_all())
    finally:
        box.close()
