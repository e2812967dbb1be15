"""Verify the audit trail: every chain, every checkpoint, in one consistent snapshot.

What is checked, and what each failure means:
- every event's hash is recomputed from its content (`altered` when it differs);
- every event links to the previous event of its chain: seq is the previous seq + 1
  (`deleted` when some are missing) and prev_hash is the previous event's hash (`unlinked`:
  the event before it was altered and re-hashed, or this one was inserted or moved);
- an event at or before where its chain starts, or beyond its chain's head row, is `inserted`;
- a chain that ends before its head row or before a checkpoint says it reached is truncated
  (`deleted`); an event whose hash differs from what a checkpoint signed was `altered` after
  the checkpoint;
- checkpoints: each digest is recomputed from its content, each links to the previous one, and
  each signature is checked with the key provider (`checkpoint`).

How it is fast: on PostgreSQL the database builds each event's hash preimage itself
(`PG_PREIMAGE`, the same text `audit.preimage` builds, `jsonb` printed by PostgreSQL exactly as
`audit.render_json` renders it) and streams it with `COPY ... TO STDOUT` as raw bytes in `id`
order (cheap: the primary key follows the table's append order); Python only hashes and links,
keeping a little state per chain and tolerating rows stored out of seq order. No JSON is
parsed and no row object is built. Elsewhere (SQLite, the dev mode) rows are read with
`yield_per` and the preimage is built in Python.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, select, text
from sqlalchemy.orm import Session

from delegation import audit, checkpoints
from delegation.checkpoints import CheckpointInfo
from delegation.kms import KeyProvider
from models import AuditCheckpoint, AuditEvent, AuditHead

# Same fields, order, separator and NULL marker as `audit.preimage`.
PG_PREIMAGE = (
    "concat_ws(E'\\x1f', '" + audit.HASH_VERSION + "', chain, seq, "
    "(extract(epoch FROM occurred_at) * 1000000)::bigint, action, "
    "coalesce(user_id::text, E'\\x01'), coalesce(user_subject, E'\\x01'), "
    "coalesce(agent_name, E'\\x01'), coalesce(client_id, E'\\x01'), actor_type, "
    "coalesce(actor, E'\\x01'), coalesce(delegation_id::text, E'\\x01'), "
    "coalesce(run_id::text, E'\\x01'), coalesce(request_id, E'\\x01'), detail::text, "
    "prev_hash)"
)
PG_STREAM = (  # constant text: nothing from outside goes in
    "COPY (SELECT id, chain, seq, hash, " + PG_PREIMAGE + " FROM audit_events ORDER BY id) "  # noqa: S608
    "TO STDOUT"
)
_COPY_ESCAPE = re.compile(rb"\\(.)")
_COPY_CODES = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}
PROGRESS_EVERY = 50_000


@dataclass(frozen=True, order=True)
class Problem:
    """One finding; `str()` is the line an operator reads."""

    chain: str
    seq: int
    kind: str  # altered | deleted | inserted | unlinked | checkpoint | head
    event_id: int | None = field(default=None, compare=False)
    message: str = field(default="", compare=False)

    def __str__(self) -> str:
        if self.kind == "checkpoint":
            return f"checkpoint: {self.message}"
        where = f"chain {self.chain} seq {self.seq}"
        if self.event_id is not None:
            where += f" (event id {self.event_id})"
        return f"{self.kind}: {where}: {self.message}"


@dataclass
class VerifyReport:
    events: int = 0
    chains: int = 0
    checkpoints: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)
    problem_count: int = 0
    latest_checkpoint: CheckpointInfo | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    @property
    def first(self) -> Problem | None:
        return min(self.problems) if self.problems else None

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        cp = self.latest_checkpoint
        return {
            "ok": self.ok, "events": self.events, "chains": self.chains,
            "checkpoints": self.checkpoints, "seconds": round(self.seconds, 3),
            "events_per_second": round(self.events_per_second),
            "problem_count": self.problem_count,
            "first_problem": str(self.first) if self.first else None,
            "problems": [str(p) for p in sorted(self.problems)],
            "latest_checkpoint": None if cp is None else {
                "id": cp.id, "kind": cp.kind, "created_at": cp.created_at.isoformat(),
                "digest": cp.digest},
            "notes": list(self.notes),
        }


class _Findings:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: list[Problem] = []
        self.count = 0

    def add(self, kind: str, chain: str, seq: int, event_id: int | None, message: str) -> None:
        self.count += 1
        if len(self.items) < self.limit:
            self.items.append(Problem(chain, seq, kind, event_id, message))


@dataclass
class _Expectations:
    """What the checkpoints say, for the chain walk."""

    start: dict[str, tuple[int, str]]  # where each pruned chain starts (latest base)
    signed: dict[str, dict[int, tuple[str, int]]]  # chain -> seq -> (hash, checkpoint id)
    reached: dict[str, tuple[int, int]]  # chain -> (furthest signed seq, checkpoint id)


def verify(engine: Engine, keys: KeyProvider | None, *,
           progress: Callable[[int], None] | None = None,
           max_problems: int = 100) -> VerifyReport:
    """Walk every chain and every checkpoint. `keys` checks checkpoint signatures (None:
    skipped, with a note). `progress(n)` is called as events are read."""
    started = time.perf_counter()
    report = VerifyReport()
    findings = _Findings(max_problems)
    postgres = engine.dialect.name == "postgresql"
    options: dict[str, Any] = {"isolation_level": "REPEATABLE READ"} if postgres else {}
    with engine.connect().execution_options(**options) as conn:
        if postgres:
            conn.execute(text("SET TRANSACTION READ ONLY"))
        with Session(bind=conn) as session:
            rows = session.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.id)).all()
            heads = {c: (s, h) for c, s, h in session.execute(
                select(AuditHead.chain, AuditHead.seq, AuditHead.hash))}
        expectations = _check_checkpoints(list(rows), keys, findings, report)
        stream = _pg_rows(conn) if postgres else _python_rows(conn)
        _walk(stream, heads, expectations, findings, report, progress)
        conn.rollback()
    report.problems = sorted(findings.items)
    report.problem_count = findings.count
    report.seconds = time.perf_counter() - started
    return report


def count_events(engine: Engine) -> int:
    """How many events there are (an estimate on a large PostgreSQL table: for progress)."""
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            estimate = conn.scalar(text(
                "SELECT reltuples::bigint FROM pg_class WHERE oid = 'audit_events'::regclass"))
            if estimate is not None and estimate > 100_000:
                return int(estimate)
        return int(conn.scalar(text("SELECT count(*) FROM audit_events")) or 0)


# --- checkpoints -------------------------------------------------------------------------------


def _check_checkpoints(rows: list[AuditCheckpoint], keys: KeyProvider | None,
                       findings: _Findings, report: VerifyReport) -> _Expectations:
    report.checkpoints = len(rows)
    if not rows:
        report.notes.append("no checkpoint yet: the chains were checked against themselves "
                            "and their heads only (run `behalf audit checkpoint` regularly)")
        return _Expectations({}, {}, {})
    report.latest_checkpoint = checkpoints.checkpoint_info(rows[-1])
    bases = [r for r in rows if r.kind == checkpoints.BASE]
    base = bases[-1] if bases else None
    start = {c: (int(h[0]), str(h[1])) for c, h in (base.heads or {}).items()} if base else {}
    expected_prev = str((base.detail or {}).get("base_digest")) if base else None

    def fail(row: AuditCheckpoint, message: str) -> None:
        findings.add("checkpoint", "(checkpoints)", row.id, None,
                     f"checkpoint #{row.id} ({row.created_at.isoformat()}): {message}")

    for row in rows:
        if row.prev_digest != expected_prev:
            fail(row, "does not follow the previous checkpoint (one was deleted, inserted or "
                      "altered before it)")
        if checkpoints.digest_of(row) != row.digest:
            fail(row, "its content does not match its digest (altered)")
        expected_prev = row.digest
    if keys is None:
        report.notes.append("checkpoint signatures not checked (no key provider)")
    else:
        with ThreadPoolExecutor(max_workers=min(8, len(rows))) as pool:
            valid = list(pool.map(lambda r: checkpoints.signature_valid(keys, r), rows))
        for row, good in zip(rows, valid, strict=True):
            if not good:
                fail(row, "its signature does not verify (forged or altered)")

    signed: dict[str, dict[int, tuple[str, int]]] = {}
    reached: dict[str, tuple[int, int]] = {}
    for row in rows:
        if row.kind == checkpoints.BASE:
            continue
        for chain, (seq, hash_) in (row.heads or {}).items():
            seq = int(seq)
            if seq <= start.get(chain, (0, ""))[0]:
                continue
            signed.setdefault(chain, {})[seq] = (str(hash_), row.id)
            if seq > reached.get(chain, (0, 0))[0]:
                reached[chain] = (seq, row.id)
    return _Expectations(start, signed, reached)


# --- the chain walk ----------------------------------------------------------------------------

Row = tuple[int | bytes, bytes, int, bytes, bytes]  # id, chain, seq, hash, preimage (UTF-8)


def _unescape(value: bytes) -> bytes:
    return _COPY_ESCAPE.sub(lambda m: _COPY_CODES.get(m.group(1), m.group(1)), value)


def _pg_rows(conn: Connection) -> Iterator[Row]:
    driver = conn.connection.driver_connection
    assert driver is not None
    with driver.cursor() as cursor, cursor.copy(PG_STREAM) as copy:
        for block in copy:
            line = bytes(block)
            id_, chain, seq, hash_, pre = line[:-1].split(b"\t")
            if b"\\" in line:  # COPY's text format escaped a backslash or a control character
                chain, hash_, pre = _unescape(chain), _unescape(hash_), _unescape(pre)
            yield id_, chain, int(seq), hash_, pre  # the id stays text until a message needs it


def _python_rows(conn: Connection) -> Iterator[Row]:
    columns = (AuditEvent.id, AuditEvent.chain, AuditEvent.seq, AuditEvent.occurred_at,
               AuditEvent.action, AuditEvent.user_id, AuditEvent.user_subject,
               AuditEvent.agent_name, AuditEvent.client_id, AuditEvent.actor_type,
               AuditEvent.actor, AuditEvent.delegation_id, AuditEvent.run_id,
               AuditEvent.request_id, AuditEvent.detail, AuditEvent.prev_hash, AuditEvent.hash)
    result = conn.execution_options(yield_per=10_000).execute(
        select(*columns).order_by(AuditEvent.id))
    for (id_, chain, seq, occurred_at, action, user_id, user_subject, agent_name, client_id,
         actor_type, actor, delegation_id, run_id, request_id, detail, prev_hash,
         hash_) in result:
        pre = audit.preimage(
            chain=chain, seq=seq, occurred_at=occurred_at, action=action, user_id=user_id,
            user_subject=user_subject, agent_name=agent_name, client_id=client_id,
            actor_type=actor_type, actor=actor, delegation_id=delegation_id, run_id=run_id,
            request_id=request_id, detail=detail or {}, prev_hash=prev_hash)
        yield id_, chain.encode(), seq, hash_.encode(), pre.encode()


class _Chain:
    """Walk state of one chain: the next seq expected, the hash it must link to."""

    __slots__ = ("early", "head_seq", "last_hash", "last_id", "marks", "next_seq", "start_seq")

    def __init__(self, start_seq: int, start_hash: bytes, head_seq: int,
                 marks: dict[int, tuple[str, int]] | None) -> None:
        self.start_seq = start_seq
        self.next_seq = start_seq + 1
        self.last_hash = start_hash
        self.last_id: int | bytes | None = None
        self.head_seq = head_seq
        self.marks = marks  # seq -> (hash, checkpoint id) that checkpoints signed
        self.early: dict[int, tuple[int | bytes, bytes, bytes]] | None = None


_NO_HEAD = 2**63  # a chain without a head row: reported once at the end, not per event


def _walk(rows: Iterator[Row], heads: dict[str, tuple[int, str]], expect: _Expectations,
          findings: _Findings, report: VerifyReport,
          progress: Callable[[int], None] | None) -> None:
    sha256 = hashlib.sha256
    chains: dict[bytes, _Chain] = {}
    count = 0
    mark = PROGRESS_EVERY if progress is not None else -1

    def add(kind: str, chain: bytes, seq: int, id_: int | bytes | None, message: str) -> None:
        findings.add(kind, chain.decode(), seq, None if id_ is None else int(id_), message)

    def link(state: _Chain, chain: bytes, seq: int, id_: int | bytes, prev: bytes,
             hash_: bytes) -> None:
        if prev != state.last_hash:
            before = (f"seq {seq - 1} (event id {int(state.last_id)})"
                      if state.last_id is not None
                      else "where the chain starts" if seq > 1 else "the chain's genesis")
            add("unlinked", chain, seq, id_,
                f"prev_hash does not match the hash of {before}: that event was altered and "
                "re-hashed, or this one was inserted or moved")
        state.next_seq = seq + 1
        state.last_hash = hash_
        state.last_id = id_

    def new_chain(chain: bytes) -> _Chain:
        name = chain.decode()
        start_seq, start_hash = expect.start.get(name, (0, audit.GENESIS))
        head = heads.get(name)
        state = _Chain(start_seq, start_hash.encode(), head[0] if head else _NO_HEAD,
                       expect.signed.get(name))
        chains[chain] = state
        return state

    def unusual(state: _Chain, chain: bytes, seq: int, id_: int | bytes, pre: bytes,
                hash_: bytes) -> None:
        """Everything but the next event of its chain, linked and within its head."""
        if seq > state.head_seq:
            add("inserted", chain, seq, id_, f"beyond the chain's head (seq {state.head_seq}): "
                "added outside the audit writer")
        if seq == state.next_seq:
            link(state, chain, seq, id_, pre[-64:], hash_)
            early = state.early
            while early and state.next_seq in early:
                e_id, e_prev, e_hash = early.pop(state.next_seq)
                link(state, chain, state.next_seq, e_id, e_prev, e_hash)
            if not early:
                state.early = None  # back on the fast path
        elif seq > state.next_seq:
            if state.early is None:
                state.early = {}
            state.early[seq] = (id_, pre[-64:], hash_)
        else:
            add("inserted", chain, seq, id_,
                "at or before where the chain starts after pruning" if seq <= state.start_seq
                else "a second event at this seq")

    for id_, chain, seq, hash_, pre in rows:
        count += 1
        if count == mark:
            assert progress is not None
            progress(PROGRESS_EVERY)
            mark += PROGRESS_EVERY
        if sha256(pre).hexdigest().encode() != hash_:
            add("altered", chain, seq, id_, "its content does not match its hash (edited in "
                "place)")
        state = chains.get(chain) or new_chain(chain)
        marks = state.marks
        if marks is not None and seq in marks and marks[seq][0].encode() != hash_:
            add("altered", chain, seq, id_, f"its hash differs from the one checkpoint "
                f"#{marks[seq][1]} signed (rewritten after that checkpoint)")
        # The common case, inline: the next event of its chain, linked, within its head.
        if seq == state.next_seq and seq <= state.head_seq and state.early is None \
                and pre[-64:] == state.last_hash:
            state.next_seq = seq + 1
            state.last_hash = hash_
            state.last_id = id_
        else:
            unusual(state, chain, seq, id_, pre, hash_)
    if progress is not None:
        progress(count % PROGRESS_EVERY)
    report.events = count

    # Gaps: events missing in the middle of a chain.
    for chain, state in chains.items():
        while state.early:
            missing_from = state.next_seq
            seq = min(state.early)
            e_id, e_prev, e_hash = state.early.pop(seq)
            last = seq - 1
            span = f"seq {missing_from}" if last == missing_from else \
                f"seqs {missing_from}..{last}"
            add("deleted", chain, missing_from, None,
                f"{span} missing (deleted) before event id {int(e_id)}")
            state.next_seq, state.last_hash, state.last_id = seq + 1, e_hash, e_id
            while state.next_seq in state.early:
                e_id, e_prev, e_hash = state.early.pop(state.next_seq)
                link(state, chain, state.next_seq, e_id, e_prev, e_hash)

    # Tails: chains that end before their head or before what a checkpoint signed.
    names = {c.decode(): s for c, s in chains.items()}
    for name in set(heads) | set(expect.reached) | set(names):
        state_ = names.get(name)
        start_seq = expect.start.get(name, (0, ""))[0]
        last_seq = state_.next_seq - 1 if state_ is not None else start_seq
        head = heads.get(name)
        if head is None:
            if state_ is not None:
                findings.add("head", name, last_seq, _id(state_.last_id),
                             "the chain has no head row (head deleted, or chain inserted)")
        elif head[0] > last_seq:
            findings.add("deleted", name, last_seq + 1, None,
                         f"the chain ends at seq {last_seq} but its head says {head[0]}: "
                         f"seqs {last_seq + 1}..{head[0]} deleted")
        elif head[0] == last_seq and state_ is not None and \
                head[1].encode() != state_.last_hash:
            findings.add("head", name, last_seq, _id(state_.last_id),
                         "the head row's hash differs from the last event's")
        reached = expect.reached.get(name)
        if reached is not None and reached[0] > last_seq:
            findings.add("deleted", name, last_seq + 1, None,
                         f"checkpoint #{reached[1]} signed seq {reached[0]} but the chain "
                         f"ends at seq {last_seq}: events deleted")
    report.chains = len(chains)


def _id(value: int | bytes | None) -> int | None:
    return None if value is None else int(value)


def describe(report: VerifyReport) -> str:
    """One line for people."""
    rate = f"{report.events_per_second:,.0f} events/s" if report.events else "no events"
    cp = report.latest_checkpoint
    latest = f"; latest checkpoint #{cp.id} {cp.created_at.isoformat()} digest {cp.digest}" \
        if cp else ""
    return (f"{report.events} events in {report.chains} chains and {report.checkpoints} "
            f"checkpoints checked in {report.seconds:.2f}s ({rate}){latest}")

