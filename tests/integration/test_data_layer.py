"""The data layer on real PostgreSQL: migrations, compare-and-set, key rotation, no plaintext."""

import json
import uuid

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select, update

from delegation import keys as key_rotation
from delegation.errors import KmsUnavailable, UnknownKey
from delegation.vault import Sealed, Vault, delegation_context
from models import Base, Delegation
from models import migrate as migrations
from tests.support import factories

pytestmark = pytest.mark.integration


def test_postgres_schema_matches_the_models(pg_engine):
    with pg_engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                Base.metadata)
    assert diff == []


def test_migrating_again_is_a_no_op(pg_engine):
    before = migrations.current_revision(pg_engine)
    migrations.upgrade(pg_engine)
    assert migrations.current_revision(pg_engine) == before == migrations.head_revision(pg_engine)


def test_due_schedule_index_is_partial(pg_engine):
    with pg_engine.connect() as conn:
        (definition,) = conn.exec_driver_sql(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_schedules_due'"
        ).one()
    assert "WHERE (NOT paused)" in definition


def test_version_compare_and_set_lets_only_one_writer_win(pg_sessions, aws_kms):
    vault = Vault(aws_kms)
    with pg_sessions.begin() as s:
        prov = factories.provider(s)
        d = factories.delegation(s, vault, factories.user(s), factories.agent(s, prov))
        d_id = d.id
    results = []
    for _ in range(2):
        with pg_sessions.begin() as s:
            result = s.execute(
                update(Delegation).where(Delegation.id == d_id, Delegation.version == 1)
                .values(version=Delegation.version + 1)
            )
            results.append(result.rowcount)
    assert results == [1, 0]


def _make_delegations(pg_sessions, vault, n, leak_scan):
    ids = []
    with pg_sessions.begin() as s:
        prov = factories.provider(s)
        agt = factories.agent(s, prov)
        for i in range(n):
            secret = f"refresh-{uuid.uuid4().hex}"
            leak_scan.register(secret)
            d = factories.delegation(s, vault, factories.user(s, f"user-{i}"), agt,
                                     tokens={"refresh_token": secret})
            ids.append((d.id, secret))
    return ids


def test_key_rotation_rewraps_every_key_and_resumes_after_a_crash(
    pg_sessions, aws_kms, kms_client, leak_scan
):
    vault = Vault(aws_kms)
    made = _make_delegations(pg_sessions, vault, 25, leak_scan)
    with pg_sessions() as s:
        blobs_before = {d.id: d.token_blob for d in s.scalars(select(Delegation))}
    new_key = kms_client.create_key()["KeyMetadata"]["Arn"]

    # Given a rotation that crashes after its first batch
    def crash_after_first_batch(n):
        raise KmsUnavailable("simulated crash")

    with pytest.raises(KmsUnavailable):
        key_rotation.rotate(pg_sessions, vault, new_key, batch_size=10,
                            progress=crash_after_first_batch)
    assert key_rotation.pending_count(pg_sessions, new_key) == 15

    # When it runs again, it finishes the rest only
    assert key_rotation.rotate(pg_sessions, vault, new_key, batch_size=10) == 15
    assert key_rotation.pending_count(pg_sessions, new_key) == 0

    # Then blobs are untouched and open under the new key alone
    kms_client.disable_key(KeyId=aws_kms.key_id.rsplit("/", 1)[1])
    fresh_vault = Vault(aws_kms)
    with pg_sessions() as s:
        for d_id, secret in made:
            d = s.get(Delegation, d_id)
            assert d.key_id == new_key and d.token_blob == blobs_before[d_id]
            ctx = delegation_context(d.user_id, d.id, d.agent_id)
            opened = fresh_vault.open(Sealed(d.token_blob, d.wrapped_key, d.key_id), ctx)
            assert json.loads(opened)["refresh_token"] == secret


def test_a_kms_outage_during_sealing_writes_nothing(pg_sessions, kms_client):
    from delegation.kms import AwsKms

    broken = AwsKms(kms_client, "alias/missing")
    with pytest.raises(UnknownKey), pg_sessions.begin() as s:
        prov = factories.provider(s)
        factories.delegation(s, Vault(broken), factories.user(s), factories.agent(s, prov))
    with pg_sessions() as s:
        assert s.scalars(select(Delegation)).all() == []


def test_the_database_never_holds_a_stored_token_in_plaintext(pg_sessions, aws_kms, leak_scan):
    # the leak_scan fixture dumps the database after this test and fails on any hit
    _make_delegations(pg_sessions, Vault(aws_kms), 5, leak_scan)
    assert len(leak_scan.values) == 5


def test_the_leak_scan_would_catch_a_plaintext_token(pg_sessions, pg_database):
    from tests.support.databases import LeakScan

    scan = LeakScan()
    scan.register("plain-refresh-token-123")
    with pg_sessions.begin() as s:
        factories.provider(s).discovered = {"oops": "plain-refresh-token-123"}
    with pytest.raises(AssertionError, match="plaintext"):
        scan.check(pg_database)
