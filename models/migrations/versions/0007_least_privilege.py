"""least privilege: the service role deletes nothing but spent authorisation requests; no DDL

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 09:00:00.000000

PostgreSQL only (SQLite, the dev mode, has no roles: nothing to do).

* `behalf_app` loses DELETE on every table whose rows are records rather than scratch:
  providers, agents, users, delegations, schedules, job_runs, outbox and reauth_links. No
  service deletes them (revocation, breaking and repair are states, and "absence never
  grants"), so a compromised service cannot erase a delegation, an agent or a run to hide what
  happened, nor make a revoked delegation vanish. It keeps DELETE on `authorization_requests`
  (a used or expired state is removed). `behalf audit prune` and test tooling run as the owner.
* CREATE on the schema is revoked from PUBLIC. PostgreSQL 15 already does so; on 13 and 14 any
  role could otherwise create tables, functions or triggers next to ours (e.g. a trigger that
  copies tokens elsewhere). The service role therefore has no DDL at all: it owns nothing, so it
  cannot ALTER, DROP or disable the audit trigger either.

Tables created by later migrations still get SELECT, INSERT, UPDATE, DELETE by default (0005's
default privileges); a migration that adds a record table should revoke DELETE the same way.
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None

RECORD_TABLES = ("providers", "agents", "users", "delegations", "schedules", "job_runs",
                 "outbox", "reauth_links")

SCHEMA_CREATE = """
DO $$
BEGIN
    EXECUTE format('REVOKE CREATE ON SCHEMA %I FROM PUBLIC', current_schema());
END
$$;
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute(f"REVOKE DELETE, TRUNCATE ON {', '.join(RECORD_TABLES)} FROM behalf_app")
    op.execute(SCHEMA_CREATE)


def downgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    # (CREATE for PUBLIC is not given back: PostgreSQL 15+ does not grant it either.)
    op.execute(f"GRANT DELETE ON {', '.join(RECORD_TABLES)} TO behalf_app")
