"""`behalf run` (one run now) and `behalf runs list`."""

from __future__ import annotations

from typing import Any

import click
from sqlalchemy import select

from behalf.cli.common import AppContext, domain_errors, emit, json_option, pass_app
from behalf.relay import relay_pending
from delegation.runs import queue_run
from models import Agent, JobRun, RunStatus, User
from worker.jobs import load_job_modules, registry


def find_user(session: Any, user: str) -> User:
    rows = session.scalars(select(User).where(User.subject == user)).all()
    if not rows:
        raise click.BadParameter(f"no user with subject {user!r}", param_hint="--user")
    if len(rows) > 1:
        raise click.BadParameter(f"several users have subject {user!r}", param_hint="--user")
    return rows[0]  # type: ignore[no-any-return]


def find_agent(session: Any, name: str) -> Agent:
    rows = session.scalars(select(Agent).where(Agent.name == name)).all()
    if not rows:
        raise click.BadParameter(f"no agent named {name!r}", param_hint="--agent")
    if len(rows) > 1:
        raise click.BadParameter(f"agent {name!r} exists in several environments",
                                 param_hint="--agent")
    return rows[0]  # type: ignore[no-any-return]


@click.command("run")
@click.argument("job")
@click.option("--user", "user", required=True, help="The user's subject (sub) at the AS.")
@click.option("--agent", "agent", required=True, help="The agent's name.")
@json_option
@pass_app
@domain_errors
def run(app: AppContext, job: str, user: str, agent: str, as_json: bool) -> None:
    """Queue one run of JOB now, as USER via AGENT."""
    deps = app.deps
    load_job_modules(deps.settings.jobs_modules)
    if registry.names() and job not in registry:
        raise click.BadParameter(f"unknown job {job!r} (known: {', '.join(registry.names())})",
                                 param_hint="JOB")
    with deps.sessions.begin() as session:
        found_user = find_user(session, user)
        found_agent = find_agent(session, agent)
        created = queue_run(session, job=job, user_id=found_user.id, agent_id=found_agent.id,
                            now=deps.clock.now())
        run_id = created.id
    relay_pending(deps)
    emit([{"run_id": str(run_id), "status": "queued"}], as_json, ["run_id", "status"])


@click.group("runs")
def runs() -> None:
    """Job runs."""


@runs.command("list")
@click.option("--status", type=click.Choice([s.value for s in RunStatus]))
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100_000))
@json_option
@pass_app
def list_runs(app: AppContext, status: str | None, limit: int, as_json: bool) -> None:
    """List runs, newest first."""
    with app.deps.sessions() as session:
        query = select(JobRun, User.subject, Agent.name).join(User, JobRun.user_id == User.id)\
            .join(Agent, JobRun.agent_id == Agent.id).order_by(JobRun.queued_at.desc())\
            .limit(limit)
        if status:
            query = query.where(JobRun.status == status)
        rows = [
            {"run_id": str(r.id), "job": r.job, "user": subject, "agent": agent_name,
             "status": r.status, "reason": r.reason or "", "attempts": r.attempts,
             "queued_at": r.queued_at.isoformat(),
             "finished_at": r.finished_at.isoformat() if r.finished_at else ""}
            for r, subject, agent_name in session.execute(query).all()
        ]
    emit(rows, as_json, ["run_id", "job", "user", "agent", "status", "reason", "attempts",
                         "queued_at"])
