"""`audit verify` catches what an attacker with write access to the database does, and names
the first event it touched (SQLite; the PostgreSQL fast path is in the integration tests)."""

from __future__ import annotations

import uuid

import pytest

from delegation import audit, checkpoints
from delegation.audit_verify import verify
from delegation.kms import LocalKeyFile
from tests.support.audit import event_id, tamper, write_trail

USERS = [uuid.UUID(int=0xA), uuid.UUID(int=0xB)]
ALICE = str(USERS[0])


@pytest.fixture
def keys(tmp_path):
    return LocalKeyFile(tmp_path / "key", warn=False)


@pytest.fixture
def trail(sqlite_sessions, clock):
    write_trail(sqlite_sessions, clock, USERS, 5)
    return sqlite_sessions.kw["bind"]


def first(report):
    assert not report.ok
    return report.first


def test_an_untouched_trail_verifies(trail, keys, sqlite_sessions, clock):
    checkpoints.create_checkpoint(sqlite_sessions, keys, clock)
    report = verify(trail, keys)
    assert report.ok, report.problems
    assert (report.events, report.chains, report.checkpoints) == (10, 2, 1)
    assert report.notes == []


def test_an_edited_event_is_named(trail, keys):
    tamper(trail, "UPDATE audit_events SET detail = :d WHERE chain = :c AND seq = 3",
           d='{"method": "DELETE", "path": "/v2/reports/{id}", "status": 200, "n": 2}', c=ALICE)
    problem = first(verify(trail, keys))
    assert (problem.kind, problem.chain, problem.seq) == ("altered", ALICE, 3)
    assert problem.event_id == event_id(trail, ALICE, 3)
    assert "does not match its hash" in str(problem)


def test_a_deleted_event_is_named(trail, keys):
    tamper(trail, "DELETE FROM audit_events WHERE chain = :c AND seq = 2", c=ALICE)
    problem = first(verify(trail, keys))
    assert (problem.kind, problem.chain, problem.seq) == ("deleted", ALICE, 2)
    assert f"before event id {event_id(trail, ALICE, 3)}" in str(problem)


def test_a_deleted_tail_is_caught_by_the_head(trail, keys):
    tamper(trail, "DELETE FROM audit_events WHERE chain = :c AND seq >= 4", c=ALICE)
    problem = first(verify(trail, keys))
    assert (problem.kind, problem.chain, problem.seq) == ("deleted", ALICE, 4)
    assert "seqs 4..5 deleted" in str(problem)


def test_reordered_events_are_named(trail, keys):
    # swap the positions of seq 2 and 3
    tamper(trail, "UPDATE audit_events SET seq = -seq WHERE chain = :c AND seq IN (2, 3)",
           c=ALICE)
    tamper(trail, "UPDATE audit_events SET seq = CASE seq WHEN -2 THEN 3 ELSE 2 END "
                  "WHERE chain = :c AND seq < 0", c=ALICE)
    report = verify(trail, keys)
    problem = first(report)
    assert (problem.chain, problem.seq) == (ALICE, 2)
    assert problem.kind in ("altered", "unlinked")


def test_an_inserted_event_is_named(trail, keys, sqlite_sessions, clock):
    # a forged event appended after the head, with a plausible hash link
    with sqlite_sessions() as s:
        head = s.get(audit.AuditHead, ALICE)
        values = audit._row(audit.AuditRecord(action="api:call", user_id=USERS[0]), 6,
                            clock.now(), head.hash)
    values["detail"] = '{}'
    values["occurred_at"] = values["occurred_at"].isoformat()
    values["user_id"] = USERS[0].hex
    tamper(trail, "INSERT INTO audit_events (chain, seq, occurred_at, action, user_id, "
                  "actor_type, detail, prev_hash, hash) VALUES (:chain, :seq, :occurred_at, "
                  ":action, :user_id, :actor_type, :detail, :prev_hash, :hash)", **values)
    problem = first(verify(trail, keys))
    assert (problem.kind, problem.chain, problem.seq) == ("inserted", ALICE, 6)
    assert "beyond the chain's head" in str(problem)


def test_an_edit_that_recomputes_the_hash_is_caught_by_the_next_link(trail, keys):
    values = _rehashed(trail, ALICE, 2, actor="someone-else")
    tamper(trail, "UPDATE audit_events SET actor = :actor, hash = :hash "
                  "WHERE chain = :chain AND seq = :seq", **values)
    problem = first(verify(trail, keys))
    assert (problem.kind, problem.chain, problem.seq) == ("unlinked", ALICE, 3)
    assert f"seq 2 (event id {event_id(trail, ALICE, 2)})" in str(problem)


def test_a_consistently_rewritten_chain_is_caught_by_the_checkpoint(
    trail, keys, sqlite_sessions, clock
):
    # Given a checkpoint over the chains as they are
    checkpoints.create_checkpoint(sqlite_sessions, keys, clock)
    # When an attacker edits seq 4, re-hashes it and seq 5, and fixes the head
    values = _rehashed(trail, ALICE, 4, actor="someone-else")
    tamper(trail, "UPDATE audit_events SET actor = :actor, hash = :hash "
                  "WHERE chain = :chain AND seq = :seq", **values)
    nxt = _rehashed(trail, ALICE, 5, prev_hash=values["hash"])
    tamper(trail, "UPDATE audit_events SET prev_hash = :prev_hash, hash = :hash "
                  "WHERE chain = :chain AND seq = :seq", **nxt)
    tamper(trail, "UPDATE audit_heads SET hash = :h WHERE chain = :c", h=nxt["hash"], c=ALICE)
    # Then every link holds, but the checkpoint names the rewritten head
    problem = first(verify(trail, keys))
    assert (problem.kind, problem.chain, problem.seq) == ("altered", ALICE, 5)
    assert "checkpoint #1 signed" in str(problem)


def test_a_chain_truncated_with_its_head_is_caught_by_the_checkpoint(
    trail, keys, sqlite_sessions, clock
):
    checkpoints.create_checkpoint(sqlite_sessions, keys, clock)
    tamper(trail, "DELETE FROM audit_events WHERE chain = :c AND seq = 5", c=ALICE)
    head = _rehashed(trail, ALICE, 4)
    tamper(trail, "UPDATE audit_heads SET seq = 4, hash = :h WHERE chain = :c",
           h=head["hash"], c=ALICE)
    problem = first(verify(trail, keys))
    assert (problem.kind, problem.chain, problem.seq) == ("deleted", ALICE, 5)
    assert "checkpoint #1 signed seq 5" in str(problem)


def test_checkpoints_are_chained_and_signed(trail, keys, sqlite_sessions, clock):
    for _ in range(3):
        write_trail(sqlite_sessions, clock, USERS[:1], 1)
        checkpoints.create_checkpoint(sqlite_sessions, keys, clock)
    assert verify(trail, keys).ok

    # a checkpoint edited (its heads changed)
    tamper(trail, "UPDATE audit_checkpoints SET heads = :h WHERE id = 2", h="{}")
    problem = first(verify(trail, keys))
    assert (problem.kind, problem.seq) == ("checkpoint", 2)
    assert "does not match its digest" in str(problem)


def test_a_deleted_or_forged_checkpoint_is_caught(trail, keys, sqlite_sessions, clock,
                                                    tmp_path):
    for _ in range(3):
        write_trail(sqlite_sessions, clock, USERS[:1], 1)
        checkpoints.create_checkpoint(sqlite_sessions, keys, clock)
    tamper(trail, "DELETE FROM audit_checkpoints WHERE id = 2")
    problem = first(verify(trail, keys))
    assert (problem.kind, problem.seq) == ("checkpoint", 3)
    assert "does not follow the previous checkpoint" in str(problem)

    # a checkpoint signed with a key that is not the deployment's
    other = LocalKeyFile(tmp_path / "other-key", warn=False)
    write_trail(sqlite_sessions, clock, USERS[:1], 1)
    forged = checkpoints.create_checkpoint(sqlite_sessions, other, clock)
    report = verify(trail, keys)
    assert any(p.seq == forged.id and "signature does not verify" in str(p)
               for p in report.problems)


def test_without_checkpoints_or_keys_verify_says_what_it_could_not_check(trail, keys,
                                                                          sqlite_sessions,
                                                                          clock):
    report = verify(trail, None)
    assert report.ok and "no checkpoint yet" in report.notes[0]
    checkpoints.create_checkpoint(sqlite_sessions, keys, clock)
    report = verify(trail, None)
    assert report.ok and "signatures not checked" in report.notes[0]


def _rehashed(engine, chain, seq, **changes):
    """The row at (chain, seq) with `changes` applied and its hash recomputed."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    with Session(engine) as s:
        event = s.scalars(select(audit.AuditEvent).where(audit.AuditEvent.chain == chain,
                                                         audit.AuditEvent.seq == seq)).one()
        for name, value in changes.items():
            setattr(event, name, value)
        values = {"chain": chain, "seq": seq, "hash": audit.event_hash(event), **changes}
        s.rollback()
    return values


def test_rows_stored_out_of_seq_order_still_verify(trail, keys):
    # ids are not part of an event: rows whose ids are out of seq order are not tampering
    two, four = event_id(trail, ALICE, 2), event_id(trail, ALICE, 4)
    tamper(trail, "UPDATE audit_events SET id = -id WHERE id IN (:a, :b)", a=two, b=four)
    tamper(trail, "UPDATE audit_events SET id = CASE id WHEN :ma THEN :b ELSE :a END "
                  "WHERE id IN (:ma, :mb)", a=two, b=four, ma=-two, mb=-four)
    assert event_id(trail, ALICE, 2) == four
    report = verify(trail, keys)
    assert report.ok, report.problems
    assert report.events == 10
