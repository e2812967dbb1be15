"""audit: append-only trail (role behalf_app, trigger), checkpoint chain and key columns

Revision ID: 0005
Revises: 0003
Create Date: 2026-11-30 10:00:00.000000

PostgreSQL only, besides the columns:

* Role `behalf_app` (NOLOGIN; created once per cluster, idempotently). It is the role the
  services run as: grant it to their login role (`GRANT behalf_app TO behalf_service`) and
  make sure that login role does not own the tables (an owner keeps every privilege). It may
  read and write the application tables, but on `audit_events` and `audit_checkpoints` only
  SELECT and INSERT: UPDATE, DELETE and TRUNCATE are revoked. On `audit_heads` it may not
  DELETE or TRUNCATE (appending updates a head row). Tables created by later migrations get
  the same read/write privileges by default (`ALTER DEFAULT PRIVILEGES`).

* A statement trigger on `audit_events` and `audit_checkpoints` refuses UPDATE always and
  DELETE unless the session set `behalf.audit_prune = on` (the `behalf audit prune` command
  does, with `SET LOCAL`, run as the owning role). Trade-off: the trigger guards against
  mistakes and against any role that holds the privilege (the owner, an admin script); it is
  not a security boundary against the owner or a superuser, who can set the same variable,
  disable triggers or use `session_replication_role = replica`. What stops the service role
  is the REVOKE; what catches anyone else is `behalf audit verify` (hash chains and signed
  checkpoints). TRUNCATE is not trapped (the owner's test tooling empties tables with it);
  the service role cannot TRUNCATE.

SQLite (the dev mode) gets the columns only.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0005'
down_revision: str | None = '0003'
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None

APPEND_ONLY = ("audit_events", "audit_checkpoints")

CREATE_ROLE = """
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'behalf_app') THEN
        BEGIN
            CREATE ROLE behalf_app NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- created meanwhile by a migration of another database in this cluster
        END;
    END IF;
END
$$;
"""

GRANTS = """
DO $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO behalf_app', current_schema());
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA %I '
                   'TO behalf_app', current_schema());
    EXECUTE format('GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA %I TO behalf_app',
                   current_schema());
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I '
                   'GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO behalf_app',
                   current_schema());
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I '
                   'GRANT USAGE, SELECT ON SEQUENCES TO behalf_app', current_schema());
END
$$;
REVOKE UPDATE, DELETE, TRUNCATE ON audit_events, audit_checkpoints FROM behalf_app;
REVOKE DELETE, TRUNCATE ON audit_heads FROM behalf_app;
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON alembic_version FROM behalf_app;
"""

TRIGGER_FUNCTION = """
CREATE OR REPLACE FUNCTION behalf_audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE'
       AND coalesce(current_setting('behalf.audit_prune', true), '') = 'on' THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'the audit trail is append-only: % on % refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'old events are removed only by `behalf audit prune`';
END
$$;
"""


def upgrade() -> None:
    with op.batch_alter_table('audit_heads') as batch:
        batch.add_column(sa.Column('checkpointed_seq', sa.BigInteger(), server_default='0',
                                   nullable=False))
    with op.batch_alter_table('audit_checkpoints') as batch:
        batch.add_column(sa.Column('kind', sa.String(length=20), server_default='periodic',
                                   nullable=False))
        batch.add_column(sa.Column('prev_digest', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column(
            'detail', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()),
                                             'postgresql'), nullable=True))
        batch.add_column(sa.Column('wrapped_key', sa.LargeBinary(), nullable=True))
        batch.create_unique_constraint('uq_audit_checkpoints_prev_digest', ['prev_digest'])

    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute(CREATE_ROLE)
    op.execute(GRANTS)
    op.execute(TRIGGER_FUNCTION)
    for table in APPEND_ONLY:
        op.execute(f"""
            CREATE TRIGGER {table}_append_only
            BEFORE UPDATE OR DELETE ON {table}
            FOR EACH STATEMENT EXECUTE FUNCTION behalf_audit_append_only()
        """)


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        for table in APPEND_ONLY:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
        op.execute("DROP FUNCTION IF EXISTS behalf_audit_append_only()")
        # The role is cluster-wide (other databases may use it): only this schema's grants go.
        op.execute("""
            DO $$
            BEGIN
                EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I REVOKE ALL ON TABLES '
                               'FROM behalf_app', current_schema());
                EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I REVOKE ALL ON SEQUENCES '
                               'FROM behalf_app', current_schema());
                EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA %I FROM behalf_app',
                               current_schema());
                EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA %I FROM behalf_app',
                               current_schema());
                EXECUTE format('REVOKE USAGE ON SCHEMA %I FROM behalf_app', current_schema());
            END
            $$;
        """)
    with op.batch_alter_table('audit_checkpoints') as batch:
        batch.drop_constraint('uq_audit_checkpoints_prev_digest', type_='unique')
        batch.drop_column('wrapped_key')
        batch.drop_column('detail')
        batch.drop_column('prev_digest')
        batch.drop_column('kind')
    with op.batch_alter_table('audit_heads') as batch:
        batch.drop_column('checkpointed_seq')
