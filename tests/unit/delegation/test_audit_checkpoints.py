"""Signed checkpoints (local key file and moto's KMS) and retention that keeps the trail
verifiable (SQLite)."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from delegation import audit, checkpoints
from delegation.audit_verify import verify
from delegation.kms import LocalKeyFile
from models import AuditCheckpoint, AuditEvent, AuditHead
from tests.support.audit import call_record, tamper, write_trail

USERS = [uuid.UUID(int=0xA), uuid.UUID(int=0xB), uuid.UUID(int=0xC)]


@pytest.fixture
def keys(tmp_path):
    return LocalKeyFile(tmp_path / "key", warn=False)


def engine_of(sessions):
    return sessions.kw["bind"]


def count(sessions, model, *where):
    with sessions() as s:
        return len(s.scalars(select(model).where(*where)).all())


def test_a_checkpoint_lists_only_the_chains_that_moved(sqlite_sessions, clock, keys):
    write_trail(sqlite_sessions, clock, USERS, 2)
    first = checkpoints.create_checkpoint(sqlite_sessions, keys, clock)
    assert first is not None and first.chains == 3 and first.prev_digest is None
    assert checkpoints.create_checkpoint(sqlite_sessions, keys, clock) is None

    write_trail(sqlite_sessions, clock, USERS[:1], 1)
    second = checkpoints.create_checkpoint(sqlite_sessions, keys, clock)
    assert second is not None and second.prev_digest == first.digest
    with sqlite_sessions() as s:
        row = s.get(AuditCheckpoint, second.id)
        assert row.heads == {str(USERS[0]): [3, s.get(AuditHead, str(USERS[0])).hash]}
        assert row.kind == "periodic" and row.wrapped_key and row.key_id == keys.key_id
    forced = checkpoints.create_checkpoint(sqlite_sessions, keys, clock, force=True)
    assert forced is not None and forced.chains == 0
    assert checkpoints.latest(sqlite_sessions) == forced
    assert verify(engine_of(sqlite_sessions), keys).ok


def test_two_checkpoints_cannot_follow_the_same_one(sqlite_sessions, clock, keys):
    write_trail(sqlite_sessions, clock, USERS, 1)
    info = checkpoints.create_checkpoint(sqlite_sessions, keys, clock)
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError), sqlite_sessions.begin() as s:
        checkpoints._insert(s, keys, kind="periodic", now=clock.now(), heads={}, detail=None,
                            prev_digest=None)
        checkpoints._insert(s, keys, kind="periodic", now=clock.now(), heads={}, detail=None,
                            prev_digest=info.digest)
        checkpoints._insert(s, keys, kind="periodic", now=clock.now(), heads={}, detail=None,
                            prev_digest=info.digest)


def test_checkpoints_signed_by_aws_kms_are_bound_to_their_digest(sqlite_sessions, clock,
                                                                  aws_kms, kms_client):
    write_trail(sqlite_sessions, clock, USERS, 1)
    info = checkpoints.create_checkpoint(sqlite_sessions, aws_kms, clock)
    assert info.key_id == aws_kms.key_id
    assert verify(engine_of(sqlite_sessions), aws_kms).ok

    # A row whose digest and content were both changed cannot get its key back from KMS.
    with sqlite_sessions() as s:
        row = s.get(AuditCheckpoint, info.id)
        row.heads = {}
        forged = checkpoints.digest_of(row)
        s.rollback()
    tamper(engine_of(sqlite_sessions),
           "UPDATE audit_checkpoints SET heads = '{}', digest = :d WHERE id = :i",
           d=forged, i=info.id)
    report = verify(engine_of(sqlite_sessions), aws_kms)
    assert "signature does not verify" in str(report.first)


def test_pruning_starts_each_chain_at_a_signed_base_and_still_verifies(
    sqlite_sessions, clock, keys
):
    engine = engine_of(sqlite_sessions)
    # Given a year of activity with a checkpoint after each month
    write_trail(sqlite_sessions, clock, USERS, 3)
    january = checkpoints.create_checkpoint(sqlite_sessions, keys, clock)
    assert january is not None and january.chains == 3
    clock.advance(30 * 86400)
    write_trail(sqlite_sessions, clock, USERS[:2], 2)
    february = checkpoints.create_checkpoint(sqlite_sessions, keys, clock)
    clock.advance(30 * 86400)
    write_trail(sqlite_sessions, clock, USERS[:1], 2)  # not checkpointed yet
    cutoff = february.created_at

    # When events older than February's checkpoint are pruned
    result = checkpoints.prune(sqlite_sessions, keys, clock, before=cutoff, operator="olga",
                               verify=lambda: verify(engine, keys).problems)

    # Then what the checkpoints covered is gone, the rest stays, and it all verifies
    assert result.through_checkpoint == february.id
    assert result.events_deleted == 9 + 4 and result.checkpoints_deleted == 2
    assert count(sqlite_sessions, AuditEvent, AuditEvent.chain == str(USERS[0])) == 2
    assert count(sqlite_sessions, AuditEvent, AuditEvent.chain == str(USERS[2])) == 0
    with sqlite_sessions() as s:
        base = s.get(AuditCheckpoint, result.base.id)
        assert base.kind == "base" and base.detail["base_digest"] == february.digest
        assert base.detail["operator"] == "olga"
        assert {c: h[0] for c, h in base.heads.items()} == {
            str(USERS[0]): 5, str(USERS[1]): 5, str(USERS[2]): 3}
        [pruned] = s.scalars(select(AuditEvent)
                             .where(AuditEvent.action == "audit:events:pruned")).all()
        assert (pruned.actor_type, pruned.actor) == ("operator", "olga")
        assert pruned.chain == audit.SYSTEM_CHAIN
    report = verify(engine, keys)
    assert report.ok, report.problems

    # And the chains go on; a second pruning builds on the first base
    write_trail(sqlite_sessions, clock, USERS, 1)
    march = checkpoints.create_checkpoint(sqlite_sessions, keys, clock)
    clock.advance(86400)
    write_trail(sqlite_sessions, clock, USERS, 1)
    checkpoints.create_checkpoint(sqlite_sessions, keys, clock)
    second = checkpoints.prune(sqlite_sessions, keys, clock, before=march.created_at,
                               operator="olga")
    assert second.base.id > result.base.id
    assert count(sqlite_sessions, AuditEvent, AuditEvent.chain == str(USERS[2])) == 1
    assert verify(engine, keys).ok, verify(engine, keys).problems

    # A deletion covered up in the head row is still caught by the signed checkpoint
    with sqlite_sessions() as s:
        eight = s.scalars(select(AuditEvent.hash).where(AuditEvent.chain == str(USERS[0]),
                                                        AuditEvent.seq == 8)).one_or_none()
    assert eight is None  # seq 8 was pruned: the chain now starts after it
    tamper(engine, "DELETE FROM audit_events WHERE chain = :c AND seq = 9", c=str(USERS[0]))
    tamper(engine, "UPDATE audit_heads SET seq = 8 WHERE chain = :c", c=str(USERS[0]))
    problem = verify(engine, keys).first
    assert (problem.kind, problem.chain, problem.seq) == ("deleted", str(USERS[0]), 9)
    assert "signed seq 9" in str(problem)


def test_pruning_needs_a_checkpoint_and_an_intact_trail(sqlite_sessions, clock, keys):
    engine = engine_of(sqlite_sessions)
    write_trail(sqlite_sessions, clock, USERS, 2)
    with pytest.raises(checkpoints.NothingToPrune):
        checkpoints.prune(sqlite_sessions, keys, clock, before=clock.now(), operator="olga")
    checkpoints.create_checkpoint(sqlite_sessions, keys, clock)
    tamper(engine, "UPDATE audit_events SET actor = 'x' WHERE seq = 1")
    with pytest.raises(checkpoints.PruneRefused, match="does not verify"):
        checkpoints.prune(sqlite_sessions, keys, clock, before=clock.now(), operator="olga",
                          verify=lambda: verify(engine, keys).problems)
    assert count(sqlite_sessions, AuditEvent) == 6


def test_fold_takes_the_furthest_position_of_each_chain():
    rows = [AuditCheckpoint(heads={"a": [3, "h3"], "b": [1, "b1"]}),
            AuditCheckpoint(heads={"a": [5, "h5"]}), AuditCheckpoint(heads={"a": [4, "x"]})]
    assert checkpoints.fold(rows) == {"a": (5, "h5"), "b": (1, "b1")}


def test_the_checkpoint_payload_is_canonical(clock):
    one = checkpoints.payload(kind="periodic", created_at=clock.now(), prev_digest=None,
                              heads={"b": (1, "x"), "a": [2, "y"]}, detail=None)
    two = checkpoints.payload(kind="periodic", created_at=clock.now(), prev_digest=None,
                              heads={"a": (2, "y"), "b": [1, "x"]}, detail={})
    assert one == two and " " not in one


def test_a_record_written_during_a_checkpoint_is_in_the_next_one(sqlite_sessions, clock,
                                                                  keys):
    write_trail(sqlite_sessions, clock, USERS[:1], 1)
    checkpoints.create_checkpoint(sqlite_sessions, keys, clock)
    with sqlite_sessions.begin() as s:
        audit.append(s, call_record(USERS[0], 9), clock.now())
    later = checkpoints.create_checkpoint(sqlite_sessions, keys, clock)
    assert later is not None and later.chains == 1
