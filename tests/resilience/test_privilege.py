"""Least privilege in the data layer, on real PostgreSQL, as the services really connect: a login
role that is a member of `behalf_app` (migrations 0005 and 0007) and owns nothing.

It proves: the audit trail is append-only for the services (no UPDATE, DELETE or TRUNCATE, and
the prune switch does not help); records are never deleted (only spent authorisation requests
are); no DDL (no table, function or trigger of its own, no ALTER/DROP/disable of ours); no
escape (no SET ROLE to the owner, no replication mode, no superuser-only file or program
access, so no server key files); and its privileges are exactly the expected table-by-table
set, so a new table cannot widen them unnoticed. It still can do what the services do.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import DBAPIError

from delegation import audit
from delegation.clock import FrozenClock
from models import AuditEvent
from models.session import make_engine, make_session_factory
from tests.support.audit import call_record, write_trail
from tests.support.databases import PG_ADMIN_URL

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RW = {"SELECT", "INSERT", "UPDATE"}
EXPECTED = {
    # records: read and write, never delete
    **{t: RW for t in ("providers", "agents", "users", "delegations", "schedules",
                       "job_runs", "outbox", "reauth_links")},
    "authorization_requests": RW | {"DELETE"},  # a spent or expired state is removed
    "audit_events": {"SELECT", "INSERT"},
    "audit_checkpoints": {"SELECT", "INSERT"},
    "audit_heads": RW,  # appending moves the head
    "alembic_version": {"SELECT"},
}


@pytest.fixture
def service(pg_database: str, pg_engine: Engine) -> Iterator[Engine]:
    """An engine connected as a fresh login role granted `behalf_app`, as deployments do."""
    role = f"behalf_svc_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE ROLE "{role}" LOGIN'))
        conn.execute(text(f'GRANT behalf_app TO "{role}"'))
    url = pg_database.replace("://postgres@", f"://{role}@", 1)
    assert role in url, "the admin URL must name the postgres user"
    engine = make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        admin.dispose()


def refused(engine: Engine, sql: str) -> str:
    """Run `sql` in its own transaction; it must fail. Returns the database's reason."""
    with pytest.raises(DBAPIError) as failure, engine.begin() as conn:
        conn.execute(text(sql))
    return str(failure.value.orig)


def test_the_service_role_can_do_its_work(service: Engine, pg_sessions: object) -> None:
    clock = FrozenClock()
    sessions = make_session_factory(service)
    with sessions.begin() as s:
        assert s.scalar(text("SELECT current_user")).startswith("behalf_svc_")
        user_id = uuid.uuid4()
        audit.append(s, call_record(user_id, 1), clock.now())
        assert len(s.scalars(select(AuditEvent).where(AuditEvent.user_id == user_id)).all()) == 1
    with service.begin() as conn:
        conn.execute(text("UPDATE delegations SET status = status WHERE false"))
        conn.execute(text("DELETE FROM authorization_requests WHERE false"))


def test_the_audit_trail_is_append_only_for_the_services(service: Engine, pg_sessions: object
                                                         ) -> None:
    write_trail(pg_sessions, FrozenClock(), [uuid.uuid4()], 2)  # type: ignore[arg-type]
    for sql in ("UPDATE audit_events SET actor = 'mallory'",
                "DELETE FROM audit_events",
                "TRUNCATE audit_events",
                "UPDATE audit_checkpoints SET digest = 'x'",
                "DELETE FROM audit_checkpoints",
                "TRUNCATE audit_checkpoints",
                "DELETE FROM audit_heads",
                "TRUNCATE audit_heads",
                "SET LOCAL behalf.audit_prune = 'on'; DELETE FROM audit_events"):
        assert "permission denied" in refused(service, sql), sql
    with service.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM audit_events")) == 2


def test_records_are_never_deleted_by_the_services(service: Engine) -> None:
    for table in ("providers", "agents", "users", "delegations", "schedules", "job_runs",
                  "outbox", "reauth_links", "alembic_version"):
        assert "permission denied" in refused(service, f"DELETE FROM {table}"), table
        assert "permission denied" in refused(service, f"TRUNCATE {table}"), table
    assert "permission denied" in refused(service, "UPDATE alembic_version SET version_num = 'x'")


def test_the_service_role_has_no_ddl(service: Engine) -> None:
    for sql in ("CREATE TABLE stolen (token text)",
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
                "CREATE SCHEMA side",
                "ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only",
                "DROP TRIGGER audit_events_append_only ON audit_events",
                "CREATE TRIGGER t BEFORE INSERT ON delegations FOR EACH ROW "
                "EXECUTE FUNCTION behalf_audit_append_only()",
                "ALTER TABLE delegations ADD COLUMN copy text",
                "DROP TABLE delegations",
                "CREATE INDEX ix_x ON delegations (status)",
                "ALTER TABLE audit_events OWNER TO current_user"):
        reason = refused(service, sql)
        assert "permission denied" in reason or "must be owner" in reason, (sql, reason)
    # Granting what it has not been given with GRANT OPTION is a no-op (a warning, no error).
    with service.begin() as conn:
        conn.execute(text("GRANT DELETE ON delegations TO PUBLIC"))
        assert not conn.scalar(text(
            "SELECT has_table_privilege('pg_monitor', 'delegations', 'DELETE')"))


def test_the_service_role_cannot_escape_or_read_the_servers_files(service: Engine) -> None:
    for sql in ("SET ROLE postgres",
                "SET session_replication_role = replica",
                "SELECT pg_read_file('postgresql.conf')",
                "SELECT pg_ls_dir('.')",
                "COPY delegations FROM '/etc/hostname'",
                "COPY (SELECT 1) TO PROGRAM 'true'",
                "SELECT lo_import('/etc/hostname')",
                "ALTER ROLE behalf_app SUPERUSER",
                "CREATE ROLE accomplice LOGIN"):
        reason = refused(service, sql)
        assert "permission denied" in reason or "must be" in reason, (sql, reason)
    with service.connect() as conn:
        flags = conn.execute(text(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolbypassrls, rolreplication "
            "FROM pg_roles WHERE rolname IN (current_user, 'behalf_app')")).all()
        owned = conn.scalar(text(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND pg_has_role(current_user, c.relowner, "
            "'MEMBER')"))
    assert flags and all(not any(row) for row in flags)
    assert owned == 0  # an owner keeps every privilege, whatever was revoked


def test_its_privileges_are_exactly_the_expected_ones(service: Engine) -> None:
    with service.connect() as conn:
        tables = conn.scalars(text(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")).all()
        granted = {
            table: {p for p in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE",
                                "REFERENCES", "TRIGGER")
                    if conn.scalar(text("SELECT has_table_privilege(:t, :p)"),
                                   {"t": table, "p": p})}
            for table in tables
        }
    assert granted == EXPECTED
