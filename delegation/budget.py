"""A rate budget shared by every worker of the fleet: GCRA in one atomic Redis script.

A budget is a key (`budget_key("provider", "acme")` -> ``behalf:budget:provider:acme``), a
sustained rate in requests per second and a burst (how many requests may go at once after a
quiet spell). Over any interval of length t, a budget admits at most ``burst + rate * t``
requests, across all processes that share the Redis.

The algorithm is GCRA (the generic cell rate algorithm, a token bucket kept as one number):
Redis stores the budget's *theoretical arrival time* (TAT), the instant at which it would be
fully refilled. A request at `now` is admitted when ``max(TAT, now) + interval - burst *
interval <= now``; admitting it moves TAT on by one interval. A refusal changes nothing and
says how long to wait. The read-decide-write runs as one Lua script, so it is atomic however
many workers ask at once; the key expires once the budget is full again, so idle budgets
cost nothing.

Time: the caller passes `now`; the script never reads Redis ``TIME``. That keeps the logic
testable with a frozen clock (the same tests run on fakeredis and on a real Redis), and it
costs little: the fleet's wall clocks must agree roughly (NTP/chrony keep them within
milliseconds), and a worker whose clock runs d seconds fast can take at most about
``d * rate`` requests early, once; a slow clock only makes its worker wait longer. Because
TAT never moves backwards (``max(TAT, now)``), skew cannot grow the burst beyond that.
Workers must pass a *wall* clock (`Clock.now`), never a monotonic one: monotonic clocks of
different hosts have unrelated origins.

Waiting is not queued: a refused worker sleeps for the wait it was told and asks again, so
under contention the order of admission is not first-come-first-served.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

from delegation.clock import Clock
from delegation.errors import RetryableError

__all__ = ["BudgetExhausted", "RateBudget", "budget_key"]

BudgetKind = Literal["provider", "agent"]

MIN_RATE = 0.001  # requests per second: one every ~17 minutes
MAX_RATE = 1_000_000.0  # one per microsecond, the script's resolution
MAX_BURST = 1_000_000

# All numbers are whole microseconds, so Lua's doubles hold them exactly (now ~ 1.8e15,
# burst * interval <= 1e15, both far below 2**53).
_GCRA = """
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then
  tat = now
end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if now < allow_at then
  return {0, allow_at - now}
end
local ttl_ms = math.floor((new_tat - now) / 1000) + 1
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', ttl_ms)
return {1, 0}
"""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class ScriptingRedis(Protocol):
    """What the budget needs of a Redis client (`redis.Redis`, `fakeredis.FakeRedis`)."""

    def register_script(self, script: str) -> Callable[..., Any]: ...


class BudgetExhausted(RetryableError):
    """No admission within the caller's timeout; `retry_after` says when one may come."""


def budget_key(kind: BudgetKind, name: str) -> str:
    """The Redis key of a provider's or an agent's budget."""
    if kind not in ("provider", "agent"):
        raise ValueError(f"budget kind must be 'provider' or 'agent', got {kind!r}")
    if not name:
        raise ValueError("budget name must not be empty")
    return f"behalf:budget:{kind}:{name}"


class RateBudget:
    """Admit requests against shared budgets in Redis.

    `clock` gives the wall time sent to Redis (shared across hosts) and the monotonic time
    used for timeouts; `sleep` waits (``time.sleep`` in production, `FrozenClock.advance`
    in tests). Neither is read anywhere else.
    """

    def __init__(
        self, redis: ScriptingRedis, *, clock: Clock, sleep: Callable[[float], None]
    ) -> None:
        self._gcra = redis.register_script(_GCRA)
        self._clock = clock
        self._sleep = sleep

    def try_acquire(self, key: str, rate: float, burst: int, now_ms: float) -> float:
        """Take one request from the budget at `now_ms` (milliseconds since the epoch).

        Returns 0.0 when admitted, else the seconds to wait before asking again (nothing
        is taken on a refusal).
        """
        return self._try(key, rate, burst, round(now_ms * 1000))

    def acquire(self, key: str, rate: float, burst: int, *, timeout: float) -> float:
        """Take one request, sleeping until the budget admits it; return the seconds waited
        (for a metric). Raise `BudgetExhausted` as soon as the next admission is known to
        come later than `timeout` seconds after the call, without sleeping in vain.
        """
        if not timeout >= 0:
            raise ValueError(f"timeout must be a non-negative number of seconds, got {timeout}")
        started = self._clock.monotonic()
        while True:
            wait = self._try(key, rate, burst, self._now_us())
            waited = self._clock.monotonic() - started
            if wait == 0.0:
                return waited
            if waited + wait > timeout:
                raise BudgetExhausted(
                    f"rate budget {key} exhausted: next request in {wait:.3f}s, "
                    f"past the {timeout:g}s timeout",
                    retry_after=wait,
                )
            self._sleep(wait)

    def _now_us(self) -> int:
        return (self._clock.now() - _EPOCH) // _MICROSECOND

    def _try(self, key: str, rate: float, burst: int, now_us: int) -> float:
        _check(key, rate, burst)
        interval_us = math.ceil(1_000_000 / rate)  # rounding up never over-admits
        admitted, wait_us = self._gcra(keys=[key], args=[now_us, interval_us, burst])
        return 0.0 if int(admitted) else int(wait_us) / 1_000_000


def _check(key: str, rate: float, burst: int) -> None:
    if not key:
        raise ValueError("budget key must not be empty")
    if not MIN_RATE <= rate <= MAX_RATE:  # also refuses NaN
        raise ValueError(
            f"rate must be between {MIN_RATE:g} and {MAX_RATE:g} per second, got {rate}"
        )
    if isinstance(burst, bool) or not isinstance(burst, int) or not 1 <= burst <= MAX_BURST:
        raise ValueError(f"burst must be a whole number from 1 to {MAX_BURST}, got {burst!r}")
