"""The refresh sweep: refresh delegations before they are needed, and before they go idle.

Two kinds of delegation are refreshed, through the same `TokenSource` as jobs (fleet-wide
single-flight, rotated pair stored first, `invalid_grant` alone breaks):

* **needed soon** (reason `expiring`): an active delegation with a schedule due within
  `lookahead` whose access token would need a refresh by then (it expires before the run plus
  `margin`). Refreshing these ahead of the run spreads the refreshes of a nightly batch over
  the lookahead instead of letting a million jobs refresh at 02:00. Delegations nobody is
  about to use are left alone: keeping every access token fresh around the clock would itself
  be a refresh storm.
* **idle** (reason `idle`): an active delegation whose refresh token has not been used
  (`refreshed_at`, else `granted_at`) for `idle_after`, since providers revoke idle refresh
  tokens.

A delegation whose refresh failed (the AS was unavailable, its tokens cannot be opened...)
is left out of the sweep for a while (`retry_after` / `failure_backoff`, a Redis key with a
TTL), so the oldest candidates cannot hold the front of the queue forever.

Storms are prevented three ways: jitter (a needed-soon delegation is refreshed at a random
point in the second half of the lookahead, an idle one between 90 % and 100 % of
`idle_after`), a per-provider cap per pass, and a per-provider rate budget in Redis (key
`behalf:budget:provider:sweep:<provider id>`) shared by every scheduler; what does not fit
waits for the next pass. Only one scheduler sweeps at a time (a Redis lease); a pass stops
after `max_seconds` so its lease never runs out under it.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from delegation import metrics
from delegation.budget import BudgetExhausted, RateBudget, budget_key
from delegation.clock import Clock
from delegation.errors import BehalfError, DelegationUnusable, RetryableError
from delegation.lease import Lease
from delegation.ratelimit import Limits
from delegation.token_source import TokenSource
from models import Agent, Delegation, DelegationStatus, Schedule

log = logging.getLogger(__name__)

LEASE_KEY = "behalf:refresh-sweep"


def _backoff_key(delegation_id: uuid.UUID) -> str:
    return f"behalf:refresh-sweep:backoff:{delegation_id}"


@dataclass(frozen=True)
class SweepConfig:
    lookahead: dt.timedelta = dt.timedelta(minutes=15)
    margin: dt.timedelta = dt.timedelta(minutes=2)
    idle_after: dt.timedelta = dt.timedelta(days=1)
    per_provider: int = 100
    provider_rate: float = 2.0
    max_wait: float = 2.0
    batch: int = 2000
    max_seconds: float = 30.0
    retry_after: dt.timedelta = dt.timedelta(minutes=5)
    failure_backoff: dt.timedelta = dt.timedelta(hours=1)


@dataclass(frozen=True)
class Candidate:
    delegation_id: uuid.UUID
    version: int
    provider_id: uuid.UUID
    reason: str  # expiring | idle
    due_in: dt.timedelta  # how long until the refresh is really needed (for jitter)
    span: dt.timedelta  # the jitter span that applies to it


@dataclass
class SweepResult:
    ran: bool = True
    outcomes: Counter[str] = field(default_factory=Counter)

    def add(self, reason: str, outcome: str) -> None:
        self.outcomes[outcome] += 1
        metrics.REFRESH_SWEEP.labels(reason, outcome).inc()


class RefreshSweep:
    def __init__(self, *, sessions: sessionmaker[Session], tokens: TokenSource,
                 budget: RateBudget, redis: Any, clock: Clock,
                 config: SweepConfig | None = None, rng: random.Random | None = None,
                 jitter: bool = True) -> None:
        self._sessions = sessions
        self._tokens = tokens
        self._budget = budget
        self._redis = redis
        self._clock = clock
        self._config = config or SweepConfig()
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrecy
        self._jitter = jitter

    def run_once(self, stopping: Callable[[], bool] = lambda: False) -> SweepResult:
        """One pass; does nothing (ran=False) while another scheduler holds the sweep.
        `stopping()` is asked before each refresh: the pass ends early when it says yes."""
        config = self._config
        lease = Lease(self._redis, LEASE_KEY, int(config.max_seconds * 2000) + 1000)
        if not lease.acquire():
            return SweepResult(ran=False)
        try:
            return self._pass(self._clock.now(), stopping)
        finally:
            lease.release()

    def candidates(self, now: dt.datetime) -> list[Candidate]:
        """Everything the sweep should look at now, before jitter and budgets."""
        config = self._config
        found: dict[uuid.UUID, Candidate] = {}
        with self._sessions() as session:
            expiring = session.execute(
                select(Delegation.id, Delegation.version, Agent.provider_id,
                       Schedule.next_run_at, Delegation.access_expires_at)
                .join(Schedule, (Schedule.user_id == Delegation.user_id)
                      & (Schedule.agent_id == Delegation.agent_id))
                .join(Agent, Agent.id == Delegation.agent_id)
                .where(~Schedule.paused, Schedule.next_run_at > now,
                       Schedule.next_run_at <= now + config.lookahead,
                       Delegation.status == DelegationStatus.ACTIVE.value,
                       # a superset of "expires before its run + margin" (exact test below)
                       Delegation.access_expires_at <= now + config.lookahead + config.margin,
                       or_(Delegation.refreshed_at.is_(None),
                           Delegation.refreshed_at < now - config.lookahead))
                .order_by(Schedule.next_run_at)
                .limit(config.batch)
            ).all()
            for d_id, version, provider_id, next_run_at, expires_at in expiring:
                if expires_at > next_run_at + config.margin:
                    continue  # still good when that run starts
                if d_id not in found:
                    found[d_id] = Candidate(d_id, version, provider_id, "expiring",
                                            next_run_at - now, config.lookahead)
            last_refresh = func.coalesce(Delegation.refreshed_at, Delegation.granted_at)
            idle_span = config.idle_after / 10
            idle = session.execute(
                select(Delegation.id, Delegation.version, Agent.provider_id, last_refresh)
                .join(Agent, Agent.id == Delegation.agent_id)
                .where(Delegation.status == DelegationStatus.ACTIVE.value,
                       last_refresh < now - (config.idle_after - idle_span))
                .order_by(last_refresh)
                .limit(config.batch)
            ).all()
            for d_id, version, provider_id, last in idle:
                if d_id not in found:
                    found[d_id] = Candidate(d_id, version, provider_id, "idle",
                                            last + config.idle_after - now, idle_span)
        return list(found.values())

    def _pass(self, now: dt.datetime, stopping: Callable[[], bool]) -> SweepResult:
        config = self._config
        result = SweepResult()
        started = self._clock.monotonic()
        chosen = self._not_backing_off([c for c in self.candidates(now)
                                        if self._now_is_the_time(c)])
        self._rng.shuffle(chosen)  # interleave providers and reasons
        per_provider: Counter[uuid.UUID] = Counter()
        exhausted: set[uuid.UUID] = set()
        for candidate in chosen:
            if stopping():
                break
            provider = candidate.provider_id
            if (provider in exhausted or per_provider[provider] >= config.per_provider
                    or self._clock.monotonic() - started > config.max_seconds):
                result.add(candidate.reason, "deferred")
                continue
            try:
                self._budget.acquire(budget_key("provider", f"sweep:{provider}"),
                                     config.provider_rate, Limits.burst(config.provider_rate),
                                     timeout=config.max_wait)
            except BudgetExhausted:
                metrics.BUDGET_EXHAUSTED.labels("provider", "sweep").inc()
                exhausted.add(provider)
                result.add(candidate.reason, "deferred")
                continue
            per_provider[provider] += 1
            outcome = self._refresh(candidate)
            result.add(candidate.reason, outcome)
            if outcome in ("retry_later", "failed"):
                pause = config.retry_after if outcome == "retry_later" \
                    else config.failure_backoff
                self._redis.set(_backoff_key(candidate.delegation_id), outcome,
                                ex=max(1, int(pause.total_seconds())))
        return result

    def _not_backing_off(self, candidates: list[Candidate]) -> list[Candidate]:
        if not candidates:
            return []
        flags = self._redis.mget([_backoff_key(c.delegation_id) for c in candidates])
        return [c for c, flag in zip(candidates, flags, strict=True) if flag is None]

    def _now_is_the_time(self, candidate: Candidate) -> bool:
        """Jitter: refresh when the time left falls below a random point of the span."""
        if not self._jitter:
            return True
        threshold = candidate.span * (0.5 + 0.5 * self._rng.random()) \
            if candidate.reason == "expiring" else candidate.span * self._rng.random()
        return candidate.due_in <= threshold

    def _refresh(self, candidate: Candidate) -> str:
        delegation_id = candidate.delegation_id
        try:
            token = self._tokens.current(delegation_id)  # refreshes if it is about to expire
            if token.version == candidate.version:  # it did not: refresh now
                self._tokens.refresh(delegation_id, rejected=token)
        except DelegationUnusable:
            return "unusable"  # broken by this refresh (invalid_grant), or revoked meanwhile
        except RetryableError as exc:
            log.info("sweep: refresh of %s postponed: %s", delegation_id, exc)
            return "retry_later"
        except BehalfError as exc:
            log.warning("sweep: refresh of %s failed: %s", delegation_id, exc)
            return "failed"
        return "refreshed"

