"""`behalf schedule …`, `behalf requeue` and `behalf scheduler`."""

from __future__ import annotations

import datetime as dt
import signal
import sys
import uuid
import zoneinfo
from typing import Any

import click
from sqlalchemy import select

from behalf.cli.common import (
    AppContext,
    domain_errors,
    emit,
    json_option,
    operator_option,
    pass_app,
)
from behalf.cli.runs import find_agent, find_user
from behalf.scheduling import LoopConfig, SchedulerLoop
from delegation.requeue import Actor, RequeueError, parked_ids, requeue_batches
from models import JobRun, Schedule
from scheduler import schedules
from scheduler.cron import ScheduleError, parse_duration
from scheduler.schedules import BackfillRefused, ScheduleNotFound, ScheduleSpec
from scheduler.tick import OVERLAP_POLICIES
from worker.jobs import load_job_modules, registry

SCHEDULE_COLUMNS = ["schedule_id", "user", "agent", "job", "cron", "tz", "paused",
                    "next_run_at", "last_slot_at"]


class Duration(click.ParamType[dt.timedelta]):
    """"90s", "30m", "2h", "1d", "1h30m"."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> dt.timedelta:
        if isinstance(value, dt.timedelta):
            return value
        try:
            return parse_duration(str(value))
        except ScheduleError as exc:
            self.fail(str(exc), param, ctx)


class Moment(click.ParamType[dt.datetime]):
    """An ISO 8601 date or date-time; without an offset it is read in the schedule's zone."""

    name = "datetime"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> dt.datetime:
        if isinstance(value, dt.datetime):
            return value
        try:
            return dt.datetime.fromisoformat(str(value).strip())
        except ValueError:
            self.fail(f"{value!r} is not an ISO 8601 date or date-time "
                      "(e.g. 2026-03-01 or 2026-03-01T02:00+01:00)", param, ctx)


def _in_zone(moment: dt.datetime, tz: str) -> dt.datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=zoneinfo.ZoneInfo(tz))
    return moment


@click.group("schedule")
def schedule() -> None:
    """Cron schedules of agent jobs, one per user, agent and job."""


@schedule.command("add")
@click.option("--user", "user", required=True, help="The user's subject (sub) at the AS.")
@click.option("--agent", "agent", required=True, help="The agent's name.")
@click.option("--job", "job", required=True, help="The job's name (@agent_job).")
@click.option("--cron", "expression", required=True,
              help='Five cron fields in the zone\'s wall time, e.g. "0 2 * * *".')
@click.option("--tz", default="UTC", show_default=True, help="IANA time zone.")
@click.option("--spread", type=Duration(), default="0s", show_default=True,
              help="Offset each schedule's runs by a stable hash within this window.")
@click.option("--catch-up", "catch_up", type=Duration(), default="1h", show_default=True,
              help="After downtime, run the latest missed slot if it is at most this old.")
@click.option("--overlap", type=click.Choice(OVERLAP_POLICIES), default="skip",
              show_default=True, help="skip: a slot whose previous run is still going is "
                                      "recorded skipped.")
@click.option("--requeue-all", is_flag=True,
              help="After a repair re-queue every parked slot, not only the latest.")
@operator_option
@json_option
@pass_app
@domain_errors
def add(app: AppContext, user: str, agent: str, job: str, expression: str, tz: str,
        spread: dt.timedelta, catch_up: dt.timedelta, overlap: str, requeue_all: bool,
        operator: str, as_json: bool) -> None:
    """Create a schedule; its first run is the first slot from now."""
    deps = app.deps
    load_job_modules(deps.settings.jobs_modules)
    if registry.names() and job not in registry:
        raise click.BadParameter(f"unknown job {job!r} (known: {', '.join(registry.names())})",
                                 param_hint="--job")
    with deps.sessions.begin() as session:
        found_user = find_user(session, user)
        found_agent = find_agent(session, agent)
        spec = ScheduleSpec(user_id=found_user.id, agent_id=found_agent.id, job=job,
                            cron=expression, tz=tz, spread=spread, catch_up=catch_up,
                            overlap=overlap, requeue_all=requeue_all)
        try:
            row = schedules.create(session, spec, now=deps.clock.now(), operator=operator)
        except ScheduleError as exc:
            raise click.UsageError(str(exc)) from None
        shown = {"schedule_id": str(row.id), "user": user, "agent": agent, "job": job,
                 "cron": row.cron, "tz": row.timezone, "paused": False,
                 "next_run_at": row.next_run_at.isoformat(), "last_slot_at": None}
    emit([shown], as_json, SCHEDULE_COLUMNS)


@schedule.command("list")
@click.option("--user", "user", help="Only this user's schedules (subject).")
@click.option("--agent", "agent", help="Only this agent's schedules (name).")
@click.option("--state", type=click.Choice(["all", "active", "paused"]), default="all",
              show_default=True)
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100_000))
@json_option
@pass_app
def list_(app: AppContext, user: str | None, agent: str | None, state: str, limit: int,
          as_json: bool) -> None:
    """List schedules, soonest run first."""
    with app.deps.sessions() as session:
        user_id = find_user(session, user).id if user else None
        agent_id = find_agent(session, agent).id if agent else None
        paused = None if state == "all" else state == "paused"
        rows = schedules.list_schedules(session, user_id=user_id, agent_id=agent_id,
                                        paused=paused, limit=limit)
    emit(rows, as_json, SCHEDULE_COLUMNS)


def _change(app: AppContext, schedule_id: uuid.UUID, operator: str, as_json: bool,
            pausing: bool) -> None:
    deps = app.deps
    with deps.sessions.begin() as session:
        try:
            change = schedules.pause if pausing else schedules.resume
            changed = change(session, schedule_id, now=deps.clock.now(), operator=operator)
        except ScheduleNotFound as exc:
            raise click.BadParameter(str(exc), param_hint="SCHEDULE_ID") from None
        row = session.get(Schedule, schedule_id)
        assert row is not None
        shown = {"schedule_id": str(row.id), "paused": row.paused, "changed": changed,
                 "next_run_at": row.next_run_at.isoformat()}
    emit([shown], as_json, ["schedule_id", "paused", "changed", "next_run_at"])


@schedule.command("pause")
@click.argument("schedule_id", type=click.UUID)
@operator_option
@json_option
@pass_app
@domain_errors
def pause(app: AppContext, schedule_id: uuid.UUID, operator: str, as_json: bool) -> None:
    """Stop running a schedule (its slots while paused are not run later)."""
    _change(app, schedule_id, operator, as_json, pausing=True)


@schedule.command("resume")
@click.argument("schedule_id", type=click.UUID)
@operator_option
@json_option
@pass_app
@domain_errors
def resume(app: AppContext, schedule_id: uuid.UUID, operator: str, as_json: bool) -> None:
    """Run a paused schedule again, from its first slot after now."""
    _change(app, schedule_id, operator, as_json, pausing=False)


@schedule.command("backfill")
@click.argument("schedule_id", type=click.UUID)
@click.option("--from", "start", type=Moment(), required=True,
              help="First instant (ISO 8601; no offset = the schedule's zone).")
@click.option("--to", "end", type=Moment(), required=True,
              help="End, excluded (ISO 8601; not in the future).")
@operator_option
@json_option
@pass_app
@domain_errors
def backfill(app: AppContext, schedule_id: uuid.UUID, start: dt.datetime, end: dt.datetime,
             operator: str, as_json: bool) -> None:
    """Run every slot in [--from, --to) that has no run yet (safe to repeat)."""
    deps = app.deps
    with deps.sessions.begin() as session:
        row = session.get(Schedule, schedule_id)
        if row is None:
            raise click.BadParameter(f"no schedule {schedule_id}", param_hint="SCHEDULE_ID")
        try:
            result = schedules.backfill(
                session, schedule_id, _in_zone(start, row.timezone),
                _in_zone(end, row.timezone), now=deps.clock.now(), operator=operator)
        except BackfillRefused as exc:
            raise click.ClickException(str(exc)) from None
        except ScheduleError as exc:
            raise click.UsageError(str(exc)) from None
    emit([{"schedule_id": str(schedule_id), "slots": result.slots, "queued": result.queued,
           "already": result.already}], as_json, ["schedule_id", "slots", "queued", "already"])


@click.command("requeue")
@click.option("--run", "run_id", type=click.UUID, help="One parked run.")
@click.option("--delegation", "delegation_id", type=click.UUID,
              help="Every parked run of a delegation.")
@click.option("--agent", "agent", help="Every parked run of an agent (name).")
@click.option("--batch", default=500, show_default=True, type=click.IntRange(1, 10_000),
              help="Runs per transaction.")
@operator_option
@json_option
@pass_app
@domain_errors
def requeue(app: AppContext, run_id: uuid.UUID | None, delegation_id: uuid.UUID | None,
            agent: str | None, batch: int, operator: str, as_json: bool) -> None:
    """Put parked runs back in the queue (exactly once, audited with --operator)."""
    if sum(v is not None for v in (run_id, delegation_id, agent)) != 1:
        raise click.UsageError("give exactly one of --run, --delegation or --agent")
    deps = app.deps
    with deps.sessions() as session:
        agent_id = find_agent(session, agent).id if agent else None
        try:
            ids = parked_ids(session, run_id=run_id, delegation_id=delegation_id,
                             agent_id=agent_id)
        except RequeueError as exc:
            raise click.BadParameter(str(exc), param_hint="--run/--delegation/--agent"
                                     ) from None
        status = session.scalar(select(JobRun.status).where(JobRun.id == run_id)) \
            if run_id else None
    actor = Actor(name=operator, via="cli")
    if run_id is None:
        with click.progressbar(length=len(ids), label="re-queuing parked runs",
                               file=sys.stderr) as bar:
            result = requeue_batches(deps.sessions, deps.clock, actor, ids, batch=batch,
                                     progress=bar.update)
    else:
        result = requeue_batches(deps.sessions, deps.clock, actor, ids, batch=batch)
    if run_id is not None and result.requeued == 0 and not as_json:
        click.echo(f"run {run_id} is {status}, not parked: nothing to re-queue", err=True)
    emit([result.as_dict()], as_json, ["matched", "requeued", "already_handled"])


@click.command("scheduler")
@click.option("--interval", type=Duration(), default="1s", show_default=True,
              help="Pause between cycles when nothing is due.")
@click.option("--batch", default=500, show_default=True, type=click.IntRange(1, 10_000),
              help="Schedules claimed per transaction.")
@click.option("--sweep/--no-sweep", default=True, show_default=True,
              help="Run the refresh sweep in this process.")
@click.option("--sweep-interval", type=Duration(), default="1m", show_default=True)
@click.option("--once", is_flag=True, help="One cycle (claim, relay, recover), then exit.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Serve Prometheus metrics on this port.")
@click.option("--metrics-host", default="127.0.0.1", show_default=True)
@json_option
@pass_app
@domain_errors
def scheduler(app: AppContext, interval: dt.timedelta, batch: int, sweep: bool,
              sweep_interval: dt.timedelta, once: bool, metrics_port: int | None,
              metrics_host: str, as_json: bool) -> None:
    """Claim due schedules and hand their runs to the workers; run as many as you like."""
    deps = app.deps
    if deps.settings.broker_url == "memory://":
        raise click.UsageError(
            "BEHALF_BROKER_URL: the in-memory broker only works inside `behalf dev`; "
            "set a redis:// or amqp:// URL for a separate scheduler"
        )
    if interval.total_seconds() <= 0 or sweep_interval.total_seconds() <= 0:
        raise click.BadParameter("intervals must be longer than 0s",
                                 param_hint="--interval/--sweep-interval")
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr=metrics_host)
    loop = SchedulerLoop(deps, LoopConfig(interval=interval.total_seconds(), batch=batch,
                                          sweep=sweep and not once,
                                          sweep_interval=sweep_interval.total_seconds()))
    if once:
        cycle = loop.run_once()
        emit([{"claimed": cycle.claimed, "queued": cycle.queued, "relayed": cycle.relayed,
               "recovered": cycle.recovered, "failed": cycle.failed,
               **{f"slots_{k}": v for k, v in sorted(cycle.outcomes.items())}}],
             as_json, ["claimed", "queued", "relayed", "recovered", "failed"])
        return

    def _stop(signum: int, _frame: object) -> None:
        click.echo(f"behalf scheduler: {signal.Signals(signum).name}, stopping after the "
                   "current batch", err=True)
        loop.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    click.echo(f"behalf scheduler: claiming up to {batch} schedules per batch every "
               f"{interval.total_seconds():g}s (Ctrl-C or SIGTERM stops)", err=True)
    loop.run_forever()
