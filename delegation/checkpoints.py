"""Signed checkpoints of the audit trail, and retention (pruning) that keeps it verifiable.

A checkpoint, like a CloudTrail digest file, records the head (seq, hash) of every chain that
moved since the previous checkpoint, the previous checkpoint's digest (so checkpoints form a
chain too) and a timestamp. Its `digest` is SHA-256 of that content in canonical JSON; its
`signature` is HMAC-SHA256(digest) under a fresh KMS data key generated with the encryption
context `{"purpose": "audit-checkpoint", "digest": <digest>}`; the wrapped data key is kept on
the row. Verifying asks KMS to unwrap it under the same context (so a row whose digest was
changed cannot even get its key back) and recomputes the HMAC. Someone who can write to the
database but cannot use the KMS key for that purpose cannot make a checkpoint that verifies;
give only the checkpointing role `kms:GenerateDataKey` with
`kms:EncryptionContext:purpose = audit-checkpoint` (docs/audit.md).

Events appended after the newest checkpoint are protected by their chain only (an attacker
with write access could rewrite a chain's tail consistently): make checkpoints often
(`behalf audit checkpoint`, e.g. every few minutes from cron or the scheduler) and keep the
printed digests outside the database for the strongest guarantee.

Retention: `prune(before=...)` removes, for every chain, the events up to where the newest
checkpoint at or before `before` saw it, and the checkpoints up to that one, and writes a
signed `base` checkpoint whose heads say where each pruned chain now starts (and
`detail.base_digest` names the last removed checkpoint, which the first remaining one links
to). On PostgreSQL the deletion runs with `SET LOCAL behalf.audit_prune = on`, which the
append-only trigger requires, as a role that holds DELETE (not the service role).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from delegation import audit
from delegation.clock import Clock
from delegation.errors import BehalfError, SealedDataInvalid, UnknownKey
from delegation.kms import KeyProvider
from models import AuditCheckpoint, AuditEvent, AuditHead

PURPOSE = "audit-checkpoint"
PERIODIC = "periodic"
BASE = "base"
Heads = dict[str, tuple[int, str]]


class NothingToPrune(BehalfError):
    """No checkpoint old enough: pruning would leave a chain without a verifiable start."""


class PruneRefused(BehalfError):
    """The trail does not verify: pruning would destroy the evidence."""


@dataclass(frozen=True)
class CheckpointInfo:
    id: int
    kind: str
    created_at: dt.datetime
    chains: int
    digest: str
    prev_digest: str | None
    key_id: str


@dataclass(frozen=True)
class PruneResult:
    events_deleted: int
    checkpoints_deleted: int
    chains: int
    base: CheckpointInfo
    through_checkpoint: int


def context(digest: str) -> dict[str, str]:
    """The KMS encryption context a checkpoint's data key is bound to."""
    return {"purpose": PURPOSE, "digest": digest}


def payload(*, kind: str, created_at: dt.datetime, prev_digest: str | None,
            heads: Mapping[str, Sequence[Any]], detail: Mapping[str, Any] | None) -> str:
    """The canonical text a checkpoint's digest covers."""
    return json.dumps(
        {"v": 1, "kind": kind, "created_at": audit.micros(created_at),
         "prev_digest": prev_digest,
         "heads": {chain: [int(head[0]), str(head[1])] for chain, head in heads.items()},
         "detail": dict(detail or {})},
        sort_keys=True, separators=(",", ":"), ensure_ascii=True,
    )


def digest_of(row: AuditCheckpoint) -> str:
    return hashlib.sha256(payload(kind=row.kind, created_at=row.created_at,
                                  prev_digest=row.prev_digest, heads=row.heads,
                                  detail=row.detail).encode()).hexdigest()


def sign(keys: KeyProvider, digest: str) -> tuple[bytes, bytes, str]:
    """(signature, wrapped data key, key id) for `digest`, under a fresh data key."""
    data_key = keys.generate_data_key(context(digest))
    signature = hmac.new(data_key.plaintext, digest.encode(), hashlib.sha256).digest()
    return signature, data_key.wrapped, data_key.key_id


def signature_valid(keys: KeyProvider, row: AuditCheckpoint) -> bool:
    """Does the row's signature verify (its key unwraps under its digest, and the HMAC
    matches)? Raises only when KMS cannot be reached (`KmsUnavailable`)."""
    if not row.wrapped_key or not row.signature:
        return False
    try:
        key = keys.decrypt(row.wrapped_key, row.key_id, context(row.digest))
    except (SealedDataInvalid, UnknownKey):
        return False
    expected = hmac.new(key, row.digest.encode(), hashlib.sha256).digest()
    return hmac.compare_digest(expected, bytes(row.signature))


def checkpoint_info(row: AuditCheckpoint) -> CheckpointInfo:
    """What people are shown of a checkpoint row."""
    return CheckpointInfo(row.id, row.kind, row.created_at, len(row.heads or {}), row.digest,
                          row.prev_digest, row.key_id)


def _newest(session: Session) -> AuditCheckpoint | None:
    return session.scalars(
        select(AuditCheckpoint).order_by(AuditCheckpoint.id.desc()).limit(1)
    ).first()


def _insert(session: Session, keys: KeyProvider, *, kind: str, now: dt.datetime,
            heads: Mapping[str, Sequence[Any]], detail: Mapping[str, Any] | None,
            prev_digest: str | None) -> AuditCheckpoint:
    clean_heads = {chain: [int(h[0]), str(h[1])] for chain, h in heads.items()}
    body = payload(kind=kind, created_at=now, prev_digest=prev_digest, heads=clean_heads,
                   detail=detail)
    digest = hashlib.sha256(body.encode()).hexdigest()
    signature, wrapped, key_id = sign(keys, digest)
    row = AuditCheckpoint(created_at=now, kind=kind, prev_digest=prev_digest, heads=clean_heads,
                          detail=dict(detail) if detail else None, digest=digest,
                          signature=signature, wrapped_key=wrapped, key_id=key_id)
    session.add(row)
    session.flush()  # the unique prev_digest refuses a second checkpoint after the same one
    return row


def create_checkpoint(sessions: sessionmaker[Session], keys: KeyProvider, clock: Clock, *,
                      force: bool = False, attempts: int = 3) -> CheckpointInfo | None:
    """Sign the heads of every chain that moved since the last checkpoint.

    Returns None when nothing moved (unless `force`: an empty checkpoint still proves the
    trail had not grown). The hashes come from the events themselves, not from the (mutable)
    head rows. Safe to run concurrently: one of two racing checkpoints retries.
    """
    for attempt in range(attempts):
        try:
            with sessions.begin() as session:
                moved = session.execute(
                    select(AuditHead.chain, AuditHead.seq, AuditEvent.hash)
                    .join(AuditEvent, (AuditEvent.chain == AuditHead.chain)
                          & (AuditEvent.seq == AuditHead.seq))
                    .where(AuditHead.seq != AuditHead.checkpointed_seq)
                    .order_by(AuditHead.chain)
                ).all()
                if not moved and not force:
                    has_any = session.scalar(select(func.count()).select_from(AuditCheckpoint))
                    if has_any:
                        return None
                newest = _newest(session)
                row = _insert(session, keys, kind=PERIODIC, now=clock.now(),
                              heads={c: (s, h) for c, s, h in moved}, detail=None,
                              prev_digest=newest.digest if newest is not None else None)
                if moved:
                    session.execute(
                        update(AuditHead).execution_options(synchronize_session=False),
                        [{"chain": c, "checkpointed_seq": s} for c, s, _ in moved],
                    )
                return checkpoint_info(row)
        except IntegrityError:
            if attempt == attempts - 1:
                raise
    return None  # pragma: no cover - the loop returns or raises


def latest(sessions: sessionmaker[Session]) -> CheckpointInfo | None:
    with sessions() as session:
        row = _newest(session)
        return checkpoint_info(row) if row is not None else None


def fold(checkpoints: Iterable[AuditCheckpoint]) -> Heads:
    """The furthest (seq, hash) of each chain over `checkpoints` (the newest base first)."""
    state: Heads = {}
    for row in checkpoints:
        for chain, (seq, hash_) in (row.heads or {}).items():
            current = state.get(chain)
            if current is None or int(seq) > current[0]:
                state[chain] = (int(seq), str(hash_))
    return state


def prune(
    sessions: sessionmaker[Session],
    keys: KeyProvider,
    clock: Clock,
    *,
    before: dt.datetime,
    operator: str,
    verify: Callable[[], Sequence[object]] | None = None,
) -> PruneResult:
    """Delete events older than the newest checkpoint at or before `before`, keeping every
    chain verifiable from a signed `base` checkpoint. `verify` (returning the problems found)
    runs first: a trail that does not verify is not pruned."""
    if verify is not None:
        problems = verify()
        if problems:
            raise PruneRefused(f"the audit trail does not verify ({problems[0]}); "
                               "nothing was pruned")
    try:
        return _prune(sessions, keys, clock.now(), before=before, operator=operator)
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) == "42501":  # insufficient_privilege
            raise PruneRefused("this database role may not delete audit rows: run pruning "
                               "as the role that owns the tables, not the service role") \
                from None
        raise


def _prune(sessions: sessionmaker[Session], keys: KeyProvider, now: dt.datetime, *,
           before: dt.datetime, operator: str) -> PruneResult:
    with sessions.begin() as session:
        through = session.scalars(
            select(AuditCheckpoint).where(AuditCheckpoint.created_at <= before)
            .order_by(AuditCheckpoint.id.desc()).limit(1)
        ).first()
        if through is None:
            raise NothingToPrune(f"no checkpoint at or before {before.isoformat()}: nothing "
                                 "can be pruned (make checkpoints regularly)")
        base = session.scalars(
            select(AuditCheckpoint).where(AuditCheckpoint.kind == BASE)
            .order_by(AuditCheckpoint.id.desc()).limit(1)
        ).first()
        older = session.scalars(
            select(AuditCheckpoint)
            .where(AuditCheckpoint.id <= through.id, AuditCheckpoint.kind == PERIODIC)
            .order_by(AuditCheckpoint.id)
        ).all()
        state = fold([*([base] if base is not None else []), *older])
        newest = _newest(session)
        assert newest is not None
        prev_digest = newest.digest
        if session.get_bind().dialect.name == "postgresql":
            # what the append-only trigger asks for; local to this transaction
            session.execute(text("SET LOCAL behalf.audit_prune = 'on'"))
        deleted = _delete_events(session, state)
        removed = session.execute(
            delete(AuditCheckpoint).where(AuditCheckpoint.id <= through.id)
            .execution_options(synchronize_session=False)
        )
        cps_deleted = int(getattr(removed, "rowcount", 0) or 0)
        through_id, through_digest = through.id, through.digest
        session.expunge_all()  # deleted rows; SQLite may hand their ids out again
        detail = {"base_digest": through_digest, "through_checkpoint": through_id,
                  "pruned_before": before.astimezone(dt.UTC).isoformat(),
                  "operator": operator, "events_deleted": deleted}
        row = _insert(session, keys, kind=BASE, now=now, heads=state, detail=detail,
                      prev_digest=prev_digest)
        audit.append(session, audit.AuditRecord(
            action="audit:events:pruned", actor_type="operator", actor=operator,
            request_id=str(uuid.uuid4()),
            detail={"before": before.astimezone(dt.UTC).isoformat(),
                    "through_checkpoint": through_id, "base_checkpoint": row.id,
                    "events_deleted": deleted, "chains": len(state)},
        ), now)
        return PruneResult(deleted, cps_deleted, len(state), checkpoint_info(row), through_id)


def _delete_events(session: Session, state: Heads) -> int:
    """Delete each chain's events up to its seq in `state` (one statement on PostgreSQL)."""
    if not state:
        return 0
    chains = sorted(state)
    if session.get_bind().dialect.name == "postgresql":
        result = session.execute(
            text("DELETE FROM audit_events AS e "
                 "USING unnest(CAST(:chains AS text[]), CAST(:seqs AS bigint[])) AS p(chain, seq) "
                 "WHERE e.chain = p.chain AND e.seq <= p.seq"),
            {"chains": chains, "seqs": [state[c][0] for c in chains]},
        )
        return int(getattr(result, "rowcount", 0) or 0)
    deleted = 0
    for chain in chains:
        result = session.execute(
            delete(AuditEvent).where(AuditEvent.chain == chain,
                                     AuditEvent.seq <= state[chain][0])
            .execution_options(synchronize_session=False)
        )
        deleted += int(getattr(result, "rowcount", 0) or 0)
    return deleted
