"""Wire the runtime pieces (token source, runner, Celery app) from `Deps`."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import httpx
from celery import Celery

from behalf.deps import Deps
from delegation.budget import RateBudget
from delegation.oauth import OAuthClient
from delegation.ratelimit import Limits, RequestGate
from delegation.store import AgentDirectory, DelegationStore
from delegation.token_source import TokenSource
from worker.celery_app import QUEUE, RunnerHolder, create_celery
from worker.jobs import load_job_modules, registry
from worker.listener import RevocationListener
from worker.runner import Runner, RunnerConfig


def redis_client(deps: Deps) -> Any:
    """The process's Redis: real, or the in-process stand-in shared by every part in dev."""
    client = deps.extras.get("redis")
    if client is None:
        url = deps.settings.redis_url
        if url == "memory://":
            import fakeredis

            server = deps.extras.setdefault("fakeredis_server", fakeredis.FakeServer())
            client = fakeredis.FakeRedis(server=server)
        else:
            import redis

            client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5,
                                          health_check_interval=30)
        deps.extras["redis"] = client
    return client


def oauth_http(deps: Deps) -> httpx.Client:
    client = deps.extras.get("oauth_http")
    if client is None:
        transport = deps.extras.get("oauth_transport")
        client = httpx.Client(timeout=httpx.Timeout(10.0, connect=5.0), transport=transport,
                              follow_redirects=False)
        deps.extras["oauth_http"] = client
    return client


def oauth_client(deps: Deps) -> OAuthClient:
    return OAuthClient(oauth_http(deps), deps.clock)


def request_gate(deps: Deps) -> RequestGate:
    """The per-agent and per-provider request budgets (`BEHALF_*_RATE_LIMIT`), in Redis."""
    gate = deps.extras.get("request_gate")
    if gate is None:
        settings = deps.settings
        budget = RateBudget(redis_client(deps), clock=deps.clock, sleep=time.sleep)
        gate = RequestGate(budget, Limits(
            provider_rate=settings.provider_rate_limit or None,
            agent_rate=settings.agent_rate_limit or None,
            max_wait=float(settings.rate_limit_max_wait),
        ))
        deps.extras["request_gate"] = gate
    return gate


def token_source(deps: Deps) -> TokenSource:
    source = deps.extras.get("token_source")
    if source is None:
        source = TokenSource(
            store=DelegationStore(deps.sessions, deps.vault, deps.clock),
            agents=agent_directory(deps),
            oauth=oauth_client(deps),
            redis=redis_client(deps),
            clock=deps.clock,
            minimum_skew=deps.settings.refresh_skew_seconds,
            before_refresh=request_gate(deps).with_purpose("refresh").before_request,
        )
        deps.extras["token_source"] = source
    return source


def agent_directory(deps: Deps) -> AgentDirectory:
    directory = deps.extras.get("agents")
    if directory is None:
        directory = AgentDirectory(deps.sessions, deps.vault, monotonic=deps.clock.monotonic)
        deps.extras["agents"] = directory
    return directory


def build_runner(deps: Deps, *, exit_when_stuck: bool = False) -> Runner:
    load_job_modules(deps.settings.jobs_modules)
    return Runner(
        sessions=deps.sessions,
        tokens=token_source(deps),
        agents=agent_directory(deps),
        jobs=registry,
        clock=deps.clock,
        config=RunnerConfig(worker_id=f"{socket.gethostname()}:{os.getpid()}",
                            lease_seconds=deps.settings.run_lease_seconds,
                            on_stuck=(lambda: os._exit(70)) if exit_when_stuck else None),
        transport=deps.extras.get("api_transport"),
        before_request=request_gate(deps).before_request,
    )


def start_runtime(deps: Deps, *, exit_when_stuck: bool = False) -> Runner:
    """A runner plus its revocation listener, for the process that executes jobs."""
    runner = build_runner(deps, exit_when_stuck=exit_when_stuck)
    listener = RevocationListener(redis_factory=lambda: redis_client(deps),
                                  sessions=deps.sessions, active=runner.active)
    listener.start()
    deps.extras["listener"] = listener
    return runner


def celery_app(deps: Deps, *, with_runner: bool = False, share_deps: bool = False,
               exit_when_stuck: bool = True) -> Celery:
    """The Celery app. With a runner, it is built in each worker process after the pool forks
    (fresh connections), or from these very deps with `share_deps` (in-process dev mode)."""
    key = "celery_worker" if with_runner else "celery"
    app = deps.extras.get(key)
    if app is None:
        holder = None
        if with_runner:
            settings = deps.settings

            def factory() -> Runner:
                if share_deps:
                    return start_runtime(deps)
                # a prefork child: a job stuck past its grace period takes the child with it
                return start_runtime(Deps.from_settings(settings),
                                     exit_when_stuck=exit_when_stuck)

            holder = RunnerHolder(factory)
            deps.extras["runner_holder"] = holder
        app = create_celery(deps.settings.broker_url, runner=holder)
        deps.extras[key] = app
    return app


def run_worker(deps: Deps, *, concurrency: int, pool: str = "prefork",
               metrics: tuple[str, int] | None = None) -> None:
    """Start a Celery worker whose processes each build their runtime after the fork; with
    `metrics` ((host, port)), serve the Prometheus metrics of all of its processes there."""
    from celery.signals import worker_process_init, worker_process_shutdown

    app = celery_app(deps, with_runner=True, exit_when_stuck=pool == "prefork")
    holder: RunnerHolder = deps.extras["runner_holder"]
    if metrics is not None:
        serve_worker_metrics(*metrics)

    @worker_process_init.connect(weak=False)  # type: ignore[untyped-decorator]
    def _init_child(**_: Any) -> None:
        holder.reset()
        holder.get()

    if metrics is not None and multiprocess_metrics_dir() is not None:
        from prometheus_client import multiprocess

        @worker_process_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
        def _child_gone(pid: int | None = None, **_: Any) -> None:
            multiprocess.mark_process_dead(pid or os.getpid())  # type: ignore[no-untyped-call]

    if pool != "prefork":
        holder.get()
    worker = app.Worker(concurrency=concurrency, pool=pool, queues=[QUEUE],
                        loglevel=deps.settings.log_level, without_heartbeat=True,
                        without_mingle=True, without_gossip=True)
    worker.start()


METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_metrics_dir() -> Path | None:
    """Where job processes leave their metrics for the worker to serve (prometheus_client's
    multiprocess mode: the variable must be set before the library is imported, so it comes
    from the environment, never from here)."""
    raw = os.environ.get(METRICS_DIR_VARIABLE)
    return Path(raw) if raw else None


def serve_worker_metrics(host: str, port: int) -> None:
    """Serve /metrics for the worker: every job process's figures summed (multiprocess mode),
    or this process's own when it is the only one (threads or solo pool)."""
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    directory = multiprocess_metrics_dir()
    if directory is None:
        start_http_server(port, addr=host)
        return
    directory.mkdir(parents=True, exist_ok=True)
    mine = f"_{os.getpid()}.db"
    for stale in directory.glob("*.db"):  # a previous worker's figures are not ours
        if not stale.name.endswith(mine):
            stale.unlink(missing_ok=True)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    start_http_server(port, addr=host, registry=registry)
