"""The audit trail: one event model, appended to per-user hash chains.

"User X, via agent Z (client_id), did Y": every event names the user (the AS `sub`), the agent
(name and client_id), the actor when it is not the agent (the user, an operator by name, the
system, the provider), the action (`subject:object:action`), the delegation, run and request
ids, and a timestamp. Nothing secret goes in: callers pass ids, names, a method and a path
template, never a token, code, secret, query string or body; `clean_detail` also redacts
values under secret-sounding keys and cuts a query string off a `path`, as a second line.

Chains: one per user (`str(user_id)`), plus `system` for events that concern no user. Each
event carries the hash of the previous event of its chain; a head row per chain (`audit_heads`)
is locked while appending, so writers for *different* users never contend and writers for the
same user serialise on one small row.

The hash (`HASH_VERSION` v1) is SHA-256 over a fixed-order serialisation of the event
(`preimage`): the fields joined by U+001F, NULL written as U+0001. It is injective because no
field can hold either character: text columns have their control characters replaced on the
way in (`clean_text`), and `detail` is JSON, whose strings escape them. Timestamps are epoch
microseconds; `detail` is rendered exactly as PostgreSQL renders the stored `jsonb`
(`render_json`: keys ordered by byte length then bytes, `", "` and `": "` separators). So the
verifier can have PostgreSQL build the very same text (`audit_verify.PG_PREIMAGE`) and only
hash in Python, without parsing a single JSON document.

Writers:
- `append(session, record, now)` inside the caller's transaction (the common case);
- `append_many(session, [(record, now), ...])` several events in one transaction, one lock
  and one head update per chain;
- `AuditWriter`, for the job runtime: `write_now` commits (with everything buffered before it)
  before returning — for `api:call:attempted`, which must be durable before a request leaves;
  `write_later` buffers completions, flushed with the next `write_now`, by `flush()`, or at most
  `max_delay` seconds later by a background thread.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Select,
    Table,
    bindparam,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

from delegation.clock import Clock
from models import AuditEvent, AuditHead

log = logging.getLogger(__name__)

GENESIS = "0" * 64
SYSTEM_CHAIN = "system"
HASH_VERSION = "v1"
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICROSECOND = dt.timedelta(microseconds=1)

# Keys whose values are never kept in `detail`, whatever a caller passes (defence in depth).
_SECRET_KEY = re.compile(
    r"(^|_)(token|secret|password|passwd|code|authorization|cookie|assertion|verifier|"
    r"credential|credentials|private_key|api_key|apikey|body|query)$",
    re.IGNORECASE,
)
REDACTED = "[redacted]"
_PLAIN_FLOAT = re.compile(r"^-?\d+\.\d+$")


@dataclass(frozen=True)
class AuditRecord:
    """"user X, via agent Z (client_id), did Y" — plus who acted when it was not the agent."""

    action: str
    actor_type: str = "agent"  # agent | user | operator | system | provider
    actor: str | None = None
    user_id: uuid.UUID | None = None
    user_subject: str | None = None
    agent_name: str | None = None
    client_id: str | None = None
    delegation_id: uuid.UUID | None = None
    run_id: uuid.UUID | None = None
    request_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def chain(self) -> str:
        return chain_of(self.user_id)


def chain_of(user_id: uuid.UUID | None) -> str:
    """The chain a user's events go to (`system` for events about no user)."""
    return str(user_id) if user_id else SYSTEM_CHAIN


# --- canonical form ----------------------------------------------------------------------------


def clean_detail(detail: Mapping[str, Any]) -> dict[str, Any]:
    """`detail` reduced to what the trail may hold and PostgreSQL stores unchanged.

    Values under secret-sounding keys are redacted; a `path` loses any query string; strings
    lose NUL characters (`jsonb` refuses them) and unencodable surrogates; floats that
    `jsonb` would print differently (exponents, -0.0, inf, nan) become strings; anything that
    is not JSON becomes its `str`.
    """
    return {_clean_str(str(k)): _clean_value(str(k), v) for k, v in detail.items()}


def _clean_value(key: str, value: Any) -> Any:
    if _SECRET_KEY.search(key) and not (value is None or isinstance(value, bool | int)):
        return REDACTED  # numbers (`status_code`) and flags hold no secret
    if key == "path" and isinstance(value, str):
        value = value.split("?", 1)[0].split("#", 1)[0]
    return _clean_json(value)


def _clean_json(value: Any) -> Any:
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        return _clean_str(value)
    if isinstance(value, float):
        text = repr(value)
        if math.isfinite(value) and _PLAIN_FLOAT.match(text) and text != "-0.0":
            return value
        return text
    if isinstance(value, Mapping):
        return {_clean_str(str(k)): _clean_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return [_clean_json(v) for v in items]
    return _clean_str(str(value))


def _clean_str(value: str) -> str:
    if "\x00" in value:
        value = value.replace("\x00", "")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def _jsonb_key(key: str) -> tuple[int, bytes]:
    raw = key.encode("utf-8")
    return len(raw), raw


def render_json(value: Any) -> str:
    """`value` as PostgreSQL prints it back from a `jsonb` column (for cleaned values)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Mapping):
        keys = sorted(value, key=_jsonb_key)
        return "{" + ", ".join(
            f"{json.dumps(k, ensure_ascii=False)}: {render_json(value[k])}" for k in keys
        ) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(render_json(v) for v in value) + "]"
    raise TypeError(f"not a cleaned JSON value: {type(value).__name__}")


def micros(moment: dt.datetime) -> int:
    """Epoch microseconds of an aware datetime (exact, no float)."""
    return (moment - EPOCH) // _MICROSECOND


SEPARATOR = "\x1f"
NULL = "\x01"
_CONTROL = re.compile(r"[\x00-\x1f]")


def clean_text(value: str | None) -> str | None:
    """A text column's value with control characters (which the serialisation uses as
    separators, and which no name or id needs) replaced by U+FFFD."""
    if value is None:
        return None
    if _CONTROL.search(value):
        value = _CONTROL.sub("\ufffd", value)
    return value if value.isascii() else _clean_str(value)


def _opt(value: object | None) -> str:
    return NULL if value is None else str(value)


def preimage(
    *,
    chain: str,
    seq: int,
    occurred_at: dt.datetime,
    action: str,
    user_id: uuid.UUID | None,
    user_subject: str | None,
    agent_name: str | None,
    client_id: str | None,
    actor_type: str,
    actor: str | None,
    delegation_id: uuid.UUID | None,
    run_id: uuid.UUID | None,
    request_id: str | None,
    detail: Mapping[str, Any],
    prev_hash: str,
) -> str:
    """The text an event's hash covers (every field but the hash, in a fixed order)."""
    return SEPARATOR.join((
        HASH_VERSION, chain, str(seq), str(micros(occurred_at)), action, _opt(user_id),
        _opt(user_subject), _opt(agent_name), _opt(client_id), actor_type, _opt(actor),
        _opt(delegation_id), _opt(run_id), _opt(request_id), render_json(detail), prev_hash,
    ))


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def event_hash(event: AuditEvent) -> str:
    """The hash of a stored event: SHA-256 of its `preimage` (every field but the hash)."""
    return digest(preimage(
        chain=event.chain, seq=event.seq, occurred_at=event.occurred_at, action=event.action,
        user_id=event.user_id, user_subject=event.user_subject, agent_name=event.agent_name,
        client_id=event.client_id, actor_type=event.actor_type, actor=event.actor,
        delegation_id=event.delegation_id, run_id=event.run_id, request_id=event.request_id,
        detail=event.detail or {}, prev_hash=event.prev_hash,
    ))


def _row(record: AuditRecord, seq: int, now: dt.datetime, prev_hash: str) -> dict[str, Any]:
    """The column values of the event `record` becomes at `seq`, hash included."""
    if now.tzinfo is None:
        raise ValueError("audit timestamps must be aware (UTC)")
    now = now.astimezone(dt.UTC)
    detail = clean_detail(record.detail)
    values: dict[str, Any] = {
        "chain": record.chain, "seq": seq, "occurred_at": now,
        "action": clean_text(record.action), "user_id": record.user_id,
        "user_subject": clean_text(record.user_subject),
        "agent_name": clean_text(record.agent_name), "client_id": clean_text(record.client_id),
        "actor_type": clean_text(record.actor_type), "actor": clean_text(record.actor),
        "delegation_id": record.delegation_id, "run_id": record.run_id,
        "request_id": clean_text(record.request_id), "detail": detail, "prev_hash": prev_hash,
    }
    values["hash"] = digest(preimage(**values))
    return values


# --- writing -----------------------------------------------------------------------------------


_EVENTS = cast(Table, AuditEvent.__table__)
_HEADS = cast(Table, AuditHead.__table__)
_LOCK_ONE = select(_HEADS.c.seq, _HEADS.c.hash).where(
    _HEADS.c.chain == bindparam("chain")).with_for_update()
_LOCK_MANY = select(_HEADS.c.chain, _HEADS.c.seq, _HEADS.c.hash).where(
    _HEADS.c.chain.in_(bindparam("chains", expanding=True))
).order_by(_HEADS.c.chain).with_for_update()
_ASYNC_COMMIT = text("SET LOCAL synchronous_commit = off")
_MOVE_HEAD = update(_HEADS).where(_HEADS.c.chain == bindparam("c")).values(
    seq=bindparam("s"), hash=bindparam("h"))


def _lock_heads(conn: Connection, chains: Sequence[str]) -> dict[str, tuple[int, str]]:
    """Lock the head rows of `chains` (sorted: batches never deadlock), creating missing
    ones; returns {chain: (seq, hash)}."""
    def locked() -> dict[str, tuple[int, str]]:
        if len(chains) == 1:
            row = conn.execute(_LOCK_ONE, {"chain": chains[0]}).first()
            return {chains[0]: (row[0], row[1])} if row is not None else {}
        return {c: (seq, h) for c, seq, h in conn.execute(_LOCK_MANY, {"chains": chains})}

    heads = locked()
    missing = [c for c in chains if c not in heads]
    if missing:
        stmt = (pg_insert if conn.dialect.name == "postgresql" else sqlite_insert)(_HEADS)
        conn.execute(
            stmt.on_conflict_do_nothing(index_elements=["chain"]),
            [{"chain": c, "seq": 0, "hash": GENESIS, "checkpointed_seq": 0} for c in missing],
        )
        heads = locked()
    return heads


def _write(conn: Connection, records: Sequence[tuple[AuditRecord, dt.datetime]], *,
           returning: bool = False) -> list[dict[str, Any]]:
    """Append `records` in order inside `conn`'s transaction: one lock, one INSERT and one
    head update per chain (Core statements: this is the runtime's hot path)."""
    chains = sorted({record.chain for record, _ in records})
    heads = _lock_heads(conn, chains)
    rows = []
    for record, now in records:
        seq, prev = heads[record.chain]
        values = _row(record, seq + 1, now, prev)
        heads[record.chain] = (values["seq"], values["hash"])
        rows.append(values)
    if returning:
        for values in rows:
            values["id"] = conn.execute(insert(_EVENTS).returning(_EVENTS.c.id),
                                        values).scalar_one()
    else:
        conn.execute(insert(_EVENTS), rows)
    conn.execute(_MOVE_HEAD, [{"c": c, "s": heads[c][0], "h": heads[c][1]} for c in chains])
    return rows


def append(session: Session, record: AuditRecord, now: dt.datetime) -> AuditEvent:
    """Append `record` to its chain inside the caller's transaction (written at once, not at
    flush); returns the event as written, id included."""
    [values] = _write(session.connection(), [(record, now)], returning=True)
    return AuditEvent(**values)


def append_many(session: Session, records: Sequence[tuple[AuditRecord, dt.datetime]]) -> int:
    """Append several events inside the caller's transaction, in the order given.

    One lock, one multi-row INSERT and one head update per chain: the cheap way to write a
    batch. Returns how many events were written.
    """
    if not records:
        return 0
    return len(_write(session.connection(), records))


class AuditWriter:
    """The job runtime's audit writer: durable where it must be, batched where it is safe.

    `write_now(record)` returns only once `record` — and every record buffered before it, in
    the same transaction and in order — is committed: use it for `api:call:attempted`, so a
    worker killed right after sending still leaves the call in the trail. `write_later(record)`
    buffers (completions: `api:call`, `api:call:failed`, `api:call:refused`); the buffer is
    written with the next `write_now`, by `flush()`, or by a background thread at most
    `max_delay` seconds later. A completion lost to a crash leaves its `attempted` record, which
    says the call may have reached the API. Thread-safe; one per process is enough.

    `synchronous_commit=False` (PostgreSQL) commits without waiting for the WAL flush: a
    killed *worker* still loses nothing (the commit happened), but a *database* crash may lose
    the last few hundred milliseconds of events. The default waits (one fsync per call).
    """

    def __init__(self, sessions: sessionmaker[Session], clock: Clock, *,
                 max_delay: float = 0.25, max_pending: int = 500,
                 synchronous_commit: bool = True) -> None:
        self._sessions = sessions
        self._clock = clock
        self._synchronous_commit = synchronous_commit
        self._max_delay = max_delay
        self._max_pending = max_pending
        self._pending: list[tuple[AuditRecord, dt.datetime]] = []
        self._buffer_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._wake = threading.Condition(self._buffer_lock)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._since = 0.0  # when the oldest buffered record was buffered (monotonic)

    def write_now(self, record: AuditRecord) -> None:
        """Commit everything buffered, then `record`, in one transaction, before returning."""
        self._write([(record, self._clock.now())])

    def write_later(self, record: AuditRecord) -> None:
        """Buffer `record` (stamped now); it is committed within `max_delay` seconds."""
        with self._buffer_lock:
            if not self._pending:
                self._since = time.monotonic()
            self._pending.append((record, self._clock.now()))
            full = len(self._pending) >= self._max_pending
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="audit-writer",
                                                daemon=True)
                self._thread.start()
        if full:
            self.flush()

    def flush(self) -> None:
        """Commit everything buffered so far."""
        self._write([])

    def close(self) -> None:
        """Flush and stop the background thread."""
        with self._buffer_lock:
            self._closed = True
            self._wake.notify()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=5)
        self.flush()

    @property
    def pending(self) -> int:
        with self._buffer_lock:
            return len(self._pending)

    def _write(self, extra: list[tuple[AuditRecord, dt.datetime]]) -> None:
        with self._write_lock:
            with self._buffer_lock:
                batch, self._pending = self._pending, []
            if not batch and not extra:
                return
            try:
                with self._sessions.begin() as session:
                    conn = session.connection()
                    if not self._synchronous_commit and conn.dialect.name == "postgresql":
                        conn.execute(_ASYNC_COMMIT)
                    _write(conn, batch + extra)
            except BaseException:
                with self._buffer_lock:  # keep them, in order, for the next attempt
                    if batch and not self._pending:
                        self._since = time.monotonic()
                    self._pending[:0] = batch
                raise

    def _run(self) -> None:
        # Polls instead of being notified: a buffered record costs its caller no wake-up.
        while True:
            with self._buffer_lock:
                if not self._closed:
                    self._wake.wait(self._max_delay / 2)  # only close() notifies
                if self._closed:
                    return
                due = bool(self._pending) and \
                    time.monotonic() - self._since >= self._max_delay
            if due:
                try:
                    self.flush()
                except Exception:  # the database blinked: the records are kept; retry
                    log.warning("audit flush failed; retrying", exc_info=True)


Recorder = Callable[[AuditRecord], None]


# --- reading -----------------------------------------------------------------------------------

_SUMMARY_KEYS = ("method", "path", "status", "job", "reason", "scopes_granted", "version")


def summarize(detail: Mapping[str, Any] | None) -> str:
    """A short "key=value, ..." line of the detail fields people look for first."""
    parts = []
    for key in _SUMMARY_KEYS:
        value = (detail or {}).get(key)
        if value is None or value == "":
            continue
        shown = " ".join(map(str, value)) if isinstance(value, list) else str(value)
        parts.append(f"{key}={shown}"[:80])
    return ", ".join(parts)


def as_dict(event: AuditEvent) -> dict[str, Any]:
    """An event for people and exports: everything it holds, ids as text, time in ISO 8601."""
    return {
        "id": event.id, "chain": event.chain, "seq": event.seq,
        "occurred_at": event.occurred_at.astimezone(dt.UTC).isoformat(),
        "action": event.action, "user_id": _text(event.user_id), "user": event.user_subject,
        "agent": event.agent_name, "client_id": event.client_id,
        "actor_type": event.actor_type, "actor": event.actor,
        "delegation_id": _text(event.delegation_id), "run_id": _text(event.run_id),
        "request_id": event.request_id, "detail": dict(event.detail or {}),
        "prev_hash": event.prev_hash, "hash": event.hash,
    }


def _text(value: uuid.UUID | None) -> str | None:
    return str(value) if value is not None else None


def filtered(query: Select[tuple[AuditEvent]], *, chains: Sequence[str] | None = None,
             agent: str | None = None, since: dt.datetime | None = None,
             until: dt.datetime | None = None) -> Select[tuple[AuditEvent]]:
    """`query` (a select of events) narrowed to some users' chains, an agent (name or
    client_id), and a time window [since, until)."""
    if chains is not None:
        query = query.where(AuditEvent.chain.in_(list(chains)))
    if agent:
        query = query.where(or_(AuditEvent.agent_name == agent, AuditEvent.client_id == agent))
    if since is not None:
        query = query.where(AuditEvent.occurred_at >= since)
    if until is not None:
        query = query.where(AuditEvent.occurred_at < until)
    return query
