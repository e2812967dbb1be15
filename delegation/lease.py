"""A short, owned Redis lease: single-flight across the fleet, released only by its owner.

Correctness does not rest on it (writers also compare-and-set the delegation's version in
PostgreSQL); the lease only keeps the fleet from spending a refresh token twice.
"""

from __future__ import annotations

import secrets
from typing import Any

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""

_REMAINING = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pttl', KEYS[1]) end
return -2
"""


class Lease:
    def __init__(self, redis: Any, key: str, ttl_ms: int) -> None:
        self._redis = redis
        self.key = key
        self.ttl_ms = ttl_ms
        self.owner = secrets.token_hex(16)

    def acquire(self) -> bool:
        return bool(self._redis.set(self.key, self.owner, nx=True, px=self.ttl_ms))

    def remaining_ms(self) -> int:
        """Milliseconds this owner still holds the lease for; <= 0 when it is lost."""
        return int(self._redis.eval(_REMAINING, 1, self.key, self.owner))

    def release(self) -> bool:
        return bool(self._redis.eval(_RELEASE, 1, self.key, self.owner))

    def held_by_anyone(self) -> bool:
        return bool(self._redis.exists(self.key))
