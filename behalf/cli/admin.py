"""`behalf migrate` and `behalf keys …`."""

from __future__ import annotations

import sys
from typing import Any, cast

import click

from behalf.cli.common import AppContext, domain_errors, operator_option, pass_app
from delegation import audit
from delegation import keys as key_rotation
from delegation.kms import LocalKeyFile
from models import migrate as migrations


@click.command()
@pass_app
@domain_errors
def migrate(app: AppContext) -> None:
    """Bring the database schema up to date (safe to run again)."""
    engine = app.deps.engine
    before = migrations.current_revision(engine)
    migrations.upgrade(engine)
    after = migrations.current_revision(engine)
    if before == after:
        click.echo(f"database already at {after}")
    else:
        click.echo(f"database migrated {before or 'empty'} -> {after}")


@click.group()
def keys() -> None:
    """Key management."""


@keys.command("rotate")
@click.option("--to-key-id", default=None,
              help="KMS key to re-wrap under (default: BEHALF_KMS_KEY_ID; with the local "
                   "key file, a new local key is created).")
@operator_option
@pass_app
@domain_errors
def rotate(app: AppContext, to_key_id: str | None, operator: str) -> None:
    """Re-wrap every data key under a new key; sealed blobs are untouched. Resumable."""
    deps = app.deps
    provider = deps.keys
    if to_key_id is None:
        if isinstance(provider, LocalKeyFile):
            to_key_id = provider.key_id
            if key_rotation.pending_count(deps.sessions, to_key_id) == 0:
                to_key_id = provider.add_key()
        else:
            to_key_id = provider.key_id
    pending = key_rotation.pending_count(deps.sessions, to_key_id)
    if pending == 0:
        click.echo(f"nothing to re-wrap: every data key is under {to_key_id}")
        return
    with click.progressbar(length=pending, label=f"re-wrapping under {to_key_id}",
                           file=sys.stderr) as bar:
        done = key_rotation.rotate(
            deps.sessions, deps.vault, to_key_id, progress=cast(Any, bar).update
        )
    with deps.sessions.begin() as session:
        audit.append(session, audit.AuditRecord(
            action="keys:rotated", actor_type="operator", actor=operator,
            detail={"to_key_id": to_key_id, "rewrapped": done}), deps.clock.now())
    click.echo(f"re-wrapped {done} data keys under {to_key_id}")
