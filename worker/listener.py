"""Each worker process listens on the revocation bus and stops its runs of a dead delegation.

The push is the fast path (sub-millisecond on Redis pub/sub); the run heartbeat that re-reads
durable state is the slow path that needs no push. On every (re)connect the listener re-checks
the delegations of all its running runs, since messages sent while it was away are lost.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from delegation import bus
from models import Delegation, DelegationStatus
from worker.runner import ActiveRuns

log = logging.getLogger(__name__)

REASONS = {
    DelegationStatus.REVOKED.value: "delegation_revoked",
    DelegationStatus.BROKEN.value: "delegation_broken",
}


class RevocationListener:
    def __init__(
        self,
        *,
        redis_factory: Callable[[], Any],
        sessions: sessionmaker[Session],
        active: ActiveRuns,
        reconnect_delay: float = 0.5,
    ) -> None:
        self._redis_factory = redis_factory
        self._sessions = sessions
        self._active = active
        self._reconnect_delay = reconnect_delay
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = threading.Event()
        self.stops = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="revocation-listener",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def check(self, delegation_ids: list[uuid.UUID]) -> int:
        """Cancel runs of those delegations that are no longer active (durable truth)."""
        if not delegation_ids:
            return 0
        with self._sessions() as session:
            rows = session.execute(
                select(Delegation.id, Delegation.status).where(Delegation.id.in_(delegation_ids))
            ).all()
        cancelled = 0
        for delegation_id, status in rows:
            reason = REASONS.get(status)
            if reason is not None:
                cancelled += self._active.cancel_delegation(delegation_id, reason)
        self.stops += cancelled
        return cancelled

    def _loop(self) -> None:
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self._redis_factory().pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(bus.CHANNEL)
                self.connected.set()
                self.check(self._active.delegations())  # what we may have missed
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.2)
                    if message is None or message.get("type") != "message":
                        continue
                    delegation_id = bus.parse(message["data"])
                    if delegation_id is not None and delegation_id in set(
                        self._active.delegations()
                    ):
                        self.check([delegation_id])
            except Exception:  # Redis restarted or unreachable: reconnect
                self.connected.clear()
                log.warning("revocation listener lost Redis; reconnecting", exc_info=True)
                time.sleep(self._reconnect_delay)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):  # closing a dead connection
                        pubsub.close()
