"""Where `ctx.http` gets its bearer token: fresh, refreshed ahead of expiry, single-flight.

Refreshing is the dangerous moment of a delegation's life: a refresh token spent twice (two
workers racing) makes a rotating AS revoke the whole grant. So:

* one refresher per delegation across the fleet (a short Redis lease), and the refresh request
  is sent only while that lease still has more time left than the request's own timeout;
* waiters poll the durable version and read the winner's tokens instead of refreshing;
* the rotated pair is stored (compare-and-set on the version) before the new access token is
  handed out; a refresher that lost its lease or raced a revoke writes nothing;
* `invalid_grant` re-reads the store first: if the version moved, it was a race, not a death.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from delegation.clock import Clock
from delegation.errors import (
    AgentMisconfigured,
    DelegationUnusable,
    ProviderUnavailable,
    ReauthRequired,
    RetryableError,
)
from delegation.lease import Lease
from delegation.oauth import OAuthClient
from delegation.store import AgentDirectory, DelegationState, DelegationStore
from delegation.tokens import TokenSet

log = logging.getLogger(__name__)


@dataclass(frozen=True, repr=False)
class AccessToken:
    value: str
    delegation_id: uuid.UUID
    version: int
    expires_at: dt.datetime | None

    def __repr__(self) -> str:
        return f"AccessToken(delegation={self.delegation_id}, version={self.version}, <hidden>)"


def refresh_skew(lifetime: float | None, minimum: float) -> float:
    """How long before expiry to refresh: max(minimum, 10 % of lifetime), capped at half of it.

    The cap keeps a token shorter than the minimum from looking permanently expired.
    """
    if lifetime is None or lifetime <= 0:
        return minimum
    return min(max(minimum, 0.1 * lifetime), 0.5 * lifetime)


def needs_refresh(tokens: TokenSet, now: dt.datetime, minimum_skew: float,
                  jitter: float = 0.0) -> bool:
    """True when `tokens` expire within the skew (shortened by up to 10 % jitter)."""
    if tokens.expires_at is None:
        return False
    skew = refresh_skew(tokens.lifetime, minimum_skew) * (1.0 - 0.1 * jitter)
    return now >= tokens.expires_at - dt.timedelta(seconds=skew)


class TokenSource:
    def __init__(
        self,
        *,
        store: DelegationStore,
        agents: AgentDirectory,
        oauth: OAuthClient,
        redis: Any,
        clock: Clock,
        minimum_skew: float = 60.0,
        lease_ms: int = 15_000,
        request_timeout: float = 10.0,
        poll_interval: float = 0.02,
        rng: random.Random | None = None,
        sleep: Callable[[float], None] = time.sleep,
        before_refresh: Callable[[uuid.UUID, uuid.UUID | None], object] | None = None,
        cache_size: int = 1024,
    ) -> None:
        self._store = store
        self._agents = agents
        self._oauth = oauth
        self._redis = redis
        self._clock = clock
        self._minimum_skew = minimum_skew
        self._lease_ms = lease_ms
        self._request_timeout = request_timeout
        self._poll = poll_interval
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrecy
        self._sleep = sleep
        self._before_refresh = before_refresh  # a rate budget (agent, provider); may wait
        # Opened tokens by delegation, most recently used last; bounded, so a long-lived
        # worker that meets every user of a big fleet does not keep them all in memory.
        self._cache: OrderedDict[uuid.UUID, tuple[DelegationState, TokenSet]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.refreshes = 0

    # --- public -----------------------------------------------------------------------------

    def current(self, delegation_id: uuid.UUID) -> AccessToken:
        """A token good for a request now; refreshes first when it is about to expire."""
        state = self._store.state(delegation_id)
        state.require_active()
        tokens = self._tokens_for(state)
        if needs_refresh(tokens, self._clock.now(), self._minimum_skew, self._rng.random()):
            state, tokens = self._refresh(state)
        return AccessToken(tokens.access_token, delegation_id, state.version, tokens.expires_at)

    def refresh(self, delegation_id: uuid.UUID, *, rejected: AccessToken) -> AccessToken:
        """The API refused `rejected` (401): refresh once, unless someone already did."""
        state = self._store.state(delegation_id)
        state.require_active()
        if state.version != rejected.version:
            tokens = self._tokens_for(state)
            return AccessToken(tokens.access_token, delegation_id, state.version,
                               tokens.expires_at)
        state, tokens = self._refresh(state, force=True)
        return AccessToken(tokens.access_token, delegation_id, state.version, tokens.expires_at)

    def forget(self, delegation_id: uuid.UUID) -> None:
        with self._lock:
            self._cache.pop(delegation_id, None)

    # --- internals --------------------------------------------------------------------------

    def _tokens_for(self, state: DelegationState) -> TokenSet:
        with self._lock:
            hit = self._cache.get(state.id)
            if hit is not None:
                self._cache.move_to_end(state.id)
        if hit is not None and hit[0].version == state.version:
            return hit[1]
        loaded_state, tokens = self._store.load(state.id)
        self._remember(loaded_state, tokens)
        return tokens

    def _refresh(self, seen: DelegationState, *, force: bool = False
                 ) -> tuple[DelegationState, TokenSet]:
        """Single-flight refresh. Returns the state and tokens to use."""
        lease = Lease(self._redis, f"behalf:refresh:{seen.id}", self._lease_ms)
        deadline = self._clock.monotonic() + self._lease_ms / 1000 * 2 + self._request_timeout
        while True:
            state, tokens = self._store.load(seen.id)
            if state.version != seen.version and (
                not needs_refresh(tokens, self._clock.now(), self._minimum_skew)
            ):
                self._remember(state, tokens)
                return state, tokens
            if lease.acquire():
                try:
                    return self._refresh_holding(lease, seen, force=force)
                finally:
                    lease.release()
            if self._clock.monotonic() > deadline:
                raise ProviderUnavailable("timed out waiting for another worker's refresh",
                                          retry_after=1.0)
            self._sleep(self._poll)

    def _refresh_holding(self, lease: Lease, seen: DelegationState, *, force: bool
                         ) -> tuple[DelegationState, TokenSet]:
        state, tokens = self._store.load(seen.id)
        if state.version != seen.version and not needs_refresh(
            tokens, self._clock.now(), self._minimum_skew
        ):
            self._remember(state, tokens)
            return state, tokens
        if not force and not needs_refresh(tokens, self._clock.now(), self._minimum_skew):
            self._remember(state, tokens)
            return state, tokens
        if tokens.refresh_token is None:
            raise ReauthRequired("the delegation holds no refresh token")
        identity = self._agents.get(state.agent_id)
        if self._before_refresh is not None:  # before the lease check: waiting uses it up
            self._before_refresh(identity.id, identity.provider_id)
        remaining = lease.remaining_ms() / 1000
        if remaining <= self._request_timeout:
            raise ProviderUnavailable("refresh lease too short to send safely", retry_after=0.1)
        # Said durably before the request leaves: if this process dies before the answer is
        # stored, a following invalid_grant is explained, not silently "broken".
        started = self._store.record_refresh_started(state, identity)
        try:
            fresh = self._oauth.refresh(identity.endpoints, identity.credentials,
                                        tokens.refresh_token, timeout=self._request_timeout)
        except ReauthRequired as exc:
            return self._on_invalid_grant(state, identity, exc, started)
        except ProviderUnavailable as exc:
            if exc.unanswered:
                # The AS may have rotated the token and the answer got lost.
                self._store.record_unconfirmed_refresh(state, identity, str(exc))
            else:  # an answer (5xx, 429, ...): nothing was rotated
                self._store.record_refresh_failed(state, identity, str(exc))
            raise
        except AgentMisconfigured as exc:
            self._store.mark_agent_misconfigured(identity, str(exc))
            self._agents.forget(identity.id)
            raise
        self.refreshes += 1
        saved = self._save_rotated(state, fresh, identity, lease_left=remaining)
        if saved is None:
            # Someone changed the delegation under us (revoked, or a stalled twin): the
            # durable state wins; these fresh tokens are never used.
            latest = self._store.state(state.id)
            latest.require_active()
            log.warning("refresh of %s lost its compare-and-set; using the stored tokens",
                        state.id)
            latest_state, latest_tokens = self._store.load(state.id)
            self._remember(latest_state, latest_tokens)
            return latest_state, latest_tokens
        self._remember(saved, fresh)
        return saved, fresh

    def _save_rotated(self, state: DelegationState, fresh: TokenSet, identity: Any, *,
                      lease_left: float) -> DelegationState | None:
        """Store tokens the AS already rotated, retrying a failed write (database or KMS
        blip) while our lease still keeps every other refresher away: dropping them would
        leave only the spent refresh token, and the next refresh would break the delegation."""
        deadline = self._clock.monotonic() + max(0.0, lease_left - self._request_timeout)
        delay = 0.2
        while True:
            try:
                return self._store.save_refreshed(state, fresh, identity)
            except (SQLAlchemyError, RetryableError):  # the database or KMS, not a bug of ours
                if self._clock.monotonic() + delay > deadline:
                    raise
                log.warning("storing the rotated tokens of %s failed; retrying", state.id,
                            exc_info=True)
                self._sleep(delay)
                delay = min(delay * 2, 2.0)

    def _on_invalid_grant(self, state: DelegationState, identity: Any, exc: ReauthRequired,
                          started: int | None = None) -> tuple[DelegationState, TokenSet]:
        latest = self._store.state(state.id)
        if latest.version != state.version:
            latest.require_active()
            latest_state, tokens = self._store.load(state.id)
            self._remember(latest_state, tokens)
            return latest_state, tokens
        reason = "invalid_grant"
        if self._store.last_refresh_unconfirmed(state, before=started):
            reason = "refresh_response_lost"
        self._store.mark_broken(state, identity, reason, detail=str(exc))
        self.forget(state.id)
        raise DelegationUnusable(f"delegation {state.id} is broken: {exc}",
                                 reason="delegation_broken") from exc

    def _remember(self, state: DelegationState, tokens: TokenSet) -> None:
        with self._lock:
            self._cache[state.id] = (state, tokens)
            self._cache.move_to_end(state.id)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
