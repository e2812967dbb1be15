"""Run one job run: claim the row, act as the user, record the outcome.

The row is the truth and the broker message only a wake-up: a delivery claims the run with a
compare-and-set (queued, or running with an expired lease) and exits if it cannot, so a
duplicate delivery never runs a job twice. While the job runs, a heartbeat extends the lease
and re-reads the delegation's durable state, cancelling the run within a second of a revoke
even when no push arrives.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import random
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import httpx
import redis.exceptions
from sqlalchemy import CursorResult, or_, select, update
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from delegation import audit, outbox
from delegation.clock import Clock
from delegation.errors import (
    AgentMisconfigured,
    BehalfError,
    DelegationUnusable,
    KmsUnavailable,
    RetryableError,
    RunCancelled,
)
from delegation.store import AgentDirectory
from delegation.token_source import TokenSource
from models import Delegation, DelegationStatus, JobRun, RunStatus, User
from worker.cancel import CancelToken
from worker.context import JobContext
from worker.http import CallRecord, build_client
from worker.jobs import JobRegistry

log = logging.getLogger(__name__)


@dataclass
class RunnerConfig:
    worker_id: str
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 0.5
    grace_seconds: float = 5.0
    retry_base_seconds: float = 2.0
    # What to do with a job that ignores cancellation past the grace period, after its run is
    # recorded as stopped: in a prefork child, exit the process (the pool starts a fresh one);
    # None leaves the stuck thread be (it can make no further API call).
    on_stuck: Callable[[], None] | None = None


class ActiveRuns:
    """The runs this process is executing, by delegation: what a revocation must reach."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_delegation: dict[uuid.UUID, dict[uuid.UUID, CancelToken]] = {}

    def add(self, delegation_id: uuid.UUID, run_id: uuid.UUID, token: CancelToken) -> None:
        with self._lock:
            self._by_delegation.setdefault(delegation_id, {})[run_id] = token

    def remove(self, delegation_id: uuid.UUID, run_id: uuid.UUID) -> None:
        with self._lock:
            runs = self._by_delegation.get(delegation_id, {})
            runs.pop(run_id, None)
            if not runs:
                self._by_delegation.pop(delegation_id, None)

    def cancel_delegation(self, delegation_id: uuid.UUID, reason: str) -> int:
        with self._lock:
            tokens = list(self._by_delegation.get(delegation_id, {}).values())
        for token in tokens:
            token.cancel(reason)
        return len(tokens)

    def delegations(self) -> list[uuid.UUID]:
        with self._lock:
            return list(self._by_delegation)


@dataclass(frozen=True)
class Claimed:
    run_id: uuid.UUID
    job: str
    user_id: uuid.UUID
    user_subject: str
    agent_id: uuid.UUID
    delegation_id: uuid.UUID | None
    attempts: int
    max_attempts: int


def _retry_reason(exc: RetryableError) -> str:
    return "kms_unavailable" if isinstance(exc, KmsUnavailable) else "provider_unavailable"


def _transient(exc: BaseException) -> bool:
    """A lost database or Redis connection: the run is retried, not failed."""
    if isinstance(exc, OperationalError | redis.exceptions.ConnectionError
                  | redis.exceptions.TimeoutError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def _rowcount(result: Any) -> int:
    return int(cast(CursorResult[Any], result).rowcount)


class Runner:
    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        tokens: TokenSource,
        agents: AgentDirectory,
        jobs: JobRegistry,
        clock: Clock,
        config: RunnerConfig,
        active: ActiveRuns | None = None,
        transport: httpx.BaseTransport | None = None,
        rng: random.Random | None = None,
        on_finished: Callable[[uuid.UUID, str], None] | None = None,
        before_request: Callable[[uuid.UUID, uuid.UUID | None], object] | None = None,
    ) -> None:
        self._sessions = sessions
        self._tokens = tokens
        self._agents = agents
        self._jobs = jobs
        self._clock = clock
        self._config = config
        self.active = active or ActiveRuns()
        self._transport = transport
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrecy
        self._on_finished = on_finished
        self._audit = audit.AuditWriter(sessions, clock)
        self._before_request = before_request  # rate budget per (agent, provider)

    # --- the whole life of one delivery ---------------------------------------------------

    def run(self, run_id: uuid.UUID) -> str | None:
        """Execute run `run_id` if this delivery can claim it; returns the final status."""
        claimed = self._claim(run_id)
        if claimed is None:
            log.info("run %s not claimable (duplicate delivery or not due); skipping", run_id)
            return None
        try:
            status = self._execute(claimed)
        except RetryableError as exc:  # e.g. KMS down while opening the agent's credentials
            status = self._retry_or_fail(claimed, _retry_reason(exc), str(exc), exc.retry_after)
        except Exception as exc:  # the runner itself failed: never leave the row running
            if _transient(exc):  # the database or Redis blipped: try again later
                # (if the database is still gone this raises: the lease expires and the
                # scheduler re-queues the run)
                status = self._retry_or_fail(claimed, "infrastructure_unavailable",
                                             type(exc).__name__, None)
            else:
                log.exception("runner error on run %s", run_id)
                status = self._finish(claimed, RunStatus.FAILED, "runner_error",
                                      traceback.format_exc(limit=3)[-500:])
        if self._on_finished is not None:
            self._on_finished(run_id, status)
        return status

    def _claim(self, run_id: uuid.UUID) -> Claimed | None:
        now = self._clock.now()
        lease_until = now + dt.timedelta(seconds=self._config.lease_seconds)
        with self._sessions.begin() as session:
            result = session.execute(
                update(JobRun)
                .where(
                    JobRun.id == run_id,
                    or_(
                        (JobRun.status == RunStatus.QUEUED.value)
                        & or_(JobRun.not_before.is_(None), JobRun.not_before <= now),
                        (JobRun.status == RunStatus.RUNNING.value)
                        & (JobRun.lease_expires_at < now),
                    ),
                    JobRun.attempts < JobRun.max_attempts,
                )
                .values(status=RunStatus.RUNNING.value, attempts=JobRun.attempts + 1,
                        lease_owner=self._config.worker_id, lease_expires_at=lease_until,
                        started_at=now, updated_at=now)
                .execution_options(synchronize_session=False)
            )
            if _rowcount(result) != 1:
                self._fail_exhausted(session, run_id, now)
                return None
            run = session.get(JobRun, run_id)
            assert run is not None
            user = session.get(User, run.user_id)
            delegation_id = run.delegation_id
            if delegation_id is None:
                delegation_id = session.scalar(
                    select(Delegation.id).where(Delegation.user_id == run.user_id,
                                                Delegation.agent_id == run.agent_id)
                )
                run.delegation_id = delegation_id
            return Claimed(run.id, run.job, run.user_id, user.subject if user else "?",
                           run.agent_id, delegation_id, run.attempts, run.max_attempts)

    def _fail_exhausted(self, session: Session, run_id: uuid.UUID, now: dt.datetime) -> None:
        """A run whose worker died on every attempt ends `failed`, not looping."""
        session.execute(
            update(JobRun)
            .where(JobRun.id == run_id, JobRun.attempts >= JobRun.max_attempts,
                   or_(JobRun.status == RunStatus.QUEUED.value,
                       (JobRun.status == RunStatus.RUNNING.value)
                       & (JobRun.lease_expires_at < now)))
            .values(status=RunStatus.FAILED.value, reason="attempts_exhausted",
                    detail="the run's worker was lost on every attempt", finished_at=now,
                    lease_owner=None, lease_expires_at=None, updated_at=now)
            .execution_options(synchronize_session=False)
        )

    def _execute(self, claimed: Claimed) -> str:
        spec = self._jobs.get(claimed.job)
        if spec is None:
            return self._finish(claimed, RunStatus.FAILED, "unknown_job",
                                f"no job named {claimed.job!r} is loaded in this worker")
        if claimed.delegation_id is None:
            return self._finish(claimed, RunStatus.FAILED, "no_delegation",
                                "the user has not connected this agent")
        with self._sessions() as session:
            delegation = session.get(Delegation, claimed.delegation_id)
            assert delegation is not None
            status, granted = delegation.status, set(delegation.granted_scopes or ())
        if status == DelegationStatus.REVOKED:
            return self._finish(claimed, RunStatus.CANCELLED, "delegation_revoked", None)
        if status == DelegationStatus.BROKEN:
            return self._finish(claimed, RunStatus.PARKED, "delegation_broken", None)
        missing = sorted(spec.scopes - granted)
        if missing:
            return self._finish(claimed, RunStatus.PARKED, "missing_scope",
                                f"the delegation lacks {' '.join(missing)}")
        identity = self._agents.get(claimed.agent_id)
        if not identity.api_base:
            return self._finish(claimed, RunStatus.FAILED, "agent_misconfigured",
                                "the provider has no API base URL")
        # The checks above run before the heartbeat and may have waited (KMS retrying): if the
        # lease ran out meanwhile and another worker took the run, its body must not run here.
        with self._sessions.begin() as session:
            if not self._renew_lease(session, claimed, self._clock.now()):
                log.info("run %s was taken over while this worker prepared it", claimed.run_id)
                return self._current_status(claimed.run_id)

        cancel = CancelToken()
        delegation_id = claimed.delegation_id
        self.active.add(delegation_id, claimed.run_id, cancel)
        stop_heartbeat = threading.Event()
        heartbeat = threading.Thread(
            target=self._heartbeat, args=(claimed, delegation_id, cancel, stop_heartbeat),
            name=f"heartbeat-{claimed.run_id}", daemon=True,
        )

        def record(call: CallRecord) -> None:
            self._record_call(claimed, identity.name, identity.client_id, call)

        gate = None
        if self._before_request is not None:
            gate = functools.partial(self._before_request, identity.id, identity.provider_id)
        http = build_client(tokens=self._tokens, delegation_id=delegation_id,
                            api_base=identity.api_base, cancel=cancel, record=record,
                            transport=self._transport, before_request=gate)
        ctx = JobContext(
            run_id=claimed.run_id, job=claimed.job, user_subject=claimed.user_subject,
            agent=identity.name, client_id=identity.client_id, delegation_id=delegation_id,
            scopes=frozenset(granted), http=http,
            log=logging.getLogger(f"behalf.job.{claimed.job}"), _cancel=cancel,
        )
        heartbeat.start()
        try:
            spec.function(ctx)
            cancel.raise_if_cancelled()
        except RunCancelled as exc:
            return self._finish_cancelled(claimed, exc.reason)
        except DelegationUnusable as exc:
            if cancel.cancelled:
                return self._finish_cancelled(claimed, cancel.reason or exc.reason)
            if exc.reason == "delegation_broken":
                return self._finish(claimed, RunStatus.PARKED, "delegation_broken", str(exc))
            return self._finish(claimed, RunStatus.CANCELLED, exc.reason, str(exc))
        except httpx.HTTPError as exc:
            if cancel.cancelled:
                return self._finish_cancelled(claimed, cancel.reason or "cancelled")
            return self._retry_or_fail(claimed, "api_unreachable", type(exc).__name__, None)
        except RetryableError as exc:
            return self._retry_or_fail(claimed, _retry_reason(exc), str(exc), exc.retry_after)
        except AgentMisconfigured as exc:
            return self._finish(claimed, RunStatus.FAILED, "agent_misconfigured", str(exc))
        except BehalfError as exc:
            return self._finish(claimed, RunStatus.FAILED, type(exc).__name__, str(exc))
        except Exception as exc:
            if cancel.cancelled:
                return self._finish_cancelled(claimed, cancel.reason or "cancelled")
            if _transient(exc):  # from ctx.http's own bookkeeping (audit, lease, store)
                return self._retry_or_fail(claimed, "infrastructure_unavailable",
                                           type(exc).__name__, None)
            return self._finish(claimed, RunStatus.FAILED, "job_error",
                                f"{type(exc).__name__}: {str(exc)[:300]}")
        finally:
            stop_heartbeat.set()
            self.active.remove(delegation_id, claimed.run_id)
            http.close()
            self._audit.flush()
            self._touch(delegation_id)
        return self._finish(claimed, RunStatus.SUCCEEDED, None, None)

    def _finish_cancelled(self, claimed: Claimed, reason: str) -> str:
        if reason == "delegation_broken":
            return self._finish(claimed, RunStatus.PARKED, reason, None)
        return self._finish(claimed, RunStatus.CANCELLED, reason, None)

    # --- bookkeeping ------------------------------------------------------------------------

    def _heartbeat(self, claimed: Claimed, delegation_id: uuid.UUID, cancel: CancelToken,
                   stop: threading.Event) -> None:
        """Extend the lease; cancel at once if the delegation stops being active."""
        while not stop.wait(self._config.heartbeat_seconds):
            try:
                now = self._clock.now()
                with self._sessions.begin() as session:
                    status = session.scalar(
                        select(Delegation.status).where(Delegation.id == delegation_id)
                    )
                    kept = self._renew_lease(session, claimed, now)
            except Exception:  # a database blip must not kill the job; try again next beat
                log.warning("heartbeat for run %s failed", claimed.run_id, exc_info=True)
                continue
            if status == DelegationStatus.REVOKED:
                cancel.cancel("delegation_revoked")
            elif status == DelegationStatus.BROKEN:
                cancel.cancel("delegation_broken")
            elif kept == 0:
                cancel.cancel("run_taken_away")
            if cancel.cancelled_at is not None and \
                    time.monotonic() - cancel.cancelled_at > self._config.grace_seconds:
                self._stop_hard(claimed, cancel)
                return

    def _renew_lease(self, session: Session, claimed: Claimed, now: dt.datetime) -> int:
        """Extend this worker's lease on the run; 0 when the run is no longer ours."""
        return _rowcount(session.execute(
            update(JobRun)
            .where(JobRun.id == claimed.run_id, JobRun.lease_owner == self._config.worker_id,
                   JobRun.status == RunStatus.RUNNING.value)
            .values(lease_expires_at=now + dt.timedelta(seconds=self._config.lease_seconds))
            .execution_options(synchronize_session=False)
        ))

    def _stop_hard(self, claimed: Claimed, cancel: CancelToken) -> None:
        """The job ignored cancellation for the whole grace period: record the run as stopped,
        then (in a worker process) end the process so the stuck code goes with it."""
        reason = cancel.reason or "cancelled"
        detail = (f"stopped hard: the job ignored cancellation for "
                  f"{self._config.grace_seconds:.0f} s")
        status = RunStatus.PARKED if reason == "delegation_broken" else RunStatus.CANCELLED
        log.warning("run %s (%s) %s", claimed.run_id, claimed.job, detail)
        self._finish(claimed, status, reason, detail)
        self._audit.flush()
        if self._config.on_stuck is not None:
            self._config.on_stuck()

    def _record_call(self, claimed: Claimed, agent_name: str, client_id: str,
                     call: CallRecord) -> None:
        action = {"attempted": "api:call:attempted", "completed": "api:call",
                  "failed": "api:call:failed", "refused": "api:call:refused"}[call.outcome]
        detail: dict[str, Any] = {"method": call.method, "path": call.path,
                                  "call_id": str(call.call_id)}
        if call.status is not None:
            detail["status"] = call.status
        record = audit.AuditRecord(
            action=action, actor_type="agent", actor=agent_name,
            user_id=claimed.user_id, user_subject=claimed.user_subject,
            agent_name=agent_name, client_id=client_id,
            delegation_id=claimed.delegation_id, run_id=claimed.run_id,
            request_id=str(call.call_id), detail=detail,
        )
        if call.outcome == "attempted":
            # durable (with anything buffered) before the request leaves the worker
            self._audit.write_now(record)
        else:
            self._audit.write_later(record)  # batched: flushed with the next write, or soon

    def _touch(self, delegation_id: uuid.UUID) -> None:
        """Record "last used" once per run (not per call: no contention with a revoke)."""
        with self._sessions.begin() as session:
            session.execute(
                update(Delegation).where(Delegation.id == delegation_id)
                .values(last_used_at=self._clock.now())
                .execution_options(synchronize_session=False)
            )

    def _retry_or_fail(self, claimed: Claimed, reason: str, detail: str,
                       retry_after: float | None) -> str:
        if claimed.attempts >= claimed.max_attempts:
            return self._finish(claimed, RunStatus.FAILED, reason, detail)
        delay = max(retry_after or 0.0, outbox.backoff(
            claimed.attempts, self._rng, base=self._config.retry_base_seconds))
        now = self._clock.now()
        when = now + dt.timedelta(seconds=delay)
        with self._sessions.begin() as session:
            moved = _rowcount(session.execute(
                update(JobRun)
                .where(JobRun.id == claimed.run_id, JobRun.lease_owner == self._config.worker_id,
                       JobRun.status == RunStatus.RUNNING.value)
                .values(status=RunStatus.QUEUED.value, reason=reason, detail=detail[:500],
                        not_before=when, lease_owner=None, lease_expires_at=None,
                        updated_at=now)
                .execution_options(synchronize_session=False)
            ))
            if moved:
                outbox.dispatch_run(session, claimed.run_id, now, available_at=when)
        return RunStatus.QUEUED.value if moved else self._current_status(claimed.run_id)

    def _finish(self, claimed: Claimed, status: RunStatus, reason: str | None,
                detail: str | None) -> str:
        """End the run if this worker still owns it; a run parked or cancelled meanwhile by
        someone else keeps that state."""
        now = self._clock.now()
        with self._sessions.begin() as session:
            done = _rowcount(session.execute(
                update(JobRun)
                .where(JobRun.id == claimed.run_id, JobRun.lease_owner == self._config.worker_id,
                       JobRun.status == RunStatus.RUNNING.value)
                .values(status=status.value, reason=reason,
                        detail=detail[:1000] if detail else None, finished_at=now,
                        lease_owner=None, lease_expires_at=None, updated_at=now)
                .execution_options(synchronize_session=False)
            ))
            if done and status in (RunStatus.PARKED, RunStatus.CANCELLED):
                audit.append(session, audit.AuditRecord(
                    action=f"run:{status.value}", actor_type="system", actor="worker",
                    user_id=claimed.user_id, user_subject=claimed.user_subject,
                    delegation_id=claimed.delegation_id, run_id=claimed.run_id,
                    detail={"reason": reason, "job": claimed.job},
                ), now)
        if not done:
            return self._current_status(claimed.run_id)
        log.info("run %s (%s) %s%s", claimed.run_id, claimed.job, status.value,
                 f" ({reason})" if reason else "")
        return status.value

    def _current_status(self, run_id: uuid.UUID) -> str:
        with self._sessions() as session:
            return session.scalar(select(JobRun.status).where(JobRun.id == run_id)) or "missing"
