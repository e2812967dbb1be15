"""`behalf audit show | verify | export | checkpoint | prune`."""

from __future__ import annotations

import datetime as dt
import json
import sys
import uuid
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
from delegation import audit, audit_verify, checkpoints
from models import AuditEvent, User

SHOW_COLUMNS = ["id", "occurred_at", "user", "agent", "action", "actor", "summary"]
PROGRESS_FROM = 50_000  # events: below this, verify is too quick for a progress bar


def _moment(_ctx: click.Context, param: click.Parameter, value: str | None
            ) -> dt.datetime | None:
    """An ISO 8601 date or date-time option; without a zone, UTC."""
    if value is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 date or date-time",
                                 param=param) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC)


def _chains_of(app: AppContext, user: str, option: str = "--user") -> list[str]:
    """The chains of a user given by subject (any issuer) or by user id."""
    try:
        return [audit.chain_of(uuid.UUID(user))]
    except ValueError:
        pass
    with app.deps.sessions() as session:
        ids = session.scalars(select(User.id).where(User.subject == user)).all()
    if not ids:
        raise click.BadParameter(f"no user {user!r}", param_hint=option)
    return [audit.chain_of(i) for i in ids]


@click.group("audit")
def audit_group() -> None:
    """The audit trail: "user X, via agent Z (client_id), did Y"."""


@audit_group.command("show")
@click.option("--user", help="Only this user's events (subject at the AS, or user id).")
@click.option("--agent", help="Only this agent's events (name or client_id).")
@click.option("--since", metavar="ISO-8601", callback=_moment,
              help="From this moment (ISO 8601; UTC if no zone).")
@click.option("--until", metavar="ISO-8601", callback=_moment,
              help="Before this moment (ISO 8601; UTC if no zone).")
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@json_option
@pass_app
@domain_errors
def show(app: AppContext, user: str | None, agent: str | None, since: dt.datetime | None,
         until: dt.datetime | None, limit: int, as_json: bool) -> None:
    """The newest events first, with who acted and what they did (never a secret)."""
    chains = _chains_of(app, user) if user else None
    query = audit.filtered(select(AuditEvent), chains=chains, agent=agent, since=since,
                           until=until).order_by(AuditEvent.id.desc()).limit(limit)
    with app.deps.sessions() as session:
        events = session.scalars(query).all()
        rows = [audit.as_dict(e) for e in events]
    if not as_json:
        for row in rows:
            row["summary"] = audit.summarize(row["detail"])
            row["agent"] = row["agent"] or ""
            row["user"] = row["user"] or ""
            row["actor"] = f"{row['actor_type']}:{row['actor'] or ''}"
    emit(rows, as_json, SHOW_COLUMNS)


@audit_group.command("verify")
@json_option
@pass_app
@domain_errors
def verify(app: AppContext, as_json: bool) -> None:
    """Walk every chain and checkpoint; exit 1 naming the first altered, deleted or inserted
    event."""
    deps = app.deps
    total = audit_verify.count_events(deps.engine)
    if total >= PROGRESS_FROM and not as_json:
        with click.progressbar(length=total, label="verifying the audit trail",
                               file=sys.stderr) as bar:
            report = audit_verify.verify(deps.engine, deps.keys, progress=bar.update)
    else:
        report = audit_verify.verify(deps.engine, deps.keys)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        for problem in report.problems:
            click.echo(str(problem))
        for note in report.notes:
            click.echo(f"note: {note}", err=True)
        click.echo(audit_verify.describe(report))
    if not report.ok:
        more = f" ({report.problem_count} problems in all)" if report.problem_count > 1 else ""
        raise click.ClickException(f"the audit trail does not verify: {report.first}{more}")


@audit_group.command("export")
@click.option("--user", required=True, help="The user (subject at the AS, or user id).")
@pass_app
@domain_errors
def export(app: AppContext, user: str) -> None:
    """A user's whole trail as JSON lines, oldest first (for a data-access request)."""
    chains = _chains_of(app, user)
    query = audit.filtered(select(AuditEvent), chains=chains)\
        .order_by(AuditEvent.chain, AuditEvent.seq).execution_options(yield_per=2000)
    out = sys.stdout
    with app.deps.sessions() as session:
        for partition in session.scalars(query).partitions():
            for event in partition:
                out.write(json.dumps(audit.as_dict(event), ensure_ascii=False) + "\n")
            session.expunge_all()
    out.flush()


@audit_group.command("checkpoint")
@click.option("--force", is_flag=True, help="Make one even if no chain moved.")
@json_option
@pass_app
@domain_errors
def checkpoint(app: AppContext, force: bool, as_json: bool) -> None:
    """Sign the heads of the chains that moved since the last checkpoint (run it often)."""
    deps = app.deps
    info = checkpoints.create_checkpoint(deps.sessions, deps.keys, deps.clock, force=force)
    if info is None:
        emit([{"checkpoint": None, "status": "nothing new since the last checkpoint"}],
             as_json, ["status"])
        return
    emit([_checkpoint_row(info)], as_json,
         ["checkpoint", "created_at", "chains", "digest"])


@audit_group.command("prune")
@click.option("--before", metavar="ISO-8601", callback=_moment,
              help="Remove events older than this (ISO 8601; UTC if no zone).")
@click.option("--older-than-days", type=click.IntRange(1, None),
              help="Remove events older than this many days (the retention period).")
@operator_option
@json_option
@pass_app
@domain_errors
def prune(app: AppContext, before: dt.datetime | None, older_than_days: int | None,
          operator: str, as_json: bool) -> None:
    """Remove old events up to the newest checkpoint before the cutoff, leaving a signed base
    checkpoint where each chain now starts. Verifies first; needs a role allowed to delete."""
    if (before is None) == (older_than_days is None):
        raise click.UsageError("give exactly one of --before or --older-than-days")
    deps = app.deps
    if before is None:
        assert older_than_days is not None
        before = deps.clock.now() - dt.timedelta(days=older_than_days)

    def problems() -> list[audit_verify.Problem]:
        return audit_verify.verify(deps.engine, deps.keys).problems

    result = checkpoints.prune(deps.sessions, deps.keys, deps.clock, before=before,
                               operator=operator, verify=problems)
    emit([{"events_deleted": result.events_deleted,
           "checkpoints_deleted": result.checkpoints_deleted, "chains": result.chains,
           "through_checkpoint": result.through_checkpoint,
           "base_checkpoint": result.base.id, "digest": result.base.digest}], as_json,
         ["events_deleted", "checkpoints_deleted", "chains", "base_checkpoint", "digest"])


def _checkpoint_row(info: checkpoints.CheckpointInfo) -> dict[str, Any]:
    return {"checkpoint": info.id, "kind": info.kind, "created_at": info.created_at.isoformat(),
            "chains": info.chains, "digest": info.digest, "prev_digest": info.prev_digest,
            "key_id": info.key_id}
