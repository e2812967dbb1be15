"""`behalf dev`: the whole product in one process, on the embedded defaults.

SQLite, an in-process Redis stand-in (one fakeredis server shared by every part), Celery's
in-memory transport with a thread-pool worker, the local key file, the scheduler loop, and the
sandbox AS + API on the next two ports. The example agent is registered at the sandbox by
dynamic registration (`private_key_jwt`), exactly as against a real AS; every user who connects
it gets a nightly schedule of the example job (every minute with `--fast`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from celery.worker import WorkController
from sqlalchemy import select

from behalf import examples
from behalf.deps import Deps
from behalf.relay import publish_stop_now
from behalf.runtime import celery_app, oauth_client
from behalf.sandbox import create_sandbox
from behalf.scheduling import LoopConfig, SchedulerLoop
from behalf.settings import Settings
from behalf.web import build_api
from delegation import providers
from delegation.errors import BehalfError
from models import Agent, Delegation, DelegationStatus, Schedule
from models import migrate as migrations
from scheduler.schedules import ScheduleSpec, create
from worker.celery_app import QUEUE

log = logging.getLogger(__name__)

PROVIDER = "sandbox"
OPERATOR = "behalf-dev"


@dataclasses.dataclass
class DevConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    fast: bool = False
    state_dir: Path = Path(".behalf")

    @property
    def public_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def issuer(self) -> str:
        return f"http://{self.host}:{self.port + 1}"

    @property
    def api_base(self) -> str:
        return f"http://{self.host}:{self.port + 2}"


class DevServer:
    def __init__(self, settings: Settings, config: DevConfig) -> None:
        modules = tuple(dict.fromkeys((*settings.jobs_modules, examples.__name__)))
        self.settings = dataclasses.replace(settings, public_url=config.public_url,
                                            jobs_modules=modules)
        self.config = config
        self.deps = Deps.from_settings(self.settings)
        self.deps.extras["owns_in_process_services"] = True
        self._threads: list[threading.Thread] = []
        self._servers: list[uvicorn.Server] = []
        self._stop = threading.Event()
        self._worker: WorkController | None = None
        self._scheduler: SchedulerLoop | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Everything but the HTTP app, which `serve` runs in the foreground."""
        for noisy in ("httpx", "celery", "kombu"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        migrations.upgrade(self.deps.engine)
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        self.sandbox = create_sandbox(issuer=self.config.issuer, api_base=self.config.api_base,
                                      database_path=self.config.state_dir / "sandbox.sqlite3")
        for server_config in self.sandbox.uvicorn_configs():
            server_config.log_level = "warning"
            self._serve_in_thread(uvicorn.Server(server_config))
        self._wait_until_up(self.config.issuer + "/.well-known/openid-configuration")
        self._register()
        self.deps.extras["publish_stop"] = lambda delegation_id: publish_stop_now(
            self.deps, delegation_id, "delegation_revoked")
        self._start_worker()
        self._scheduler = SchedulerLoop(self.deps, LoopConfig(interval=1.0))
        self._thread(self._scheduler.run_forever, "scheduler")
        self._thread(self._schedule_new_connections, "dev-autoschedule")

    def serve(self) -> None:
        """Serve the app in the foreground until Ctrl-C, then stop everything."""
        server = uvicorn.Server(uvicorn.Config(build_api(self.deps), host=self.config.host,
                                               port=self.config.port, log_level="warning"))
        try:
            server.run()
        finally:
            self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._scheduler is not None:
            self._scheduler.stop()
        if self._worker is not None:
            with contextlib.suppress(Exception):
                self._worker.stop()
        for server in self._servers:
            server.should_exit = True
        for thread in self._threads:
            thread.join(timeout=5)
        listener = self.deps.extras.get("listener")
        if listener is not None:
            listener.stop()
        self.sandbox.close()
        self.deps.close()

    # --- parts ----------------------------------------------------------------------------

    def _thread(self, target: Callable[[], Any], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _serve_in_thread(self, server: uvicorn.Server) -> None:
        self._servers.append(server)
        self._thread(lambda: asyncio.run(server.serve()), f"uvicorn-{server.config.port}")

    @staticmethod
    def _wait_until_up(url: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{url} did not come up within {timeout:.0f} s")

    def _register(self) -> None:
        """The sandbox provider, the sign-in client and the example agent (once)."""
        deps, oauth = self.deps, oauth_client(self.deps)
        env = self.settings.env
        providers.add_provider(deps.sessions, oauth, deps.clock, name=PROVIDER,
                               issuer=self.config.issuer, api_base=self.config.api_base,
                               operator=OPERATOR)
        providers.register_signin_client(deps.sessions, deps.vault, oauth, deps.clock,
                                         provider_name=PROVIDER, environment=env,
                                         public_url=self.config.public_url, operator=OPERATOR)
        with deps.sessions() as session:
            exists = session.scalar(select(Agent.id).where(
                Agent.name == examples.EXAMPLE_AGENT, Agent.environment == env))
        if exists is None:
            providers.register_agent(
                deps.sessions, deps.vault, oauth, deps.clock, name=examples.EXAMPLE_AGENT,
                provider_name=PROVIDER, environment=env, scopes=list(examples.EXAMPLE_SCOPES),
                required_scopes=["reports:read"], auth_method="private_key_jwt",
                public_url=self.config.public_url, operator=OPERATOR)

    def _start_worker(self) -> None:
        app = celery_app(self.deps, with_runner=True, share_deps=True)
        holder = self.deps.extras["runner_holder"]
        holder.get()  # runner + revocation listener, on these very deps
        # the thread pool looks tasks up on Celery's default app (`celery worker` sets it;
        # a bare WorkController does not)
        app.set_default()
        self._worker = WorkController(app=app, pool_cls="threads", concurrency=4,
                                      queues=[QUEUE], without_heartbeat=True,
                                      without_mingle=True, without_gossip=True,
                                      loglevel="WARNING")
        self._thread(self._worker.start, "celery-worker")

    def _schedule_new_connections(self) -> None:
        """Give every newly connected user of the example agent its nightly schedule."""
        cron = "* * * * *" if self.config.fast else "0 2 * * *"
        while not self._stop.wait(2.0):
            try:
                self._schedule_once(cron)
            except BehalfError:
                log.warning("could not schedule the example job", exc_info=True)

    def _schedule_once(self, cron: str) -> list[uuid.UUID]:
        deps = self.deps
        created = []
        with deps.sessions.begin() as session:
            rows = session.execute(
                select(Delegation.user_id, Delegation.agent_id)
                .join(Agent, Delegation.agent_id == Agent.id)
                .where(Agent.name == examples.EXAMPLE_AGENT,
                       Delegation.status == DelegationStatus.ACTIVE.value)
            ).all()
            for user_id, agent_id in rows:
                has = session.scalar(select(Schedule.id).where(
                    Schedule.user_id == user_id, Schedule.agent_id == agent_id,
                    Schedule.job == examples.EXAMPLE_JOB))
                if has is None:
                    row = create(session, ScheduleSpec(user_id=user_id, agent_id=agent_id,
                                                       job=examples.EXAMPLE_JOB, cron=cron,
                                                       tz="Europe/Paris"),
                                 now=deps.clock.now(), operator=OPERATOR)
                    created.append(row.id)
        return created

    def banner(self) -> str:
        c = self.config
        when = "every minute (--fast)" if c.fast else "nightly at 02:00 Europe/Paris"
        return "\n".join([
            "",
            "behalf dev is running - embedded defaults (SQLite, in-process Redis and broker,",
            "a local key file: DEV ONLY). Ctrl-C stops it; state is kept in .behalf/ and",
            "behalf-dev.sqlite3 (--reset starts over).",
            "",
            f"  open           {c.public_url}/grants",
            "  demo users     alice / demo, bob / demo (at the sandbox sign-in page)",
            f"  sandbox AS     {c.issuer}   (admin: {c.issuer}/_sandbox/admin)",
            f"  sandbox API    {c.api_base}   (calls it received: {c.api_base}/_sandbox/calls)",
            "",
            "What to try:",
            f"  1. connect     {c.public_url}/connect/{examples.EXAMPLE_AGENT}"
            " - sign in, untick a scope if you like, Allow",
            f"  2. run it      the job '{examples.EXAMPLE_JOB}' is scheduled {when};",
            f"                 or now: behalf run {examples.EXAMPLE_JOB} --user alice "
            f"--agent {examples.EXAMPLE_AGENT}",
            "  3. audit       /grants shows every API call the agent made as you",
            "  4. revoke      press Revoke on /grants while the job runs: it stops at once",
            "  5. break it    'break' the grant on the sandbox admin page; the next refresh",
            "                 gets invalid_grant, the delegation turns broken and its runs park",
            "  6. re-auth     the mail to the user is printed in this log (no SMTP in dev):",
            "                 open its link, sign in, Allow - the parked run runs again",
            "",
        ])
